"""Route every ``CudaInt8Linear`` of a model on the GPU (Q8_0, Q5_x, IQ4_x codes) per row bucket
(``cuda_int8.Plan``), as ``cuda_int4_tune`` does for the int4 layers.

Before this the int8 layers ran a fixed rule: ``gemv`` at 1 row, ``skinny`` (16 padded rows on
the tensor cores) at 2-16. On session 13's gpt-oss-20b run (Q8_0 attention and head) ``skinny``
was 25% of an 8-row step, 2.6x the 1-row ``gemv``'s share for the same weights. So per weight
shape (layers of a shape share a plan) the ``gemv`` tiles are timed at 1 row and the ``skinny``
tiles at 8; then per bucket (1, 2, 4, 8, 16 rows) the best of each route races: ``gemv`` at m
rows reads the weight once a row — from L2 where it fits (an attention projection), not a
vocabulary-sized head. Each candidate is checked against the dequantised weight first
(relative error under 2e-2); one that fails to build or is wrong is left out with a warning.
GPU time only (``cuda_int4_tune.gpu_us``). Plans are kept between starts (``tune_cache``, kind
"int8"); the fixed rule's tiles are always in the race.

``gemv2`` (``cuda_int8_gemv2_kernels``: 16-byte loads in one layout, any K step, up to 4 rows
a program) is a third route: its best tile at 1 row joins the per-bucket races beside gemv's
and skinny's — chosen only where it is right and faster on this GPU. Plans store route names
as strings: a plan without gemv2 reads back as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends.cuda_int8 import (
    GEMV, GEMV2, ROUTE_BUCKETS, SKINNY, CudaInt8Linear, Plan, Tiles, run_route,
)
from pensieve.backends.tune_cache import TuneCache, device_key

log = logging.getLogger(__name__)

# the fixed rule's tiles first; the others unmeasured on a GPU (more outputs a program, a
# shorter K step with a deeper pipeline, 8 warps on 128 outputs)
GEMV_CANDIDATES = (GEMV, Tiles(1, 8, 256, 4, 3), Tiles(1, 16, 256, 8, 3), Tiles(1, 2, 512, 2, 3))
# gemv2 (16-byte loads in one layout, any K step): few tiles, each a compile at start; block_m
# the most rows a program takes (1, 2 or 4 by the bucket)
GEMV2_CANDIDATES = (GEMV2, Tiles(4, 8, 512, 4, 1), Tiles(4, 2, 1024, 4, 1))
SKINNY_CANDIDATES = (SKINNY, Tiles(16, 64, 128, 4, 3), Tiles(16, 64, 64, 4, 4),
                     Tiles(16, 128, 64, 8, 3), Tiles(16, 32, 256, 4, 3))
PLANS = TuneCache("int8", ("cuda_int8.py", "cuda_int8_kernels.py", "cuda_int8_gemv2_kernels.py",
                         "cuda_int8_tune.py"))

Run = Callable[[CudaInt8Linear], torch.Tensor]
Timer = Callable[[Run, list[CudaInt8Linear], int], float]


def prepare(model: nn.Module, dtype: torch.dtype, reps: int = 10, timer: Timer | None = None,
            cache: TuneCache | None = None) -> None:
    """Plan every ``CudaInt8Linear`` of ``model`` (an embedding's table, only looked up, is left
    alone). ``timer``: GPU µs of a run over layers (tests pass their own; plans are cached only
    for the GPU timer's, in ``cache`` or ``PLANS``)."""
    if timer is None:
        from pensieve.backends.cuda_int4_tune import gpu_us as timer

        cache = cache or PLANS
    shapes: dict[tuple, list[CudaInt8Linear]] = {}
    for m in model.modules():
        if isinstance(m, CudaInt8Linear) and not getattr(m, "lookup_only", False):
            shapes.setdefault(_shape(m), []).append(m)
    notes = []
    for shape, same in shapes.items():
        plan = None if cache is None else cache.checked(
            _key(same[0], dtype), from_json, lambda p, m=same[0]: works(p, m, dtype))
        kept = " (timed at an earlier start)" if plan is not None else ""
        if plan is None:
            plan = plan_shape(same[:8], dtype, reps, timer)
            if plan is not None and cache is not None:
                cache.put(_key(same[0], dtype), to_json(plan))
        for m in same:
            m.plan = plan
        if plan is not None:
            notes.append(f"{shape[0]}x{shape[1]}: " + ", ".join(
                f"{b} {r} {t.block_n}x{t.block_k}w{t.num_warps}" for b, (r, t) in plan.items())
                + kept)
    if notes:
        log.info("int8 layers: %d shapes; %s", len(notes), "; ".join(notes))


def _shape(m: CudaInt8Linear) -> tuple:
    return (m.out_features, m.in_features, tuple(m.groups),
            tuple(b.mins is not None for b in m.blocks()))


def _key(m: CudaInt8Linear, dtype: torch.dtype) -> str:
    n, k, groups, mins = _shape(m)
    return f"{device_key(m.codes0.device, dtype)}|{n}x{k}|g{list(groups)}|m{list(mins)}"


def to_json(plan: Plan) -> dict[str, Any]:
    return {str(b): [r, asdict(t)] for b, (r, t) in plan.items()}


def from_json(d: dict[str, Any]) -> Plan:
    return {int(b): (r, Tiles(**t)) for b, (r, t) in d.items()}


def _right(route: str, t: Tiles, layer: CudaInt8Linear, x: torch.Tensor, ref: torch.Tensor,
           warn: bool = True) -> bool:
    """``route`` with tiles ``t`` builds and gives ``ref`` (relative error under 2e-2)."""
    try:
        y = run_route(x, layer.blocks(), layer.out_features, route, t)
        err = ((y.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    except Exception as e:  # a Triton that cannot build it: leave it out
        if warn:
            log.warning("int8 %s %s %dx%d left out: %s", route, t, layer.out_features,
                        layer.in_features, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    if not err < 2e-2:
        if warn:
            log.warning("int8 %s %s %dx%d left out: relative error %.3g", route, t,
                        layer.out_features, layer.in_features, err)
        return False
    return True


def _race(cands: list[tuple[str, Tiles]], sample: list[CudaInt8Linear], x: torch.Tensor,
          ref: torch.Tensor, reps: int, timer: Timer, warn: bool = True
          ) -> tuple[str, Tiles] | None:
    """The fastest of ``cands`` (route, tiles) that builds and gives ``ref`` on x's rows."""
    timed = []
    for route, t in dict.fromkeys(cands):
        if _right(route, t, sample[0], x, ref, warn):
            def run(m: CudaInt8Linear, route: str = route, t: Tiles = t) -> torch.Tensor:
                return run_route(x, m.blocks(), m.out_features, route, t)
            run.choice, run.rows = (route, t), x.shape[0]  # type: ignore[attr-defined]  # tests' timers read them
            timed.append((timer(run, sample, reps), (route, t)))
    return min(timed, key=lambda r: r[0])[1] if timed else None


def plan_shape(sample: list[CudaInt8Linear], dtype: torch.dtype, reps: int,
               timer: Timer) -> Plan | None:
    """Each bucket's faster route (its tiles timed once: gemv at 1 row, skinny at 8); None
    where no candidate builds (the fixed rule then)."""
    first = sample[0]
    weight = first.dequantize()
    device = first.codes0.device
    gen = torch.Generator(device=device).manual_seed(0)

    def case(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(rows, first.in_features, device=device, generator=gen).to(dtype)
        return x, F.linear(x.float(), weight)

    x1, r1 = case(1)
    x8, r8 = case(8)
    best = [c for c in (
        _race([("gemv", t) for t in GEMV_CANDIDATES], sample, x1, r1, reps, timer),
        _race([("gemv2", t) for t in GEMV2_CANDIDATES], sample, x1, r1, reps, timer),
        _race([("skinny", t) for t in SKINNY_CANDIDATES], sample, x8, r8, reps, timer))
        if c is not None]
    if not best:
        return None
    plan: Plan = {}
    for b in ROUTE_BUCKETS:
        x, ref = (x1, r1) if b == 1 else (x8, r8) if b == 8 else case(b)
        # skinny pads a row to 16: at 1 row the GEMVs', where one builds
        races = ([c for c in best if c[0] != "skinny"] or best) if b == 1 else best
        choice = _race(races, sample, x, ref, reps, timer, warn=False)
        if choice is None:
            return None
        plan[b] = choice
    return plan


def works(plan: Plan, layer: CudaInt8Linear, dtype: torch.dtype) -> bool:
    """Every bucket's route gives the dequantised weight's product."""
    if set(plan) != set(ROUTE_BUCKETS):
        return False
    weight = layer.dequantize()
    gen = torch.Generator(device=weight.device).manual_seed(1)
    for b, (route, t) in plan.items():
        x = torch.randn(b, layer.in_features, device=weight.device, generator=gen).to(dtype)
        if not _right(route, t, layer, x, F.linear(x.float(), weight)):
            return False
    return True
