"""Resolve ``--weights auto|float|int4``: which weight-only kernels run here (CPU; on CUDA
4-bit GGUF weights stay 4-bit, see ``_choose_cuda``).

Decode is memory-bound: every token reads every weight, so the bytes per weight decide its
speed, and the quantised kernels read 4.5–9 bits a weight where float32 reads 32. ``auto``
therefore decides from what the machine *has*, never from a timing: the compiled kernels of
``backends/cpu_quant`` when they build and load here (x86-64 with AVX2 and a C++ compiler),
else PyTorch's own int4/int8 ops where the CPU has AVX-512 (on AVX2-only CPUs they are ~10×
slower than float32), else float. The same machine gives the same answer on every start.
(It used to time one 1-row matmul of each kind at start-up: a ~40 µs timing of a weight that
fits in cache, which favours float32 and flipped between runs on a busy machine — float won
4 starts in 12 on this CPU, for 0.27× of llama-cpp-python's decode instead of 1.7×.)

    choice = choose(settings.weights, device=settings.device)
    ckpt = load_checkpoint(path, keep_int4=choice.keep_int4)
    engine = build_engine(ckpt, EngineConfig(..., int8_lm_head=choice.int8_lm_head))
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from pensieve.backends.cpu_quant import load_kernels
from pensieve.backends.cpu_quant.build import cpu_features
from pensieve.models.quant_linear import int4_supported

log = logging.getLogger(__name__)

WEIGHTS = ("auto", "float", "int4")


@dataclass(frozen=True)
class WeightChoice:
    """What ``--weights`` resolved to, and why (the CPU features it was decided from)."""

    keep_int4: bool  # load quantised GGUF linear weights as codes: load_checkpoint(keep_int4=...)
    int8_lm_head: bool  # EngineConfig(int8_lm_head=...)
    kernel: str  # what the quantised layers run on: "cpu_quant" | "aten" | "float" | "cuda_int4"
    reason: str = ""

    def describe(self) -> str:
        head = "int8" if self.int8_lm_head else "float"
        return f"linear weights: {self.kernel}, lm_head: {head}" + (
            f" ({self.reason})" if self.reason else "")


def aten_int4_fast() -> bool:
    """PyTorch's int4/int8 weight-only CPU ops read weights at memory speed only with AVX-512."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and int4_supported(32, 64)


def choose(weights: str = "auto", *, device: str = "cpu") -> WeightChoice:
    """Resolve a ``--weights`` value for a CPU model.

    ``float``: float weights, nothing built. ``auto`` and ``int4``: quantised layers and an int8
    head on the compiled kernels where they load here; else on PyTorch's own ops where the CPU
    has AVX-512; else float (with a warning for ``int4``). CUDA: see ``_choose_cuda``; other
    devices get float. Deterministic: no timing takes part.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    kind = torch.device(device).type
    if weights == "float" or kind not in ("cpu", "cuda"):
        return WeightChoice(False, False, "float")
    if kind == "cuda":
        return _choose_cuda()
    features = " ".join(cpu_features()) or "no x86 SIMD features"
    if load_kernels() is not None:
        from pensieve.backends.cpu_quant import bf16_prefill

        rows = bf16_prefill.bf16_from()
        amx = "AMX" if bf16_prefill.amx_bf16() else "no AMX"
        prefill = (f"from {rows} rows bf16 matmuls ({amx}; PENSIEVE_BF16_PREFILL=0 off)"
                   if rows != sys.maxsize else "integer kernels at every row count")
        detail = f"compiled kernels, {prefill}; CPU: {features}"
        return WeightChoice(True, True, "cpu_quant", detail)
    if aten_int4_fast():
        return WeightChoice(True, True, "aten", f"PyTorch int4/int8 ops; CPU: {features}")
    if weights == "int4":
        log.warning("--weights int4: the compiled kernels are unavailable and PyTorch's int4 "
                    "op is slower than float32 without AVX-512: float weights")
    else:
        log.warning("no weight-only kernel on this machine: float weights")
    return WeightChoice(False, False, "float", f"no kernels; CPU: {features}")


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
