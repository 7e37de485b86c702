"""Route every ``CudaQ6KLinear`` of a model on the GPU to its fastest tiles (``cuda_q6k.Plan``).

Per weight shape (the layers of a shape share one plan), each route's tile candidates run once
against the dequantised weight (relative error under 2e-2) and those that build and are right
are timed on up to 8 layers of the shape back to back (``cuda_int4_tune.gpu_us``: GPU time
only, as in a CUDA graph): ``gemv`` at 1 row, the 16-row ``gemm`` at 8, the prefill ``gemm``
tiles at 64 and 1024. A route none of whose candidates builds or is right gets None — its
calls dequantise the weight for the call + cuBLAS — with a warning, so that a Triton that
cannot compile a tile slows the start's Q6_K layers down instead of breaking it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends.cuda_q6k import (
    GEMM, GEMM_SMALL, GEMV, SKINNY, CudaQ6KLinear, Plan, Tiles, dequantize, launch,
)

log = logging.getLogger(__name__)

# the first: the untimed default; all build for sm_90 without a register spill (bf16)
CANDIDATES: dict[str, tuple[Tiles, ...]] = {
    "gemv": (GEMV, Tiles(1, 4, 8, 4, 2), Tiles(1, 16, 8, 4, 2), Tiles(1, 8, 16, 4, 2)),
    "skinny": (SKINNY, Tiles(16, 64, 4, 4, 3), Tiles(16, 64, 2, 4, 3), Tiles(16, 128, 4, 8, 3)),
    "gemm_small": (GEMM_SMALL, Tiles(64, 128, 2, 8, 3), Tiles(32, 64, 4, 4, 3)),
    "gemm": (GEMM, Tiles(128, 64, 2, 8, 3), Tiles(64, 256, 2, 8, 3)),
}
ROWS = {"gemv": 1, "skinny": 8, "gemm_small": 64, "gemm": 1024}  # rows each route is timed at

Timer = Callable[[Callable[[CudaQ6KLinear], torch.Tensor], list[CudaQ6KLinear], int], float]


def prepare(model: nn.Module, dtype: torch.dtype, reps: int = 10, timer: Timer | None = None,
            rows: Mapping[str, int] = ROWS) -> None:
    """Plan every ``CudaQ6KLinear`` of ``model`` (on the GPU, in ``dtype``; an untied
    embedding's table, only looked up, is left alone). ``timer``: GPU µs of a run over
    layers (``cuda_int4_tune.gpu_us``; tests pass their own)."""
    if timer is None:
        from pensieve.backends.cuda_int4_tune import gpu_us as timer
    layers = [m for m in model.modules()
              if isinstance(m, CudaQ6KLinear) and not getattr(m, "lookup_only", False)]
    shapes: dict[tuple[int, int], list[CudaQ6KLinear]] = {}
    for m in layers:
        shapes.setdefault((m.out_features, m.in_features), []).append(m)
    notes = []
    for (n, k), same in shapes.items():
        plan = plan_shape(same[:8], dtype, reps, timer, rows)
        for m in same:
            m.plan = plan
        notes.append(f"{n}x{k}: " + ", ".join(
            f"{r} " + (f"{t.block_m}x{t.block_n}x{t.block_g}" if t else "dequant")
            for r, t in plan.items()))
    if layers:
        held = sum(sum(b.nbytes for b in m.weight_buffers()) for m in layers)
        log.info("Q6_K layers: %d, %.2f GiB of codes; %s", len(layers), held / 2**30,
                 "; ".join(notes))


def plan_shape(sample: list[CudaQ6KLinear], dtype: torch.dtype, reps: int, timer: Timer,
               rows: Mapping[str, int] = ROWS) -> Plan:
    """Each route's fastest right candidate for the layers in ``sample`` (one shape)."""
    first = sample[0]
    weight = dequantize(*first.weight_buffers())
    gen = torch.Generator(device=weight.device).manual_seed(0)
    plan: Plan = {}
    for name, cands in CANDIDATES.items():
        x = torch.randn(rows[name], first.in_features, device=weight.device,
                        generator=gen).to(dtype)
        ref = F.linear(x.float(), weight)
        timed: list[tuple[float, Tiles]] = []
        why = ""
        for t in cands:
            def run(m: CudaQ6KLinear, t: Tiles = t) -> torch.Tensor:
                return launch(name, x, m.weight_buffers(), t)
            try:
                err = ((run(first).float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
            except Exception as e:  # a Triton that cannot build it
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                continue
            if not err < 2e-2:
                why = f"relative error {err:.3g}"
                continue
            timed.append((timer(run, sample, reps), t))
        plan[name] = min(timed, key=lambda r: r[0])[1] if timed else None
        if not timed:
            log.warning("Q6_K %s %dx%d: no tile builds and is right (%s); dequantise + cuBLAS",
                        name, first.out_features, first.in_features, why)
    return plan
