"""Q6_K at 4-16 rows of x by ``skinny2`` (``cuda_q6k_skinny2_kernels``): the int4 ``skinny2``'s
tensor-core product on ``cuda_q6k``'s layout — the 6-bit codes made ``mma.sync`` operands in
PTX (14 instructions for 8 weights: 6 code bytes), each Q6_K sub-block one K = 16 dot whose
float32 sums take ``d · sc``. Its tiles, the candidates ``cuda_q6k_tune`` races at the 4, 8
and 16-row buckets, and the launcher.

A ``Skinny2`` is one launch: BLOCK_N outputs a program, BLOCK_G (1, 2 or 4) groups of 32
columns a step (a step's groups share their super-block's ``d``), the codes' loads
NUM_STAGES deep, K over up to SPLIT_K programs — the split used is the largest ≤ SPLIT_K
dividing the steps, none from ``SPLIT_MAX_N`` outputs (a head), through ``rows``' workspace
(``cuda_q6k_rows.rows_workspace``: 16 splits of 16 rows). Rows up to 8 pad to an 8-row dot
(m16n8k16's own N), more to 16. Candidates only, chosen per weight shape and bucket where the
tuner found them right and faster on the GPU at hand (sm_90 builds here, Triton 3.9, 1-2
warps: mma.sync, 126-148 registers at 8 rows and 238-255 at 16, no spills, ~4.8-5.0 SASS
instructions a code byte in the loop at 8 rows and ~5.6-5.9 at 16 — ``rows``: ~8.2-8.5, the
int4 skinny2: ~5.6-6.4; none timed on a GPU yet). Importing this module needs neither a GPU
nor Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch

from pensieve.backends.cuda_int4 import triton_cdiv
from pensieve.backends.cuda_q6k_rows import SPLIT_MAX, SPLIT_MAX_N, WS_ROWS, rows_workspace

GROUP = 32
MAX_ROWS = 16


@dataclass(frozen=True)
class Skinny2:
    """One launch of Q6_K ``skinny2``: BLOCK_N outputs, BLOCK_G groups a step, K over up to
    SPLIT_K programs, NUM_STAGES of Triton's pipelined copies, NUM_WARPS."""

    block_n: int
    block_g: int
    split_k: int
    num_warps: int = 2
    num_stages: int = 3


# raced at start at 4, 8 and 16 rows (sm_90 builds, Triton 3.9 here: mma.sync, no spills —
# tests/unit/test_cuda_q6k_skinny2.py); 16-way splits for attn_v's 1024 outputs (8 or 16 tiles
# of outputs), 8-way for ffn_down's 4096; a head never splits
CANDIDATES = (
    Skinny2(128, 2, 8, 2, 3),
    Skinny2(64, 2, 16, 1, 3),
    Skinny2(128, 4, 8, 2, 3),
    Skinny2(64, 4, 16, 1, 3),
)

ENV = "PENSIEVE_Q6K_SKINNY2"  # "0": left out of the race


def candidates() -> tuple[Skinny2, ...]:
    return () if os.environ.get(ENV, "1") == "0" else CANDIDATES


def block_m(rows: int) -> int:
    """The dot's padded rows: 8 (m16n8k16's own N) up to 8 rows, else 16."""
    return 8 if rows <= 8 else 16


def fits(t: Skinny2, rows: int, k: int) -> bool:
    """Whether ``t`` may run ``rows`` rows of x at K = ``k``: a whole number of steps (BLOCK_G
    1, 2 or 4 groups, so that a step's groups share their ``d``), 16+ outputs a tile."""
    return (1 <= rows <= MAX_ROWS and k % GROUP == 0 and t.block_g in (1, 2, 4)
            and (k // GROUP) % t.block_g == 0 and (k // GROUP) % 8 == 0 and t.block_n >= 16
            and t.split_k >= 1)


def split_of(t: Skinny2, n: int, groups: int) -> int:
    """The split a launch of ``t`` uses: the largest ≤ ``t.split_k`` (and ``SPLIT_MAX``)
    dividing the steps; 1 from ``SPLIT_MAX_N`` outputs (no workspace there)."""
    steps = groups // t.block_g
    top = 1 if n >= SPLIT_MAX_N else min(t.split_k, SPLIT_MAX, steps)
    return max(s for s in range(1, top + 1) if steps % s == 0)


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_q6k_skinny2_kernels

    return cuda_q6k_skinny2_kernels


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gemm_skinny2(x: torch.Tensor, w: tuple[torch.Tensor, ...], y: torch.Tensor,
                 t: Skinny2) -> torch.Tensor:
    """y = x @ w.T (x: contiguous rows, at most 16; w: ``cuda_q6k``'s lo, hi, sc, d) by
    ``skinny2`` with ``t``; y may be a column slice of a wider output."""
    m, k = x.shape
    n, groups = w[0].shape[0], k // GROUP
    if not fits(t, m, k):
        raise ValueError(f"q6k skinny2: {m} rows, K={k} with {t}")
    split = split_of(t, n, groups)
    assert block_m(m) <= WS_ROWS
    ws, cnt = rows_workspace(x.device, n)
    sc = w[2].view(torch.int16)  # a group's two sub-scales as one int16 (little-endian)
    _kernels().skinny2[(triton_cdiv(n, t.block_n), split)](
        x, w[0], w[1], sc, w[3], y, ws, cnt, m, n, groups, groups // split, x.stride(0),
        y.stride(0), BLOCK_N=t.block_n, BLOCK_G=t.block_g, SPLIT_K=split,
        NUM_STAGES=t.num_stages, ASM=not _interpreted(), BLOCK_M=block_m(m),
        num_warps=t.num_warps, num_stages=1)  # the loop's: NUM_STAGES
    return y
