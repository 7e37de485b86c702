"""Triton kernels for attention over the paged KV cache (see ``cuda_attention.py``).

Imported only when a CUDA step first needs them. ``partial`` + ``merge`` are split-K
(flash-decoding) attention for one query token per sequence: program (b, kv_head, split)
reads its slice of sequence b's pages (of its last ``window`` keys, where windowed) for all
query heads of that KV head (padded to 16 rows for ``tl.dot``) and writes an unnormalised
partial result with its running max and sum; ``merge`` combines the splits, adding each head's
sink logit to the denominator where given (gpt-oss). ``rope`` rotates q/k (rotate-half RoPE) and writes k/v
into their cache slots, one program per token.
"""

from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def partial(Q, K, V, BT, CL, M, L, ACC, scale, num_splits, window,
            sq_b, sq_h, sk_blk, sk_tok, sk_head, sbt,
            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
            D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
            IEEE: tl.constexpr):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(CL + b)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)  # a sliding window's first key
    pages = tl.cdiv(ctx - lo, PAGE)
    per_split = tl.cdiv(pages, num_splits) * PAGE
    start = lo + s * per_split
    end = tl.minimum(start + per_split, ctx)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kh * GROUP + g
    gmask = g < GROUP
    dmask = d < D
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        page = tl.load(BT + b * sbt + offs // PAGE, mask=valid, other=0).to(tl.int64)
        base = page * sk_blk + (offs % PAGE) * sk_tok + kh * sk_head
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(K + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(valid[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    row = (b * (tl.num_programs(1) * GROUP) + heads) * num_splits + s
    tl.store(M + row, m_i, mask=gmask)
    tl.store(L + row, l_i, mask=gmask)
    tl.store(ACC + row[:, None] * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])

# num_splits changes with a step's context lengths: not specialised on (a split count of 1, or one
# divisible by 16, would otherwise compile another variant on first use — a compile while serving)
@triton.jit(do_not_specialize=["num_splits"])
def chunk_partial(Q, K, V, BT, START, NQ, M, L, ACC, scale, num_splits, num_heads, window,
                  sq_t, sq_h, sk_blk, sk_tok, sk_head,
                  GROUP: tl.constexpr, GROUP_P2: tl.constexpr, TOK: tl.constexpr,
                  D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
                  BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """``partial`` for TOK consecutive new tokens of one sequence: rows are (token, head);
    with a ``window`` (> 0), row r sees only its last ``window`` keys."""
    tile = tl.program_id(0)
    kh = tl.program_id(1)
    s = tl.program_id(2)
    n = tl.load(NQ)
    start = tl.load(START)
    first = tile * TOK
    last = tl.minimum(first + TOK, n) - 1
    ctx = start + last + 1  # keys the tile's last real row sees
    first_key = tl.where(window > 0, tl.maximum(start + first + 1 - window, 0), 0)
    pages = tl.cdiv(ctx - first_key, PAGE)
    per_split = tl.cdiv(pages, num_splits) * PAGE
    lo = first_key + s * per_split
    hi = tl.where(first < n, tl.minimum(lo + per_split, ctx), lo)
    r = tl.arange(0, TOK * GROUP_P2)
    row = first + r // GROUP_P2
    g = r % GROUP_P2
    head = kh * GROUP + g
    valid = (g < GROUP) & (row < n)
    row_ctx = start + row + 1
    d = tl.arange(0, D_PAD)
    dmask = d < D
    q = tl.load(Q + row[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                mask=valid[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([TOK * GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([TOK * GROUP_P2], tl.float32)
    acc = tl.zeros([TOK * GROUP_P2, D_PAD], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        kv_valid = offs < hi
        page = tl.load(BT + offs // PAGE, mask=kv_valid, other=0).to(tl.int64)
        base = page * sk_blk + (offs % PAGE) * sk_tok + kh * sk_head
        kv_mask = kv_valid[:, None] & dmask[None, :]
        k = tl.load(K + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        seen = kv_valid[None, :] & (offs[None, :] < row_ctx[:, None])
        seen = seen & ((window <= 0) | (offs[None, :] >= row_ctx[:, None] - window))
        qk = tl.where(seen, qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = (row * num_heads + head) * num_splits + s
    tl.store(M + out, m_i, mask=valid)
    tl.store(L + out, l_i, mask=valid)
    tl.store(ACC + out[:, None] * D + d[None, :], acc, mask=valid[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["num_splits"])  # as chunk_partial's
def merge(M, L, ACC, O, SINKS, num_splits, so_b, so_h,
          D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, HAS_SINKS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    smask = s < num_splits
    row = (b * tl.num_programs(1) + h) * num_splits + s
    m = tl.load(M + row, mask=smask, other=float("-inf"))
    l = tl.load(L + row, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    acc = tl.load(ACC + row[:, None] * D + d[None, :],
                  mask=smask[:, None] & (d < D)[None, :], other=0.0)
    den = tl.sum(l * w, 0)
    if HAS_SINKS:  # the head's sink logit joins the denominator (no value)
        den += tl.exp(tl.load(SINKS + h).to(tl.float32) - m_max)
    out = tl.sum(acc * w[:, None], 0) / den
    tl.store(O + b * so_b + h * so_h + d, out.to(O.dtype.element_ty), mask=d < D)

@triton.jit
def _rotate(X, sx_t, sx_h, t, c1, c2, s1, s2, H: tl.constexpr, H_PAD: tl.constexpr,
            HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    h = tl.arange(0, H_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < H) & (j < HALF)
    base = X + t * sx_t + h * sx_h + j
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, h, j, mask

@triton.jit
def rope(Q, K, V, COS, SIN, SLOTS, QO, KC, VC,
         sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, scos, ssin, sc_tok, sc_head,
         HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
         HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0)
    j = tl.arange(0, HALF_PAD)[None, :]
    jm = j < HALF
    c1 = tl.load(COS + t * scos + j, mask=jm, other=0.0).to(tl.float32)
    c2 = tl.load(COS + t * scos + HALF + j, mask=jm, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t * ssin + j, mask=jm, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + t * ssin + HALF + j, mask=jm, other=0.0).to(tl.float32)
    o1, o2, h, j2, m = _rotate(Q, sq_t, sq_h, t, c1, c2, s1, s2, HQ, HQ_PAD, HALF, HALF_PAD)
    qo = QO + t * (HQ * 2 * HALF) + h * (2 * HALF) + j2
    tl.store(qo, o1.to(QO.dtype.element_ty), mask=m)
    tl.store(qo + HALF, o2.to(QO.dtype.element_ty), mask=m)
    slot = tl.load(SLOTS + t).to(tl.int64)
    o1, o2, h, j2, m = _rotate(K, sk_t, sk_h, t, c1, c2, s1, s2, HK, HK_PAD, HALF, HALF_PAD)
    kc = KC + slot * sc_tok + h * sc_head + j2
    tl.store(kc, o1.to(KC.dtype.element_ty), mask=m)
    tl.store(kc + HALF, o2.to(KC.dtype.element_ty), mask=m)
    vin = V + t * sv_t + h * sv_h + j2
    vc = VC + slot * sc_tok + h * sc_head + j2
    tl.store(vc, tl.load(vin, mask=m, other=0.0).to(VC.dtype.element_ty), mask=m)
    tl.store(vc + HALF, tl.load(vin + HALF, mask=m, other=0.0).to(VC.dtype.element_ty), mask=m)
