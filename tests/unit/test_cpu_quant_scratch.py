"""The kernels' per-call scratch (the fused MLP's gate/up buffer, the quantised activations) is
handed back after a prefill: a chunk-sized buffer would otherwise stay resident for good, and
the next call still computes the same numbers."""

from __future__ import annotations

import pytest
import torch

from pensieve.backends.cpu_quant import Q4Linear
from tests.unit.test_cpu_quant import KERNELS, groups
from tests.helpers.integer_gemm import integer_gemm  # noqa: F401  (autouse)
from tests.unit.test_cpu_quant_mixed_model import mixed_engine

pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))


@pytest.mark.parametrize("fused", [0, 1])
def test_released_scratch_leaves_rss_and_the_next_call_is_the_same(fused):
    from pensieve.backends.cpu_quant.mlp import Q4MLP

    # scratch: 800 × 3 × 4096 floats = 39 MB; with gate/up and SiLU fused (the VNNI GEMM,
    # swiglu_gemm_source.py) only the down projection's int16 input: 800 × 4096 × 2 B = 6.5 MB
    hidden, inner, rows = 64, 4096, 800
    before = KERNELS.lib.pq_set_swiglu(-1)
    KERNELS.lib.pq_set_swiglu(fused)
    mlp = Q4MLP(Q4Linear(KERNELS, groups(2 * inner, hidden, seed=1)),
                Q4Linear(KERNELS, groups(hidden, inner, seed=2)))
    x = torch.randn(rows, hidden)
    few = mlp(x[:5].contiguous())  # row tiles: a decode-sized call
    first = mlp(x)
    held = rss_anon_kib()
    KERNELS.lib.pq_release_scratch()
    freed = held - rss_anon_kib()
    KERNELS.lib.pq_set_swiglu(before)
    if not fused or KERNELS.isa != "avx512_vnni":  # the unfused two steps: the 39 MB buffer
        assert freed > 30_000, f"released only {freed} KiB"  # not kept resident
    else:
        assert freed > 6_000, f"released only {freed} KiB"
    assert torch.equal(mlp(x), first)  # allocated again on the next call: the same numbers
    KERNELS.lib.pq_release_scratch()
    KERNELS.lib.pq_release_scratch()  # twice in a row: nothing left to free, no double free
    assert torch.equal(mlp(x[:5].contiguous()), few)


def test_the_runner_releases_after_a_finished_prefill_only(monkeypatch):
    from pensieve.backends.cpu_quant.layers import CpuAttention
    from pensieve.engine.types import SamplingParams

    engine = mixed_engine(decoder=True)
    released = []
    monkeypatch.setattr(CpuAttention, "release_scratch", lambda self: released.append(1))
    # 300 tokens in chunks of 64: the first two run as rows of the one-call decoder (few
    # row-keys), the next on the module path (prefill-sized scratch), the fifth ends the prompt
    engine.add_request("long", [3 + i % 250 for i in range(300)], SamplingParams(max_tokens=4, temperature=0.0))
    steps = []
    while engine.has_work():
        before = len(released)
        engine.step()
        steps.append(len(released) - before)
    assert steps[:5] == [0, 0, 0, 0, 1]  # released once, when the prompt's last chunk ran
    assert sum(steps[5:]) == 0  # decode steps keep their (small) buffers
