"""Triton kernel of ``cuda_hybrid_mla_rope`` (see there): one program a token."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotate(X, COS, SIN, i, HALF: tl.constexpr, INTERLEAVE: tl.constexpr):
    """(first, second) halves of the rotated rotary dims; X points at a row's rotary part,
    ``i`` the pair index [.., HALF] (broadcast over leading dims as X's offsets are)."""
    if INTERLEAVE:  # pairs (2i, 2i+1) → (even·c − odd·s, odd·c + even·s), c = cos[i]
        a = tl.load(X + 2 * i).to(tl.float32)
        b = tl.load(X + 2 * i + 1).to(tl.float32)
        c1 = tl.load(COS + i).to(tl.float32)
        s1 = tl.load(SIN + i).to(tl.float32)
        c2 = c1
        s2 = s1
    else:  # rotate-half: (x1·c1 − x2·s1, x2·c2 + x1·s2)
        a = tl.load(X + i).to(tl.float32)
        b = tl.load(X + HALF + i).to(tl.float32)
        c1 = tl.load(COS + i).to(tl.float32)
        s1 = tl.load(SIN + i).to(tl.float32)
        c2 = tl.load(COS + HALF + i).to(tl.float32)
        s2 = tl.load(SIN + HALF + i).to(tl.float32)
    return a * c1 - b * s1, b * c2 + a * s2


@triton.jit
def mla_rope_write(Q, KV, NW, COS, SIN, SLOTS, CACHE, QOUT, s_qt, s_qh, s_kv, s_cs, eps,
                   H: tl.constexpr, H_PAD: tl.constexpr, RANK: tl.constexpr,
                   RANK_PAD: tl.constexpr, HALF: tl.constexpr,
                   INTERLEAVE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    row = CACHE + slot * (RANK + 2 * HALF)
    # the latent's RMSNorm → the cache
    r = tl.arange(0, RANK_PAD)
    rm = r < RANK
    lat = tl.load(KV + t * s_kv + r, mask=rm, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(lat * lat, axis=0) / RANK + eps)
    w = tl.load(NW + r, mask=rm, other=0.0).to(tl.float32)
    tl.store(row + r, (lat * inv * w).to(CACHE.dtype.element_ty), mask=rm)
    # the rotary key → the cache
    i = tl.arange(0, HALF)
    cos, sin = COS + t * s_cs, SIN + t * s_cs
    k1, k2 = _rotate(KV + t * s_kv + RANK, cos, sin, i, HALF, INTERLEAVE)
    tl.store(row + RANK + i, k1.to(CACHE.dtype.element_ty))
    tl.store(row + RANK + HALF + i, k2.to(CACHE.dtype.element_ty))
    # every head's rotary query → QOUT [T, H, 2·HALF]
    h = tl.arange(0, H_PAD)
    hm = h[:, None] < H
    hh = tl.where(hm, h[:, None], 0).to(tl.int64)
    q1, q2 = _rotate(Q + t * s_qt + hh * s_qh, cos, sin, i[None, :], HALF, INTERLEAVE)
    out = QOUT + (t * H + hh) * (2 * HALF)
    tl.store(out + i[None, :], q1.to(QOUT.dtype.element_ty), mask=hm)
    tl.store(out + HALF + i[None, :], q2.to(QOUT.dtype.element_ty), mask=hm)
