"""The expert-major GEMV of the fused MoE at a few tokens (decode at 2-16 streams): one program
per (expert, BLOCK_N outputs) finds on the device the tokens that picked its expert and runs
that expert's weight tile once for all of them (``cuda_moe_kernels.expert_rows``: dequantised
in registers, on the tensor cores); an expert no token picked exits at once.

``pick_gemv`` reads an expert's slice once per pick: at 8 tokens × top-4 over 32 experts
(gpt-oss) ~32 slices where ~20 distinct experts were picked. Here a token picks an expert at
most once (top-k ids are distinct), so an expert's rows are at most the T tokens: BLOCK_M ≥ T
rows, token t's row live where one of its picks is the expert (``j`` its slot: pick
``t·TOPK + j``). No sort, no host sync; the grid (E, cdiv(N_out, BLOCK_N)) is fixed by the
shapes: CUDA graphs capture it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_moe_kernels import expert_rows


@triton.jit
def expert_gemv(X, IDS, RW, W, S, MN, D, B, Y, T, N, K, stride_x, stride_y,
                TOPK: tl.constexpr, K_PAD: tl.constexpr, GATHER: tl.constexpr,
                FUSE: tl.constexpr, ROUTED: tl.constexpr, INT4: tl.constexpr,
                SIX: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr,
                HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, ALPHA: tl.constexpr,
                LIMIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, FP4: tl.constexpr = False, SWAP: tl.constexpr = False,
                Q4K: tl.constexpr = False):
    """y[picks of expert program 0, outputs of program 1]; ``IDS`` [T·TOPK] the picks' experts
    (token-major); T ≤ BLOCK_M; K_PAD a power of two ≥ TOPK; ``FP4``, ``SWAP``, ``Q4K``: as
    ``expert_rows``'."""
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    tok = tl.arange(0, BLOCK_M)
    j = tl.arange(0, K_PAD)
    live = (tok < T)[:, None] & (j < TOPK)[None, :]
    hit2 = (tl.load(IDS + tok[:, None] * TOPK + j[None, :], mask=live, other=-1) == e) & live
    hit = tl.max(hit2.to(tl.int32), axis=1)
    if tl.max(hit, axis=0) == 0:  # no token picked this expert
        return
    mmask = hit > 0
    pick = tok.to(tl.int64) * TOPK + tl.sum(tl.where(hit2, j[None, :], 0), axis=1)
    pick = tl.where(mmask, pick, 0)
    if GATHER:
        row = tl.where(mmask, tok, 0).to(tl.int64)
    else:
        row = pick
    expert_rows(X, RW, W, S, MN, D, B, Y, row, pick, mmask, e.to(tl.int64), pid_n, N, K,
                stride_x, stride_y, FUSE, ROUTED, INT4, SIX, GS, HAS_MIN, HAS_BIAS, SWIGLU,
                ALPHA, LIMIT, BLOCK_M, BLOCK_N, BLOCK_K, FP4, SWAP, Q4K)
