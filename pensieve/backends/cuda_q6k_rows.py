"""Q6_K at 1-16 rows (made for 4-16) by ``rows`` (``cuda_q6k_rows_kernels``): swap-AB tensor
cores on the code words.

A ``Rows`` is one launch's tiles: up to BLOCK_M (8 or 16) rows of x padded for the tensor cores,
BLOCK_N outputs and BLOCK_G groups of 32 columns a step, K over up to SPLIT_K programs of a
column tile (one launch, partials reduced in it through ``rows_workspace``: up to 16 splits
of 16 rows, counters per 16 outputs), ``prefetch``: the next one or two steps' code words and
x loaded into registers before this step's product. The split used is the largest ≤ SPLIT_K
dividing K's steps (``split_of``: no masks on the codes); a weight with ``SPLIT_MAX_N`` outputs
or more (a head) never splits. Candidates only: ``cuda_q6k_tune`` checks and times them
against the other kernels per weight shape and row bucket at start. Importing this module
needs neither a GPU nor Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from pensieve.backends import cuda_splitk as splitk
from pensieve.backends.cuda_int4 import block_g, triton_cdiv

SPLIT_MAX = 16  # the most programs a launch splits K over (a short N: 1024 outputs)
SPLIT_MAX_N = 32768  # weights with as many outputs never split: no workspace for them
WS_ROWS = 16  # rows of x a workspace holds partials for (BLOCK_M ≤ 16)


@dataclass(frozen=True)
class Rows:
    """One launch of ``rows``: BLOCK_M rows of x (8 or 16), BLOCK_N outputs (≥ 16), BLOCK_G
    groups a step, K over up to SPLIT_K programs."""

    block_m: int
    block_n: int
    block_g: int
    split_k: int
    num_warps: int
    num_stages: int
    prefetch: int = 0  # steps loaded into registers ahead (0, 1 / True, 2)


def rows_workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials (float32 [SPLIT_MAX, 16, N]; one element where N ≥ SPLIT_MAX_N) and counters
    (int32, one per 16 outputs, zero between calls: the kernel resets them), one pair per
    (device, N) shared by the layers of that N (serial on one stream). Made at
    ``cuda_q6k_tune.prepare``, before any graph capture."""
    partials = SPLIT_MAX * WS_ROWS * n if n < SPLIT_MAX_N else 1
    return splitk.workspace("q6k_rows", device, n, partials, 16)


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_q6k_rows_kernels

    return cuda_q6k_rows_kernels


def split_of(t: Rows, n: int, groups: int) -> tuple[int, int]:
    """(BLOCK_G, split) a launch of ``t`` uses for N = ``n`` and ``groups`` groups of 32: BLOCK_G
    cut to a divisor of the groups, the split the largest ≤ ``t.split_k`` (and ``SPLIT_MAX``)
    dividing the steps; 1 from ``SPLIT_MAX_N`` outputs (no workspace there)."""
    bg = block_g(groups, t.block_g)
    steps = groups // bg
    top = 1 if n >= SPLIT_MAX_N else min(t.split_k, SPLIT_MAX, steps)
    return bg, max(s for s in range(1, top + 1) if steps % s == 0)


def fits(t: Rows, rows: int) -> bool:
    """Whether ``t`` may run ``rows`` rows of x (the workspace holds 16 rows, counters per 16
    outputs)."""
    return 0 < rows <= t.block_m <= WS_ROWS and t.block_m in (8, 16) and t.block_n >= 16 \
        and t.block_n % 16 == 0


def gemm_rows(x: torch.Tensor, w: tuple[torch.Tensor, ...], y: torch.Tensor,
              t: Rows) -> torch.Tensor:
    """y = x @ w.T (x: contiguous rows, at most ``t.block_m``) by ``rows``."""
    m, k = x.shape
    n, groups = w[0].shape[0], k // 32
    if not fits(t, m):
        raise ValueError(f"q6k rows: {m} rows with {t}")
    bg, split = split_of(t, n, groups)
    ws, cnt = rows_workspace(x.device, n)
    lo, hi = w[0].view(torch.int32), w[1].view(torch.int32)  # rows of K/2, K/4 bytes: words
    _kernels().rows[(triton_cdiv(n, t.block_n), split)](
        x, lo, hi, w[2], w[3], y, ws, cnt, m, n, groups, groups // split, x.stride(0),
        y.stride(0), BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_G=bg, SPLIT_K=split,
        PREFETCH=int(t.prefetch), num_warps=t.num_warps, num_stages=t.num_stages)
    return y
