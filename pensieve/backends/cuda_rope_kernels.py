"""Triton kernel behind ``cuda_attention.rope_and_store(..., qk_norm=...)``: Qwen3's per-head
RMSNorm of q and k, RoPE (rotate-half) and the K/V cache writes in one launch.

The unfused path runs two ``F.rms_norm`` (one per q and k, each its own launch, rounded to the
activations' dtype) before the RoPE kernel (``cuda_kernels.rope``). Here each program (a token)
loads its heads once: the norm in float32 (``x · rsqrt(mean(x²) + eps) · w``), rounded to q's
dtype where the norm's output would be, then rotated in float32 from that value and rounded
where the RoPE kernel rounds — the same two rounding points as the unfused path.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _norm_rotate(X, sx_t, sx_h, t, W, eps, c1, c2, s1, s2, H: tl.constexpr,
                 H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Rows t's H heads of X, RMS-normed with weight W [2·HALF] (rounded to X's dtype), then
    rotated: (first half, second half) in float32, head and column indices, mask."""
    h = tl.arange(0, H_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < H) & (j < HALF)
    base = X + t * sx_t + h * sx_h + j
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x1 * x1 + x2 * x2, 1) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(W + j, mask=j < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(W + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    n1 = (x1 * rstd * w1).to(X.dtype.element_ty).to(tl.float32)  # as F.rms_norm rounds
    n2 = (x2 * rstd * w2).to(X.dtype.element_ty).to(tl.float32)
    return n1 * c1 - n2 * s1, n2 * c2 + n1 * s2, h, j, mask


@triton.jit
def rope_norm(Q, K, V, COS, SIN, SLOTS, QO, KC, VC, QW, KW, eps,
              sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, scos, ssin, sc_tok, sc_head,
              HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
              HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Grid (T,): q's heads normed (QW) and rotated into QO [T, HQ, 2·HALF]; k's normed (KW),
    rotated and v's copied into the caches at SLOTS[t]."""
    t = tl.program_id(0)
    j = tl.arange(0, HALF_PAD)[None, :]
    jm = j < HALF
    c1 = tl.load(COS + t * scos + j, mask=jm, other=0.0).to(tl.float32)
    c2 = tl.load(COS + t * scos + HALF + j, mask=jm, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t * ssin + j, mask=jm, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + t * ssin + HALF + j, mask=jm, other=0.0).to(tl.float32)
    o1, o2, h, j2, m = _norm_rotate(Q, sq_t, sq_h, t, QW, eps, c1, c2, s1, s2, HQ, HQ_PAD,
                                    HALF, HALF_PAD)
    qo = QO + t * (HQ * 2 * HALF) + h * (2 * HALF) + j2
    tl.store(qo, o1.to(QO.dtype.element_ty), mask=m)
    tl.store(qo + HALF, o2.to(QO.dtype.element_ty), mask=m)
    slot = tl.load(SLOTS + t).to(tl.int64)
    o1, o2, h, j2, m = _norm_rotate(K, sk_t, sk_h, t, KW, eps, c1, c2, s1, s2, HK, HK_PAD,
                                    HALF, HALF_PAD)
    kc = KC + slot * sc_tok + h * sc_head + j2
    tl.store(kc, o1.to(KC.dtype.element_ty), mask=m)
    tl.store(kc + HALF, o2.to(KC.dtype.element_ty), mask=m)
    vin = V + t * sv_t + h * sv_h + j2
    vc = VC + slot * sc_tok + h * sc_head + j2
    tl.store(vc, tl.load(vin, mask=m, other=0.0).to(VC.dtype.element_ty), mask=m)
    tl.store(vc + HALF, tl.load(vin + HALF, mask=m, other=0.0).to(VC.dtype.element_ty), mask=m)
