"""``cuda_q6k`` plans kept between starts (``tune_cache``, kind "q6k"): a later start on the same
GPU, software and kernel code reads a shape's plan back and checks each bucket's kernel once
against the dequantised weight instead of racing every tile (``cuda_q6k_tune``: 37-46 s of an
H100 start on GLM-4.7-Flash and Qwen3-30B-A3B in session 13, on every start before this); a
plan that fails the check is timed afresh."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from pensieve.backends.cuda_q6k import BUCKETS, CudaQ6KLinear, Plan, Skinny, Tiles, launch
from pensieve.backends.cuda_q6k_rows import Rows
from pensieve.backends.cuda_q6k_skinny2 import Skinny2
from pensieve.backends.cuda_q6k_split import Split
from pensieve.backends.tune_cache import TuneCache, device_key

log = logging.getLogger(__name__)

PLANS = TuneCache("q6k", ("cuda_q6k.py", "cuda_q6k_kernels.py", "cuda_q6k_tune.py",
                          "cuda_q6k_plan_cache.py", "cuda_q6k_split.py",
                          "cuda_q6k_split_kernels.py", "cuda_q6k_rows.py",
                          "cuda_q6k_rows_kernels.py", "cuda_q6k_skinny2.py",
                          "cuda_q6k_skinny2_kernels.py", "cuda_splitk_kernels.py"))
# a choice's tiles by its kernel's name ("torch", the reference fallback, has none)
TILES: dict[str, type] = {"gemv": Tiles, "gemm": Tiles, "dequant": Tiles, "skinny": Skinny,
                          "split": Split, "rows": Rows, "skinny2": Skinny2}


def to_json(plan: Plan) -> dict[str, Any]:
    return {str(b): [name, None if t is None else asdict(t)] for b, (name, t) in plan.items()}


def from_json(d: dict[str, Any]) -> Plan:
    return {int(b): (name, None if t is None else TILES[name](**t)) for b, (name, t) in d.items()}


def _key(layer: CudaQ6KLinear, dtype: torch.dtype) -> str:
    return f"{device_key(layer.lo.device, dtype)}|{layer.out_features}x{layer.in_features}"


def works(plan: Plan, layer: CudaQ6KLinear, dtype: torch.dtype) -> bool:
    """Every bucket's choice gives the dequantised weight's product (relative error < 2e-2)."""
    if set(plan) != set(BUCKETS):
        return False
    weight = layer.dequantize()
    gen = torch.Generator(device=weight.device).manual_seed(0)
    for b in BUCKETS:
        x = torch.randn(b, layer.in_features, device=weight.device, generator=gen).to(dtype)
        try:
            y = launch(plan[b], x, layer.weight_buffers())
        except Exception as exc:  # noqa: BLE001 - a kernel that no longer builds: time afresh
            log.warning("cached Q6_K plan %dx%d: %d rows failed (%s)", layer.out_features,
                        layer.in_features, b, exc)
            return False
        ref = F.linear(x.float(), weight)
        err = ((y.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        if not err < 2e-2:
            log.warning("cached Q6_K plan %dx%d: %d rows off by %.3g", layer.out_features,
                        layer.in_features, b, err)
            return False
    return True


def load(layer: CudaQ6KLinear, dtype: torch.dtype, cache: TuneCache | None = None
         ) -> Plan | None:
    """The plan an earlier start timed for ``layer``'s shape, if it still checks out."""
    return (cache or PLANS).checked(_key(layer, dtype), from_json,
                                    lambda plan: works(plan, layer, dtype))


def store(layer: CudaQ6KLinear, dtype: torch.dtype, plan: Plan,
          cache: TuneCache | None = None) -> None:
    (cache or PLANS).put(_key(layer, dtype), to_json(plan))
