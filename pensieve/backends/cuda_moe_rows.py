"""The MoE expert GEMV on the CUDA cores, expert-major (``cuda_moe_rows_kernels.rows_gemv``): the
pick GEMV's K loop (its 16-byte code words, x's int64 words, float32 products) run once over
each picked expert's weights for up to R of its tokens at a time, where ``pick_gemv`` reads an
expert's weights once a pick and ``cuda_moe_expert`` shares them on the tensor cores (bf16 tiles
padded to 16 rows: ~3x slower than pick_gemv at 8 tokens on the H100).

``cuda_moe.moe_experts(route="rows")``: both launches (fused gate/up, routed down) on this
kernel with one ``Tiles``: block_m = R (rows a pass over the weights: 1, 2 or 4), block_n,
block_k, warps, stages, ``pair`` (the fused launch's gate and up rows in one loop). One
program per (expert, BLOCK_N outputs), the grid fixed by the shapes, no host sync: the decode
CUDA graphs capture it. Any token count works (the in-kernel token list is a power of two ≥
T, at least 16); ``cuda_moe_tune`` races ``ROWS_CANDIDATES`` at 2-16 tokens. Built and checked
in Triton's interpreter and as sm_90 builds; untimed on a GPU.
"""

from __future__ import annotations

import torch

# (rows a pass, outputs, step, warps, stages): a (row, group) pair a thread at 4 warps, as
# pick_gemv's constant rule (its GEMV_FEW and GEMV)
ROWS = 2
BLOCK_N = 16
BLOCK_K = 256
NUM_WARPS = 4
NUM_STAGES = 2


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_k(k: int, want: int) -> int:
    """The step along K: K's power of two where K ≤ ``want`` (the row in one step); else the
    largest power of two ≤ ``want`` dividing K, or ``want`` itself where only 32 or 64 do
    (gpt-oss's 2880) — its last step masked (``masked``)."""
    if k <= want:
        return _pow2(k)
    b = want
    while b > 32 and k % b:
        b //= 2
    return b if b >= min(want, 128) else want


def masked(k: int, step: int) -> bool:
    """Whether steps of ``step`` columns need masking past K."""
    return k % step != 0


def rows_gemv(x: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, st, y: torch.Tensor, *,
              tokens: int, experts: int, topk: int, gather: bool, fuse: bool, routed: bool,
              glu=None, t=None) -> torch.Tensor:  # noqa: ANN001 (cuda_moe's Stack, Glu, Tiles)
    """y [P, N_out] for the flat token-major picks ``ids`` [T·topk] (as
    ``cuda_moe.pick_gemv``; each picked expert's weights read once a pass of R of its tokens).
    ``t``: tiles (block_m = R, block_n, block_k, warps, stages, pair) instead of the module's
    constants."""
    from pensieve.backends import cuda_moe_rows_kernels as k
    from pensieve.backends.cuda_int4 import triton_cdiv
    from pensieve.backends.cuda_moe import _meta

    rows, bn, want, warps, stages, pair = (
        (ROWS, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES, False) if t is None
        else (t.block_m, t.block_n, t.block_k, t.num_warps, t.num_stages, t.pair))
    if rows not in (1, 2, 4):
        raise ValueError(f"rows_gemv: {rows} rows a pass (1, 2 or 4)")
    bk = block_k(st.k, want)
    if (x.data_ptr() | x.stride(0) * x.element_size()) % 8 or x.stride(1) != 1:
        x = x.clone(memory_format=torch.contiguous_format)  # its rows are read as int64 words
    n_out = st.n // 2 if fuse else st.n
    args, meta = _meta(st, glu if fuse else None)
    k.rows_gemv[(experts, triton_cdiv(n_out, bn))](
        x, ids, rw, *args, y, tokens, st.n, st.k, x.stride(0), y.stride(0), TOPK=topk,
        K_PAD=_pow2(topk), TB=max(16, _pow2(tokens)), GATHER=gather, FUSE=fuse, ROUTED=routed,
        **meta, BLOCK_N=bn, BLOCK_K=bk, ROWS=rows, PAIR=pair and fuse,
        **({"MASK_K": True} if masked(st.k, bk) else {}), num_warps=warps, num_stages=stages)
    return y
