"""Route every ``CudaInt4Linear`` of a model on the GPU to its fastest kernels (``cuda_int4.Plan``).

Per weight shape (q/k/v, o, gate/up, down each once: the layers of a shape share one plan), the
kernels and tiles that apply are checked against the dequantised weight and timed on up to 8
layers of the shape back to back, as a decode step runs them:

* 1 and 2 rows: ``gemv_words`` (its tiles timed at 1 row) against the older ``gemv`` (with and
  without prefetching the next step) and, in bfloat16, ``gemv_wide``
  (``cuda_int4_gemv_wide.candidates()`` timed at 1 row);
* 1-4 rows: ``gemv_split`` too (``cuda_int4_gemv.candidates()`` timed at 1 row, the fastest
  then against the others at 1, 2 and 4 rows);
* 2-16 rows: ``gemv_rows`` (``cuda_int4_rows.candidates(bucket)`` timed at the bucket's rows,
  the fastest per bucket then against the others);
* 2-32 rows: ``skinny`` (its tiles timed at 8 rows; past 16 rows it pads to 32);
* 4-16 rows: ``skinny2`` (``cuda_int4_skinny2.candidates()`` timed at the bucket's rows, the
  fastest per bucket then against the others);
* 32, 256 and 2048 rows (and beyond): the dequantising ``gemm``'s tiles, and at 2048 rows the
  weight dequantised into a temporary + cuBLAS (nothing kept);
* with ``keep_dense`` (opt-in, ``--keep-dense-weights``): tinygemm and cuBLAS on dense copies too,
  made where they fit in 40% of the free GPU memory.

That is the whole race (``PENSIEVE_TUNE_FULL=1``). By default it is lean: the families that never
won a bucket on an H100 in session 13's served runs (Qwen2.5-7B, GLM-4.7-Flash shapes) are left
out — in bfloat16 ``gemv_words`` and the prefetching ``gemv`` (``gemv_wide``/``gemv_split`` serve
1-2 rows), ``gemv_rows`` from 4 rows (``skinny``/``skinny2``), the GEMM's tiles at 32 rows where
``skinny`` fits and at 2048 (dequantise + cuBLAS, ~3x faster) — the plain ``gemv`` staying in as
a fallback: fewer compiles at a cold start.

A candidate that fails to build or gives a wrong product (relative error over 2e-2 against the
dequantised weight) is left out with a warning, so one bad tile cannot break a start. GPU time
only: calls queue behind a sleep kernel, so Python's launch cost stays out, as in a CUDA graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends import (
    cuda_int4_gemv, cuda_int4_gemv_wide, cuda_int4_plan_cache, cuda_int4_rows, cuda_int4_skinny2,
    tinygemm,
)
from pensieve.backends.cuda_int4 import (
    GEMM_BUCKETS, GEMM_CANDIDATES, ROUTE_BUCKETS, SKINNY_CANDIDATES, SKINNY_MAX_ROWS,
    WORDS_CANDIDATES, CudaInt4Linear, Plan, Skinny, default_plan, dequantize, gemm, gemv, gemv_words,
    scales_offsets, skinny, skinny_workspace, unpack_codes,
)
from pensieve.backends.tune_cache import full_race

log = logging.getLogger(__name__)

Run = Callable[[CudaInt4Linear], torch.Tensor]


def prepare(model: nn.Module, dtype: torch.dtype, keep_dense: bool = False,
            reps: int = 15) -> None:
    """Plan every ``CudaInt4Linear`` of ``model`` (on the GPU, in ``dtype``)."""
    layers = [m for m in model.modules()  # an untied embedding's table is only looked up
              if isinstance(m, CudaInt4Linear) and not getattr(m, "lookup_only", False)]
    if not layers:
        return
    device = layers[0].packed.device
    extra = ""
    if keep_dense:
        extra = _keep_dense(layers, dtype, device)
    for m in layers:
        skinny_workspace(device, m.out_features)
    codes = sum(m.packed.nbytes + m.scale_offset.nbytes for m in layers)
    log.info("int4 layers: %d, %.2f GiB of codes%s; %s", len(layers), codes / 2**30, extra,
             _plan_all(layers, dtype, reps))


def _keep_dense(layers: list[CudaInt4Linear], dtype: torch.dtype, device: torch.device,
                max_fraction: float = 0.4) -> str:
    """The opt-in copies: tinygemm's layout (bfloat16, where the op works) and dense weights
    if all fit in ``max_fraction`` of the free GPU memory."""
    if dtype == torch.bfloat16 and tinygemm.works(str(device)):
        for m in layers:
            if tinygemm.supported(m.in_features):
                scales, offsets = scales_offsets(m.scale_offset)
                m.tiny = tinygemm.pack(unpack_codes(m.packed), scales, offsets)
    need = sum(m.in_features * m.out_features for m in layers) * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    if need <= max_fraction * free:
        for m in layers:
            m.dense = dequantize(m.packed, m.scale_offset, dtype)
    tiny = sum(m.tiny.packed.nbytes + m.tiny.scales_and_zeros.nbytes for m in layers
               if m.tiny is not None)
    dense = need if layers[0].dense is not None else 0
    return f" + kept: tinygemm {tiny / 2**30:.2f} GiB, dense {dense / 2**30:.2f} GiB"


def gpu_us(run: Run, layers: list[CudaInt4Linear], reps: int) -> float:
    """Median GPU µs of ``run(layer)`` cycling through ``layers``, launches queued behind a
    sleeping kernel so that Python's launch cost stays out, as it does in a CUDA graph."""
    for m in layers:  # compile, warm up
        run(m)
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(3_000_000)  # ~1.5 ms: the launches below queue up meanwhile
        start.record()
        for m in layers:
            run(m)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(layers))
    return sorted(samples)[reps // 2] * 1e3


def _checked(run: Run, first: CudaInt4Linear, ref: torch.Tensor, name: str) -> bool:
    """``run`` builds and gives ``ref``, the dequantised weight's product (relative error
    under 2e-2)."""
    try:
        err = ((run(first).float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    except Exception as e:  # a Triton that cannot build it: leave it out
        log.warning("int4 %s %dx%d left out: %s", name, first.out_features, first.in_features,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    if not err < 2e-2:
        log.warning("int4 %s %dx%d left out: relative error %.3g", name, first.out_features,
                    first.in_features, err)
        return False
    return True


def fastest(runs: dict[str, Run], sample: list[CudaInt4Linear], x: torch.Tensor,
            reps: int) -> tuple[str | None, dict[str, float]]:
    """The name of the fastest of ``runs`` that pass ``_checked``, and every one's µs."""
    if not runs:
        return None, {}
    first = sample[0]
    ref = F.linear(x.float(), dequantize(first.packed, first.scale_offset, torch.float32))
    times = {name: gpu_us(run, sample, reps) for name, run in runs.items()
             if _checked(run, first, ref, name)}
    return (min(times, key=times.get) if times else None), times


def _plan_all(layers: list[CudaInt4Linear], dtype: torch.dtype, reps: int) -> str:
    by_shape: dict[tuple[int, int], list[CudaInt4Linear]] = {}
    for m in layers:
        by_shape.setdefault((m.out_features, m.in_features), []).append(m)
    notes = []
    for (n, k), group in by_shape.items():
        plan = cuda_int4_plan_cache.load(group[0], dtype)  # an earlier start's, checked
        if plan is not None:
            note = f"{plan.route} (timed at an earlier start)"
        else:
            plan, note = plan_shape(group[:8], dtype, reps)
            cuda_int4_plan_cache.store(group[0], dtype, plan)
        for m in group:
            m.plan = plan
        notes.append(f"{n}x{k}: {note}")
    return "µs per call, fastest first: " + "; ".join(notes)


def _fmt(times: dict[str, float]) -> str:
    return ", ".join(f"{k} {t:.1f}" for k, t in sorted(times.items(), key=lambda kv: kv[1]))


def plan_shape(sample: list[CudaInt4Linear], dtype: torch.dtype,
               reps: int) -> tuple[Plan, str]:
    """The timed plan for the layers of one shape (``sample``: up to 8 of them)."""
    first = sample[0]
    k, device = first.in_features, first.packed.device
    plan = default_plan(k, first.dense, first.tiny)
    notes = []
    full = full_race()
    # in bfloat16 gemv_wide and gemv_split serve 1-2 rows: gemv_words and the prefetching gemv
    # never won a bucket there (session 13's tables), so only the whole race times them
    lean = dtype == torch.bfloat16 and not full
    x1 = torch.randn(1, k, device=device, dtype=dtype)
    words = {str(c): (lambda m, c=c: gemv_words(x1, m.packed, m.scale_offset, c))
             for c in WORDS_CANDIDATES}
    best, times = (None, {}) if lean else fastest(words, sample, x1, reps)
    if best is not None:
        plan.words = next(c for c in WORDS_CANDIDATES if str(c) == best)
    if dtype == torch.bfloat16:
        wides = {str(c): (lambda m, c=c: cuda_int4_gemv_wide.gemv_wide(x1, m.packed,
                                                                        m.scale_offset, c))
                 for c in cuda_int4_gemv_wide.candidates()}
        wide, _ = fastest(wides, sample, x1, reps)
        plan.wide = next((c for c in cuda_int4_gemv_wide.candidates() if str(c) == wide), None)
    plan.skinny = _choose_skinny(sample, dtype, reps)
    splits = {str(c): (lambda m, c=c: cuda_int4_gemv.gemv_split(x1, m.packed, m.scale_offset, c))
              for c in cuda_int4_gemv.candidates()}
    split, _ = fastest(splits, sample, x1, reps)
    plan.split = next((c for c in cuda_int4_gemv.candidates() if str(c) == split), None)
    for rows in ROUTE_BUCKETS:
        x = torch.randn(rows, k, device=device, dtype=dtype)
        runs: dict[str, Run] = {}
        if rows <= 2:
            if best is not None:
                runs["words"] = lambda m, x=x: gemv_words(x, m.packed, m.scale_offset, plan.words)
            runs["gemv"] = lambda m, x=x: gemv(x, m.packed, m.scale_offset)
            if not lean:
                runs["gemv_pf"] = lambda m, x=x: gemv(x, m.packed, m.scale_offset, prefetch=True)
            if plan.wide is not None:
                runs["wide"] = lambda m, x=x: cuda_int4_gemv_wide.gemv_wide(
                    x, m.packed, m.scale_offset, plan.wide)
        if rows <= 4 and plan.split is not None:
            runs["split"] = lambda m, x=x: cuda_int4_gemv.gemv_split(x, m.packed, m.scale_offset,
                                                                     plan.split)
        if rows == 2 or (rows > 1 and full):  # from 4 rows skinny/skinny2 always won
            tiles = _choose_rows(sample, x, rows, reps)
            if tiles is not None:
                plan.rows[rows] = tiles
                runs["rows"] = lambda m, x=x, t=tiles: cuda_int4_rows.gemv_rows(
                    x, m.packed, m.scale_offset, t)
        if rows > 1 and plan.skinny is not None:
            runs["skinny"] = lambda m, x=x: skinny(x, m.packed, m.scale_offset, plan.skinny)
        if rows >= 4:
            tiles2 = _choose_skinny2(sample, x, reps)
            if tiles2 is not None:
                plan.skinny2[rows] = tiles2
                runs["skinny2"] = lambda m, x=x, t=tiles2: cuda_int4_skinny2.skinny2(
                    x, m.packed, m.scale_offset, t)
        if first.tiny is not None:
            runs["tinygemm"] = lambda m, x=x: m.tiny(x)
        if first.dense is not None and rows > 1:
            runs["dense"] = lambda m, x=x: F.linear(x, m.dense)
        name, times = fastest(runs, sample, x, reps)
        plan.route[rows] = name or "gemm"
        notes.append(f"×{rows} {_fmt(times)}")
    for rows in GEMM_BUCKETS:
        x = torch.randn(rows, k, device=device, dtype=dtype)
        few = sample[:4] if rows > 256 else sample
        r = max(3, reps // 3) if rows > 256 else reps
        # the GEMM's tiles lost every race to skinny at 32 rows (~2x) and to dequantise +
        # cuBLAS at 2048 (~3x): the lean race times them only at 256 (or where skinny fails)
        skip = not full and (rows == GEMM_BUCKETS[-1]
                             or (rows <= SKINNY_MAX_ROWS and plan.skinny is not None))
        cands = {} if skip else {
            str(c): (lambda m, x=x, c=c: gemm(x, m.packed, m.scale_offset, c))
            for c in GEMM_CANDIDATES[rows]}
        tiles, times = fastest(cands, few, x, r)
        runs: dict[str, Run] = {}
        if tiles is not None:
            plan.gemm[rows] = next(c for c in GEMM_CANDIDATES[rows] if str(c) == tiles)
            runs["gemm"] = lambda m, x=x, c=plan.gemm[rows]: gemm(x, m.packed, m.scale_offset, c)
        if rows <= SKINNY_MAX_ROWS and plan.skinny is not None:  # 17-32 rows: read the codes once
            runs["skinny"] = lambda m, x=x: skinny(x, m.packed, m.scale_offset, plan.skinny)
        if rows == GEMM_BUCKETS[-1]:
            runs["dequant"] = lambda m, x=x: F.linear(x, dequantize(m.packed, m.scale_offset,
                                                                     x.dtype))
        if first.dense is not None:
            runs["dense"] = lambda m, x=x: F.linear(x, m.dense)
        name, choice = fastest(runs, few, x, r)
        plan.route[rows] = name or "dequant"
        notes.append(f"×{rows} {_fmt(choice)} (gemm tiles: {_fmt(times)})")
    return plan, (f"{plan.route}, words {plan.words}, wide {plan.wide}, split {plan.split}, "
                  f"skinny {plan.skinny}; "
                  + "; ".join(notes))


def _choose_skinny(sample: list[CudaInt4Linear], dtype: torch.dtype,
                   reps: int) -> Skinny | None:
    """The fastest of ``SKINNY_CANDIDATES`` that fit K, timed at 8 rows (the kernel pads to 16,
    so its time hardly depends on the rows); None where none fits or builds."""
    first = sample[0]
    x = torch.randn(8, first.in_features, device=first.packed.device, dtype=dtype)
    runs = {str(c): (lambda m, c=c: skinny(x, m.packed, m.scale_offset, c))
            for c in SKINNY_CANDIDATES if c.fits(first.in_features)}
    best, _ = fastest(runs, sample, x, reps)
    return next((c for c in SKINNY_CANDIDATES if str(c) == best), None)


def _choose_rows(sample: list[CudaInt4Linear], x: torch.Tensor, bucket: int,
                 reps: int) -> cuda_int4_rows.Rows | None:
    """The fastest right ``gemv_rows`` tiles for a bucket of rows (x: that many rows); None
    where none fits or builds."""
    n, k = sample[0].out_features, sample[0].in_features
    cands = [c for c in cuda_int4_rows.candidates(bucket)
             if cuda_int4_rows.fits(c, bucket, n, k)]
    runs = {str(c): (lambda m, c=c: cuda_int4_rows.gemv_rows(x, m.packed, m.scale_offset, c))
            for c in cands}
    best, _ = fastest(runs, sample, x, reps)
    return next((c for c in cands if str(c) == best), None)


def _choose_skinny2(sample: list[CudaInt4Linear], x: torch.Tensor,
                    reps: int) -> cuda_int4_skinny2.Skinny2 | None:
    """The fastest right ``skinny2`` tiles for x's rows; None where none fits or builds."""
    rows, k = x.shape
    cands = [c for c in cuda_int4_skinny2.candidates() if cuda_int4_skinny2.fits(c, rows, k)]
    runs = {str(c): (lambda m, c=c: cuda_int4_skinny2.skinny2(x, m.packed, m.scale_offset, c))
            for c in cands}
    best, _ = fastest(runs, sample, x, reps)
    return next((c for c in cands if str(c) == best), None)
