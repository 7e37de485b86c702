"""Triton kernel for latent (MLA) attention over the paged latent cache (see ``cuda_mla.py``).

Imported only when a CUDA step first needs it. ``latent_partial`` is split-K (flash-decoding)
attention of absorbed queries against one shared "head" per token: the cache row is the
normalised KV latent (``RANK`` values) followed by the rotated rotary key (``ROPE`` values);
scores are ``q_latent · latent + q_rope · k_rope``, the values are the latents themselves.

Queries are flat rows ``token · H + head`` of a ``[R, H, RANK + ROPE]`` tensor; a program
(tile, split) takes ``BLOCK_M`` consecutive flat rows of one sequence (all the heads of a
decode token, or the (token, head) rows of a short chunk, so every row of the tile shares the
keys it loads) and one slice of the keys the tile's last row sees. Each row is causal: it sees
its token's ``TOK_CTX`` keys. Partial results (running max, sum, unnormalised latent) go to
``M``/``L``/``ACC`` at ``row · splits + split``, the layout ``cuda_kernels.merge`` combines.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def latent_partial(Q, KC, BT, TILE_SEQ, TILE_LO, TILE_HI, TOK_CTX, M, L, ACC, scale,
                   num_splits, sq_row, sk_blk, sk_tok, sbt,
                   H: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                   ROPE: tl.constexpr, ROPE_PAD: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    s = tl.program_id(1)
    seq = tl.load(TILE_SEQ + tile).to(tl.int64)
    lo = tl.load(TILE_LO + tile)
    hi = tl.load(TILE_HI + tile)
    ctx = tl.load(TOK_CTX + (hi - 1) // H)  # the tile's last row sees the most keys
    per_split = tl.cdiv(tl.cdiv(ctx, PAGE), num_splits) * PAGE
    k_lo = s * per_split
    k_hi = tl.minimum(k_lo + per_split, ctx)
    r = lo + tl.arange(0, BLOCK_M)
    valid = r < hi
    row_ctx = tl.load(TOK_CTX + r // H, mask=valid, other=0)
    dr = tl.arange(0, RANK_PAD)
    dp = tl.arange(0, ROPE_PAD)
    rmask = dr < RANK
    pmask = dp < ROPE
    q_rows = Q + r.to(tl.int64)[:, None] * sq_row
    q_lat = tl.load(q_rows + dr[None, :], mask=valid[:, None] & rmask[None, :], other=0.0)
    q_pe = tl.load(q_rows + RANK + dp[None, :], mask=valid[:, None] & pmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, RANK_PAD], tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        kv_valid = offs < k_hi
        page = tl.load(BT + seq * sbt + offs // PAGE, mask=kv_valid, other=0).to(tl.int64)
        base = KC + page * sk_blk + (offs % PAGE) * sk_tok
        k_lat = tl.load(base[:, None] + dr[None, :], mask=kv_valid[:, None] & rmask[None, :],
                        other=0.0).to(q_lat.dtype)
        k_pe = tl.load(base[:, None] + RANK + dp[None, :],
                       mask=kv_valid[:, None] & pmask[None, :], other=0.0).to(q_lat.dtype)
        if IEEE:
            qk = tl.dot(q_lat, tl.trans(k_lat), input_precision="ieee")
            qk += tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")
        else:
            qk = tl.dot(q_lat, tl.trans(k_lat))
            qk += tl.dot(q_pe, tl.trans(k_pe))
        seen = kv_valid[None, :] & (offs[None, :] < row_ctx[:, None])
        qk = tl.where(seen, qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key here yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, k_lat.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(k_lat.dtype), k_lat)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = r.to(tl.int64) * num_splits + s
    tl.store(M + out, m_i, mask=valid)
    tl.store(L + out, l_i, mask=valid)
    tl.store(ACC + out[:, None] * RANK + dr[None, :], acc, mask=valid[:, None] & rmask[None, :])
