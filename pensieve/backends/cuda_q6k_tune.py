"""Route every ``CudaQ6KLinear`` of a model on the GPU to its fastest kernels (``cuda_q6k.Plan``).

Per weight shape (the layers of a shape share one plan; a vocabulary-sized head is a shape like
any other), each candidate runs once against the dequantised weight (relative error under
2e-2) and those that build and are right are timed on up to 8 layers of the shape back to back
(``cuda_int4_tune.gpu_us``: GPU time only, as in a CUDA graph). First each family's tiles:

* ``gemv`` at 1 row; ``skinny`` with 32-row tiles at 32 (split-K candidates only below
  ``SPLIT_MAX_N`` outputs); ``dequant`` (the weight into a temporary + cuBLAS) at 32 rows,
  where the dequantisation is most of its time;

then per row bucket the families that apply race: 1 row gemv, ``split`` (the split-K FMA
GEMV of ``cuda_q6k_split``, tiles of that bucket's rows) and ``rows`` (``cuda_q6k_rows``:
swap-AB tensor cores on the code words, every tile, 1-16 rows); 2 rows gemv, split, rows and
every 16-row skinny tile; 4-16 split, rows, ``skinny2`` (``cuda_q6k_skinny2``: the codes made
mma.sync operands in PTX), every 16-row skinny tile and the dequantising ``gemm``'s 16-row
tile;
32 skinny, gemm and dequant; 256 and 2048 (prefill) the gemm's tiles and dequant. That is the
whole race (``PENSIEVE_TUNE_FULL=1``); by default it is lean, leaving out what never won a
bucket on an H100 in session 13's served runs (Qwen2.5-7B's, GLM-4.7-Flash's Q6_K shapes, heads
included): the gemv's other tiles (its default stays as a fallback), skinny's 16-row tiles but
the default, split from 4 rows (rows won) and the gemm at 256 and 2048 (dequant won). A candidate that fails to build or is wrong is left out
with a warning; a bucket with none right takes the reference dequantise + matmul ("torch"), so
that a Triton that cannot compile a tile slows the start's Q6_K layers down instead of breaking
it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends import cuda_q6k_plan_cache
from pensieve.backends.cuda_q6k import (
    BUCKETS, DEQUANT, GEMM, GEMM16, GEMM_SMALL, GEMV, SKINNY16, SKINNY32, Choice, CudaQ6KLinear,
    Plan, Skinny, Tiles, dequantize, launch, skinny_fits, skinny_workspace,
)
from pensieve.backends import cuda_q6k_skinny2
from pensieve.backends.cuda_q6k_rows import Rows, rows_workspace
from pensieve.backends.cuda_q6k_skinny2 import Skinny2
from pensieve.backends.cuda_q6k_split import Split, split_workspace
from pensieve.backends.tune_cache import TuneCache, full_race

log = logging.getLogger(__name__)

# per family, the first the untimed default
# (the last two: 16 weights a thread a step — two 8-byte runs of each code buffer in flight —
# instead of 4-8; unmeasured, bench/gpu_q6k.py lists every one at 1 row)
# the last two load the next step's code bytes before this step's products (two in flight)
GEMV_CANDIDATES = (GEMV, Tiles(1, 4, 8, 4, 2), Tiles(1, 16, 8, 4, 2), Tiles(1, 8, 16, 4, 2),
                   Tiles(1, 16, 16, 4, 2), Tiles(1, 16, 8, 2, 2),
                   Tiles(1, 8, 8, 4, 2, prefetch=True), Tiles(1, 16, 8, 4, 2, prefetch=True))
# (split-K where N is short, so that ~2+ programs run per SM; one split of wide tiles for a
# head-sized N, where only split_k == 1 fits; all build for sm_90 without a spill, 72-128
# registers with 16-divisible arguments)
SKINNY_CANDIDATES = {
    16: (SKINNY16, Skinny(16, 64, 4, 1, 4, 3), Skinny(16, 64, 2, 8, 4, 3),
         Skinny(16, 128, 4, 2, 8, 3), Skinny(16, 32, 8, 4, 4, 3), Skinny(16, 128, 4, 1, 8, 3),
         # more programs for a short N (1024-4096 outputs: 256-1024 programs), fewer stages
         Skinny(16, 32, 4, 8, 4, 2), Skinny(16, 16, 4, 8, 2, 2), Skinny(16, 64, 4, 8, 4, 2),
         Skinny(16, 32, 8, 8, 4, 2)),
    32: (SKINNY32, Skinny(32, 64, 4, 1, 4, 3), Skinny(32, 128, 2, 2, 8, 3),
         Skinny(32, 128, 4, 1, 8, 3)),
}
GEMM_CANDIDATES = {
    16: (GEMM16,),
    32: (Tiles(32, 64, 4, 4, 3),),
    256: (GEMM_SMALL, Tiles(64, 128, 2, 8, 3), Tiles(32, 64, 4, 4, 3)),
    2048: (GEMM, Tiles(128, 64, 2, 8, 3), Tiles(64, 256, 2, 8, 3)),
}
# the split-K FMA GEMV per bucket (block_m = the bucket's rows): ~16 code bytes a thread a step,
# K over up to 4-8 programs (cut to a divisor of the steps; none for a head-sized N); all
# build for sm_90 without a spill (tests/unit/test_cuda_q6k_split.py)
SPLIT_CANDIDATES = {
    1: (Split(1, 8, 8, 4, 2), Split(1, 8, 8, 8, 2), Split(1, 16, 8, 4, 4), Split(1, 4, 16, 8, 2),
        Split(1, 16, 4, 2, 2), Split(1, 32, 4, 1, 4),
        # the codes as int32 words (fewer bit ops a code: 8.9 vs 10.9 sm_90 instructions a
        # weight in the loop, but shuffles through shared memory there)
        Split(1, 8, 8, 4, 2, words=True), Split(1, 16, 8, 4, 4, words=True)),
    2: (Split(2, 8, 8, 4, 2), Split(2, 8, 8, 8, 2), Split(2, 16, 8, 4, 4), Split(2, 32, 4, 1, 4),
        Split(2, 8, 8, 4, 2, words=True)),
    4: (Split(4, 8, 4, 4, 2), Split(4, 8, 8, 4, 2), Split(4, 16, 4, 4, 4), Split(4, 8, 4, 8, 2)),
    8: (Split(8, 8, 4, 4, 2), Split(8, 8, 4, 8, 2), Split(8, 16, 4, 4, 4), Split(8, 8, 2, 8, 2)),
    16: (Split(16, 8, 2, 4, 2), Split(16, 8, 4, 4, 4), Split(16, 4, 4, 8, 2)),
}
# ``rows`` at 1-16 rows (made for 4-16; 16-row tiles, 8-row ones up to 8 rows: wgmma's n = 8,
# half the accumulators and x tile): the next one or two steps' code words and x loaded into
# registers before this step's product (prefetch 1/2) — 5.5-7.3 sm_90 SASS instructions a
# weight in the loop (Triton 3.9) against ~9 for skinny's, 66-127 registers, no spill; K over
# up to 16 programs where N is short (attn_v's 1024 outputs: 16 × 16 programs), 32-output
# tiles there too (mma.sync); two on Triton's shared-memory pipeline (cp.async, 3 stages)
# instead of registers (~7.6 a weight); 256 outputs for a head (no split)
ROWS_CANDIDATES = (Rows(16, 64, 2, 8, 4, 1, 1), Rows(16, 64, 2, 8, 4, 1, 2),
                   Rows(16, 64, 4, 8, 4, 1, 1), Rows(16, 128, 2, 8, 8, 1, 1),
                   Rows(16, 128, 2, 8, 8, 1, 2), Rows(16, 128, 4, 8, 8, 1, 1),
                   Rows(16, 64, 2, 16, 4, 1, 1), Rows(16, 32, 2, 16, 4, 1, 2),
                   Rows(16, 64, 4, 8, 4, 3, 0), Rows(16, 128, 4, 8, 8, 3, 0),
                   Rows(16, 256, 2, 1, 8, 1, 1),
                   Rows(8, 64, 2, 8, 4, 1, 1), Rows(8, 128, 2, 8, 8, 1, 1))
DEQUANT_CANDIDATES = (DEQUANT, Tiles(1, 8, 16, 4, 1), Tiles(1, 32, 8, 8, 1))
ROWS = {b: b for b in BUCKETS}  # rows each bucket is timed at (tests pass fewer)

Run = Callable[[CudaQ6KLinear], torch.Tensor]
Timer = Callable[[Run, list[CudaQ6KLinear], int], float]


def prepare(model: nn.Module, dtype: torch.dtype, reps: int = 10, timer: Timer | None = None,
            rows: Mapping[int, int] = ROWS, cache: TuneCache | None = None) -> None:
    """Plan every ``CudaQ6KLinear`` of ``model`` (on the GPU, in ``dtype``; an untied
    embedding's table, only looked up, is left alone) and make the skinny kernel's workspaces.
    ``timer``: GPU µs of a run over layers (``cuda_int4_tune.gpu_us``; tests pass their own).
    Plans timed on the GPU are kept between starts (``cuda_q6k_plan_cache``; ``cache``: where,
    by default the plan cache of the GPU timer, none for a test's timer)."""
    if timer is None:
        from pensieve.backends.cuda_int4_tune import gpu_us as timer

        cache = cache or cuda_q6k_plan_cache.PLANS
    layers = [m for m in model.modules()
              if isinstance(m, CudaQ6KLinear) and not getattr(m, "lookup_only", False)]
    shapes: dict[tuple[int, int], list[CudaQ6KLinear]] = {}
    for m in layers:
        shapes.setdefault((m.out_features, m.in_features), []).append(m)
        skinny_workspace(m.lo.device, m.out_features)
        split_workspace(m.lo.device, m.out_features)
        rows_workspace(m.lo.device, m.out_features)
    notes = []
    for (n, k), same in shapes.items():
        plan = None if cache is None else cuda_q6k_plan_cache.load(same[0], dtype, cache)
        kept = " (timed at an earlier start)" if plan is not None else ""
        if plan is None:
            plan = plan_shape(same[:8], dtype, reps, timer, rows)
            if cache is not None:
                cuda_q6k_plan_cache.store(same[0], dtype, plan, cache)
        for m in same:
            m.plan = plan
        notes.append(f"{n}x{k}: " + ", ".join(f"{b} {describe(c)}" for b, c in plan.items())
                     + kept)
    if layers:
        held = sum(sum(b.nbytes for b in m.weight_buffers()) for m in layers)
        log.info("Q6_K layers: %d, %.2f GiB of codes; %s", len(layers), held / 2**30,
                 "; ".join(notes))


def describe(c: Choice) -> str:
    """A choice in a few characters: ``skinny 16x64x4/4`` (block_m x block_n x block_g / split)."""
    name, t = c
    if t is None:
        return name
    if isinstance(t, Skinny2):  # rows padded at run time: block_n x block_g / split, warps
        return f"{name} {t.block_n}x{t.block_g}/{t.split_k} w{t.num_warps} s{t.num_stages}"
    if isinstance(t, (Skinny, Split, Rows)):
        words = " w" if getattr(t, "words", False) else ""
        pf = ""
        if isinstance(t, Rows):  # registers' prefetch depth, Triton's pipeline stages
            pf = (f" pf{int(t.prefetch)}" if t.prefetch else "") \
                + (f" s{t.num_stages}" if t.num_stages != 1 or not t.prefetch else "")
        return f"{name} {t.block_m}x{t.block_n}x{t.block_g}/{t.split_k}{words}{pf}"
    return f"{name} {t.block_m}x{t.block_n}x{t.block_g}{' pf' if t.prefetch else ''}"


def plan_shape(sample: list[CudaQ6KLinear], dtype: torch.dtype, reps: int, timer: Timer,
               rows: Mapping[int, int] = ROWS) -> Plan:
    """Each bucket's fastest right choice for the layers in ``sample`` (one shape)."""
    first = sample[0]
    n, k = first.out_features, first.in_features
    weight = dequantize(*first.weight_buffers())
    gen = torch.Generator(device=weight.device).manual_seed(0)
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def case(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if b not in inputs:
            x = torch.randn(rows.get(b, b), k, device=weight.device, generator=gen).to(dtype)
            inputs[b] = x, F.linear(x.float(), weight)
        return inputs[b]

    def best(choices: Sequence[Choice], b: int) -> Choice | None:
        x, ref = case(b)
        few = sample[:4] if b > 256 else sample
        r = max(3, reps // 3) if b > 256 else reps
        return fastest(choices, few, x, ref, r, timer)

    full = full_race()
    gemv = best([("gemv", t) for t in (GEMV_CANDIDATES if full else GEMV_CANDIDATES[:1])], 1)
    sk16 = [("skinny", t) for t in (SKINNY_CANDIDATES[16] if full else SKINNY_CANDIDATES[16][:1])
            if skinny_fits(t, n)]
    sk32 = best([("skinny", t) for t in SKINNY_CANDIDATES[32] if skinny_fits(t, n)], 32)
    dq = best([("dequant", t) for t in DEQUANT_CANDIDATES], 32)
    plan: Plan = {}
    for b in BUCKETS:
        split: list[Choice] = [("split", t) for t in SPLIT_CANDIDATES.get(b, ())
                               if full or b <= 2]
        rows_tc: list[Choice] = [("rows", t) for t in ROWS_CANDIDATES if t.block_m >= b]
        # skinny2 at 4-16 rows (cuda_q6k_skinny2; PENSIEVE_Q6K_SKINNY2=0: left out)
        rows_tc += [("skinny2", t) for t in cuda_q6k_skinny2.candidates()
                    if 4 <= b <= 16 and cuda_q6k_skinny2.fits(t, b, k)]
        if b == 1:
            cands = [gemv, *split, *rows_tc]
        elif b == 2:
            cands = [gemv, *split, *rows_tc, *sk16]
        elif b <= 16:
            cands = split + rows_tc + sk16 + [("gemm", t) for t in GEMM_CANDIDATES[16]]
        else:
            cands = [sk32] if b == 32 else []
            cands += [("gemm", t) for t in GEMM_CANDIDATES[b] if full or b == 32] + [dq]
        choice = best([c for c in cands if c is not None], b)
        if choice is None:
            log.warning("Q6_K %dx%d at %d rows: no kernel builds and is right; dequantise "
                        "+ matmul", n, k, b)
        plan[b] = choice or ("torch", None)
        inputs.pop(b, None)
    return plan


def fastest(choices: Sequence[Choice], sample: list[CudaQ6KLinear], x: torch.Tensor,
            ref: torch.Tensor, reps: int, timer: Timer) -> Choice | None:
    """The fastest of ``choices`` that builds and gives ``ref`` (relative error under 2e-2)
    on ``sample[0]``; None where none does. A single right choice is not timed."""
    timed: list[tuple[float, Choice]] = []
    right = [c for c in dict.fromkeys(choices) if checked(c, sample[0], x, ref)]
    if len(right) == 1:
        return right[0]
    for c in right:
        def run(m: CudaQ6KLinear, c: Choice = c) -> torch.Tensor:
            return launch(c, x, m.weight_buffers())
        run.choice = c  # type: ignore[attr-defined]  # what it runs (tests' timers read it)
        timed.append((timer(run, sample, reps), c))
    return min(timed, key=lambda r: r[0])[1] if timed else None


def checked(c: Choice, first: CudaQ6KLinear, x: torch.Tensor, ref: torch.Tensor) -> bool:
    """``c`` builds and gives ``ref`` on ``first``; else left out with a warning."""
    try:
        y = launch(c, x, first.weight_buffers())
        err = ((y.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    except Exception as e:  # a Triton that cannot build it
        log.warning("Q6_K %s %dx%d left out: %s", describe(c), first.out_features,
                    first.in_features, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    if not err < 2e-2:
        log.warning("Q6_K %s %dx%d left out: relative error %.3g", describe(c),
                    first.out_features, first.in_features, err)
        return False
    return True
