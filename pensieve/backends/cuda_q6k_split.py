"""Q6_K at 1-16 rows by the split-K FMA GEMV (``cuda_q6k_split_kernels.gemv_split``).

A ``Split`` is one launch's tiles: up to BLOCK_M rows (1, 2, 4, 8, 16), BLOCK_N outputs and
BLOCK_G groups of 32 columns a program step, K split over up to SPLIT_K programs of a column
tile (one launch, partials reduced in it through a workspace per N); ``words``: the kernel that
reads the code bytes as int32 words, four codes an op. The split actually used is the largest
that divides K's steps (``split_of``: G_PER · split == groups, no masks). A weight with
``SPLIT_MAX_N`` outputs or more (a head) has programs enough and never splits. These are
candidates only: ``cuda_q6k_tune`` checks and times them against the other kernels per weight
shape and row bucket at start. Importing this module needs neither a GPU nor Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from pensieve.backends import cuda_splitk as splitk
from pensieve.backends.cuda_int4 import block_g, triton_cdiv

SPLIT_MAX = 8  # the most programs a launch splits K over
SPLIT_MAX_N = 32768  # weights with as many outputs never split: no workspace for them
WS_ROWS = 16  # rows of x a workspace holds partials for (BLOCK_M ≤ 16)
MIN_BLOCK_N = 4  # the counters are one per 4 outputs


@dataclass(frozen=True)
class Split:
    """One launch of ``gemv_split``: BLOCK_M rows, BLOCK_N outputs, BLOCK_G groups a step, K
    over up to SPLIT_K programs."""

    block_m: int
    block_n: int
    block_g: int
    split_k: int
    num_warps: int
    num_stages: int = 1
    words: bool = False  # gemv_split_words: the code bytes as int32 words, 4 codes an op


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_q6k_split_kernels

    return cuda_q6k_split_kernels


def split_workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials (float32 [SPLIT_MAX, 16, N]; one element where N ≥ SPLIT_MAX_N) and counters
    (int32, one per 4 outputs, zero between calls: the kernel resets them), one pair per
    (device, N) shared by the layers of that N (serial on one stream). Made at
    ``cuda_q6k_tune.prepare``, before any graph capture."""
    partials = SPLIT_MAX * WS_ROWS * n if n < SPLIT_MAX_N else 1
    return splitk.workspace("q6k_split", device, n, partials, MIN_BLOCK_N)


def split_of(t: Split, n: int, groups: int) -> tuple[int, int]:
    """(BLOCK_G, split) a launch of ``t`` uses for N = ``n``, ``groups`` groups of 32: BLOCK_G
    cut to a divisor of the groups, the split the largest ≤ ``t.split_k`` dividing the steps
    (1 from ``SPLIT_MAX_N`` outputs)."""
    bg = block_g(groups, t.block_g)
    steps = groups // bg
    top = 1 if n >= SPLIT_MAX_N else min(t.split_k, SPLIT_MAX, steps)
    return bg, max(s for s in range(1, top + 1) if steps % s == 0)


def fits(t: Split, rows: int) -> bool:
    """Whether ``t`` may run ``rows`` rows of x."""
    return (0 < rows <= t.block_m <= WS_ROWS and t.block_n >= MIN_BLOCK_N
            and t.block_m & (t.block_m - 1) == 0)


def gemv_split(x: torch.Tensor, w: tuple[torch.Tensor, ...], y: torch.Tensor,
               t: Split) -> torch.Tensor:
    """y = x @ w.T (x: contiguous rows, at most ``t.block_m``) by ``gemv_split``."""
    m, k = x.shape
    n, groups = w[0].shape[0], k // 32
    if not fits(t, m):
        raise ValueError(f"gemv_split: {m} rows with {t}")
    bg, split = split_of(t, n, groups)
    ws, cnt = split_workspace(x.device, n)
    kernel = _kernels().gemv_split
    if t.words:  # int32 views of the code buffers (rows of K/2 and K/4 bytes: whole words)
        kernel = _kernels().gemv_split_words
        w = (w[0].view(torch.int32), w[1].view(torch.int32), *w[2:])
    kernel[(triton_cdiv(n, t.block_n), split)](
        x, *w, y, ws, cnt, m, n, groups, groups // split, x.stride(0), y.stride(0),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_G=bg, SPLIT_K=split,
        num_warps=t.num_warps, num_stages=t.num_stages)
    return y
