"""``cuda_int4.Plan``s kept between starts (``tune_cache``): a later start on the same GPU and
software reads a shape's plan back and checks its kernels once per row bucket against the
dequantised weight instead of timing every candidate (``cuda_int4_tune``); a plan that fails
the check is timed afresh."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from pensieve.backends.cuda_int4 import (
    GEMM_BUCKETS, ROUTE_BUCKETS, CudaInt4Linear, Gemm, Plan, Rows, Skinny, Skinny2, Split, Wide,
    Words, dequantize, int4_linear,
)
from pensieve.backends.cuda_int4_gemv import candidates
from pensieve.backends.tune_cache import TuneCache, device_key

log = logging.getLogger(__name__)

PLANS = TuneCache("int4", ("cuda_int4.py", "cuda_int4_kernels.py", "cuda_int4_tune.py",
                           "cuda_int4_plan_cache.py", "cuda_int4_gemv.py",
                           "cuda_int4_gemv_kernels.py", "cuda_int4_gemv_wide.py",
                           "cuda_int4_gemv_wide_kernels.py", "cuda_int4_rows.py",
                           "cuda_int4_rows_kernels.py", "cuda_int4_skinny2.py",
                           "cuda_int4_skinny2_kernels.py", "cuda_splitk_kernels.py"))


def to_json(plan: Plan) -> dict[str, Any]:
    return {"route": {str(b): r for b, r in plan.route.items()}, "words": asdict(plan.words),
            "skinny": None if plan.skinny is None else asdict(plan.skinny),
            "gemm": {str(b): asdict(g) for b, g in plan.gemm.items()},
            "split": None if plan.split is None else asdict(plan.split),
            "wide": None if plan.wide is None else asdict(plan.wide),
            "rows": {str(b): asdict(r) for b, r in plan.rows.items()},
            "skinny2": {str(b): asdict(r) for b, r in plan.skinny2.items()}}


def from_json(d: dict[str, Any]) -> Plan:
    return Plan({int(b): r for b, r in d["route"].items()}, Words(**d["words"]),
                None if d["skinny"] is None else Skinny(**d["skinny"]),
                {int(b): Gemm(**g) for b, g in d["gemm"].items()},
                None if d.get("split") is None else Split(**d["split"]),
                None if d.get("wide") is None else Wide(**d["wide"]),
                {int(b): Rows(**r) for b, r in (d.get("rows") or {}).items()},
                {int(b): Skinny2(**r) for b, r in (d.get("skinny2") or {}).items()})


def _key(layer: CudaInt4Linear, dtype: torch.dtype) -> str:
    sym = "sym" if layer.scale_offset.dtype == torch.int16 else "pairs"
    q8 = "" if any(c.q8 for c in candidates()) else "|no q8"  # PENSIEVE_INT4_Q8=0
    return (f"{device_key(layer.packed.device, dtype)}|{layer.out_features}x"
            f"{layer.in_features}|{sym}{q8}")


def cacheable(layer: CudaInt4Linear) -> bool:
    """Plans without the opt-in extra copies (``--keep-dense-weights`` times those too)."""
    return layer.dense is None and layer.tiny is None


def works(plan: Plan, layer: CudaInt4Linear, dtype: torch.dtype) -> bool:
    """Every bucket's kernel gives the dequantised weight's product (relative error < 2e-2)."""
    k = layer.in_features
    weight = dequantize(layer.packed, layer.scale_offset, torch.float32)
    gen = torch.Generator(device=layer.packed.device).manual_seed(0)
    for rows in ROUTE_BUCKETS + GEMM_BUCKETS:
        x = torch.randn(rows, k, device=layer.packed.device, generator=gen).to(dtype)
        try:
            y = int4_linear(x, layer.packed, layer.scale_offset, plan=plan)
        except Exception as exc:  # noqa: BLE001 - a kernel that no longer builds: time afresh
            log.warning("cached int4 plan %dx%d: %d rows failed (%s)", layer.out_features, k,
                        rows, exc)
            return False
        ref = F.linear(x.float(), weight)
        err = ((y.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        if not err < 2e-2:
            log.warning("cached int4 plan %dx%d: %d rows off by %.3g", layer.out_features, k,
                        rows, err)
            return False
    return True


def load(layer: CudaInt4Linear, dtype: torch.dtype, cache: TuneCache | None = None
         ) -> Plan | None:
    """The plan an earlier start timed for ``layer``'s shape, if it still checks out."""
    if not cacheable(layer):
        return None
    return (cache or PLANS).checked(_key(layer, dtype), from_json,
                                    lambda plan: works(plan, layer, dtype))


def store(layer: CudaInt4Linear, dtype: torch.dtype, plan: Plan,
          cache: TuneCache | None = None) -> None:
    if cacheable(layer):
        (cache or PLANS).put(_key(layer, dtype), to_json(plan))
