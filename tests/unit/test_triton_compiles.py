"""``backends/triton_compiles``: Triton compiles counted at start and warned of while serving.

On the CPU the installed hooks are called the way Triton's JIT calls them (keyword arguments;
``jit_cache_hook`` before a compile, ``jit_post_compile_hook`` after); on a GPU a kernel
compiled for a new specialisation after ``serving()`` is warned of by name."""

from __future__ import annotations

import logging

import pytest
import torch

triton = pytest.importorskip("triton")
from pensieve.backends import triton_compiles  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def fresh(monkeypatch):
    """A clean module state and clean Triton hooks, both restored after the test."""
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    monkeypatch.setattr(triton_compiles, "_state",
                        {"installed": False, "serving": False, "count": 0, "seconds": 0.0})
    return knobs.runtime


def test_compiles_are_counted_at_start_and_warned_of_while_serving(fresh, caplog):
    seen = []
    fresh.jit_post_compile_hook = lambda **kw: seen.append(kw["repr"])  # a hook set before ours
    assert triton_compiles.watch() and triton_compiles.watch()  # idempotent
    caplog.set_level(logging.DEBUG, logger="pensieve.triton")

    def compile_once(name: str, manual: bool = False) -> None:
        kw = dict(key="k", repr=name, fn=None, compile={}, is_manual_warmup=manual,
                  already_compiled=False)
        assert not fresh.jit_cache_hook(**kw)  # falsy: Triton goes on to compile
        fresh.jit_post_compile_hook(**kw)

    compile_once("gemv[num_warps=4](x: *bf16, n: i32)")
    assert triton_compiles.serving()[0] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    compile_once("latent_partial[num_warps=4](q: *bf16, rows: i32)")
    compile_once("warmed(n: i32)", manual=True)  # an explicit kernel.warmup(): not a surprise
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "latent_partial" in warnings[0] and "while serving" in warnings[0]
    assert triton_compiles.compiles()[0] == 3
    assert seen == ["gemv[num_warps=4](x: *bf16, n: i32)",
                    "latent_partial[num_warps=4](q: *bf16, rows: i32)", "warmed(n: i32)"]


def test_a_cache_hook_set_before_keeps_its_answer(fresh):
    fresh.jit_cache_hook = lambda **kw: True  # e.g. a tool that only collects specialisations
    assert triton_compiles.watch()
    assert fresh.jit_cache_hook(key="k", repr="r", fn=None, compile={}, is_manual_warmup=False,
                                already_compiled=False) is True


@needs_cuda
def test_a_new_specialisation_compiled_while_serving_is_warned_of(fresh, caplog):
    import triton.language as tl

    @triton.jit
    def scale(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)

    assert triton_compiles.watch()
    x = torch.ones(64, device="cuda")
    scale[(1,)](x, 64, BLOCK=64)  # n divisible by 16
    assert triton_compiles.serving()[0] >= 1
    caplog.set_level(logging.WARNING, logger="pensieve.triton")
    scale[(1,)](x, 64, BLOCK=64)  # cached: nothing
    assert not caplog.records
    scale[(1,)](x, 63, BLOCK=64)  # not divisible by 16: a new specialisation
    assert any("scale" in r.getMessage() for r in caplog.records)
