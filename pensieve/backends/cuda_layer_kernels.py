"""Triton kernels behind ``cuda_layers.py``: SiLU·mul and residual add + RMSNorm."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def silu_mul(GU, OUT, INNER, stride_gu, BLOCK: tl.constexpr):
    """out[t, c] = silu(gu[t, c]) · gu[t, INNER + c]; grid (T, cdiv(INNER, BLOCK))."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INNER
    gate = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_gu + INNER + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(OUT.dtype.element_ty).to(tl.float32)  # as F.silu rounds
    tl.store(OUT + row * INNER + cols, (act * up).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def add_rms_norm(X, Y, W, SUM, OUT, H, eps, BLOCK: tl.constexpr, PARTS: tl.constexpr = 1,
                 Z=None, EXTRA: tl.constexpr = False, ADD: tl.constexpr = True):
    """sum = x + y (rounded to x's dtype); out = sum · rsqrt(mean(sum²) + eps) · w; grid (T,).
    ``PARTS`` > 1: y is the sum of a row's PARTS rows of Y [T·PARTS, H] (an MoE's weighted picks),
    summed in float32 and rounded to Y's dtype as ``Y.view(T, PARTS, H).sum(1)`` rounds.
    ``EXTRA``: y + Z's row [T, H] (a shared expert's output), rounded to Y's dtype, is added
    instead of y — as ``routed + shared`` then ``x + that`` round in PyTorch. ``ADD`` False: no
    y and no sum, out = RMSNorm(x) · w (a plain norm: Y and SUM unused)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        if PARTS == 1:
            y = tl.load(Y + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            y = tl.zeros([BLOCK], tl.float32)
            for j in tl.static_range(PARTS):  # unrolled: the PARTS rows' loads in flight together
                y += tl.load(Y + (row * PARTS + j) * H + cols, mask=mask,
                             other=0.0).to(tl.float32)
            y = y.to(Y.dtype.element_ty).to(tl.float32)
        if EXTRA:
            z = tl.load(Z + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            y = (y + z).to(Y.dtype.element_ty).to(tl.float32)
        s = (x + y).to(SUM.dtype.element_ty)
        tl.store(SUM + row * H + cols, s, mask=mask)
        sf = s.to(tl.float32)
    else:
        sf = x
    rstd = tl.rsqrt(tl.sum(sf * sf, 0) / H + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * H + cols, (sf * rstd * w).to(OUT.dtype.element_ty), mask=mask)
