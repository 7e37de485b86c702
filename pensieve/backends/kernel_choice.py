"""Resolve ``--weights auto|float|int4``: which weight-only kernels win here (CPU; on CUDA
4-bit GGUF weights stay 4-bit, see ``_choose_cuda``).

Decode is memory-bound, so 4-bit/8-bit weights win wherever a kernel reads them at memory
speed: the compiled AVX2 kernels of ``backends/cpu_quant`` do on any x86-64 with AVX2;
PyTorch's own int4/int8 ops do with AVX-512 but are ~10× slower than float32 on AVX2-only
CPUs. ``choose`` builds (or loads the cached) kernels and times a 1-row matmul of each kind
against float32 at start-up (tens of milliseconds), per shape class: the 4-bit linear layers
and the int8 output projection.

    choice = choose(settings.weights, device=settings.device)
    ckpt = load_checkpoint(path, keep_int4=choice.keep_int4)
    engine = build_engine(ckpt, EngineConfig(..., int8_lm_head=choice.int8_lm_head))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pensieve.backends.cpu_quant import Kernels, Q4Linear, Q8Linear, load_kernels, pack_q8
from pensieve.models.quant_linear import Int4Groups, Int4Linear, Int8Linear, int4_supported

log = logging.getLogger(__name__)

WEIGHTS = ("auto", "float", "int4")
WIN = 0.9  # a quantised kernel must take at most this fraction of float32's time


@dataclass(frozen=True)
class WeightChoice:
    """What ``--weights`` resolved to, and the timings (µs per 1-row matmul) that decided it."""

    keep_int4: bool  # load 4-bit GGUF linear weights as codes: load_checkpoint(keep_int4=...)
    int8_lm_head: bool  # EngineConfig(int8_lm_head=...)
    kernel: str  # what the 4-bit layers run on: "cpu_quant" | "aten" | "float"
    timings_us: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        times = ", ".join(f"{k} {v:.0f} µs" for k, v in self.timings_us.items())
        head = "int8" if self.int8_lm_head else "float"
        return f"linear weights: {self.kernel}, lm_head: {head}" + (f" ({times})" if times else "")


def _time(fn: Callable[[], torch.Tensor], reps: int = 20) -> float:
    """Median µs of `reps` calls (the median shrugs off a descheduled call on a busy box)."""
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2] * 1e6


def _random_groups(n: int, k: int) -> Int4Groups:
    gen = torch.Generator().manual_seed(0)
    return Int4Groups(
        torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen),
        torch.rand(n, k // 32, generator=gen) * 0.01,
        torch.rand(n, k // 32, generator=gen) * -0.05,
        32,
    )


def time_kernels(kernels: Kernels | None, aten: bool, hidden: int = 576,
                 inner: int = 1536, vocab: int = 4096) -> dict[str, float]:
    """µs per 1-row matmul: float32 vs each available kernel, for both shape classes."""
    groups = _random_groups(inner, hidden)
    weight = groups.dequantize()
    head = torch.rand(vocab, hidden) - 0.5
    x = torch.randn(1, hidden)
    out: dict[str, float] = {}
    with torch.inference_mode():
        out["float32 linear"] = _time(lambda: F.linear(x, weight))
        out["float32 head"] = _time(lambda: F.linear(x, head))
        if kernels is not None:
            q4, q8 = Q4Linear(kernels, groups), Q8Linear(kernels, *pack_q8(kernels, head))
            out["q4 linear"], out["q8 head"] = _time(lambda: q4(x)), _time(lambda: q8(x))
        if aten and int4_supported(32, hidden):
            int4, int8 = Int4Linear(groups), Int8Linear(head)
            out["aten int4 linear"] = _time(lambda: int4(x), reps=5)
            out["aten int8 head"] = _time(lambda: int8(x), reps=5)
    return out


def choose(weights: str = "auto", *, device: str = "cpu") -> WeightChoice:
    """Resolve a ``--weights`` value for a CPU model.

    ``float``: float weights, nothing built. ``int4``: 4-bit layers and an int8 head on the
    compiled kernels, even where they time slower. ``auto``: each only where it is at least
    10% faster than float32 here. PyTorch's own int4 op (the fallback when the kernels cannot
    be built) is used only where it wins, whatever was asked: on AVX2-only CPUs it is ~10×
    slower than float32. CUDA: see ``_choose_cuda``; other devices get float.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    kind = torch.device(device).type
    if weights == "float" or kind not in ("cpu", "cuda"):
        return WeightChoice(False, False, "float")
    if kind == "cuda":
        return _choose_cuda()
    kernels = load_kernels()
    times = time_kernels(kernels, aten=kernels is None)
    if kernels is not None:
        if weights == "int4":
            return WeightChoice(True, True, "cpu_quant", times)
        kernel, linear, head = "cpu_quant", times["q4 linear"], times["q8 head"]
    elif "aten int4 linear" in times:
        kernel, linear, head = "aten", times["aten int4 linear"], times["aten int8 head"]
    else:
        log.warning("no weight-only kernel on this machine: float weights")
        return WeightChoice(False, False, "float", times)
    int4 = linear < WIN * times["float32 linear"]
    int8 = head < WIN * times["float32 head"]
    if weights == "int4" and not int4:
        log.warning("--weights int4: the compiled kernels are unavailable and PyTorch's int4 "
                    "op is slower than float32 here: float weights")
    return WeightChoice(int4, int8, kernel if int4 else "float", times)


def _choose_cuda() -> WeightChoice:
    """On CUDA, 4-bit GGUF weights stay 4-bit under ``auto`` and ``int4``: small decode
    batches, where the bytes of weights read per token decide the speed, run on int4 kernels
    and larger products on cuBLAS (``backends/cuda_int4``; measured on an H100: b=1 253 vs
    150 tok/s bf16, BENCHMARKS.md). The output layer stays float: one matrix, which int8
    would round."""
    from pensieve.backends.cuda_int4 import cuda_int4_available

    if not cuda_int4_available():
        log.warning("no Triton for the CUDA int4 kernels: float weights")
        return WeightChoice(False, False, "float")
    return WeightChoice(True, False, "cuda_int4")
