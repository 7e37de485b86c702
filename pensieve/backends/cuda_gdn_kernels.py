"""Triton kernels for a Gated DeltaNet layer's recurrent steps (see ``cuda_gdn.py``).

Imported only when a CUDA step first needs them. Both take sequences as (start row, token
count) over the flat rows of the step, each from and back into its own state slot:

- ``conv_step``: the depthwise causal convolution + SiLU of a sequence's new conv inputs
  (program: one sequence × ``BC`` channels), token by token from the slot's ``K-1`` rolling
  inputs (zeros where nothing is cached); the rolling inputs are then updated in place. A
  channel belongs to one program, which reads each old input before it overwrites it.
- ``delta_step``: the gated delta rule (program: one sequence × one value head × ``BV`` value
  columns): q, k of the head's key head L2-normalised (q scaled by 1/√Dk), g = −exp(A_log) ·
  softplus(a + dt_bias), β = sigmoid(b), then per token S ← e^g S; S += k ⊗ β(v − Sᵀk);
  o = Sᵀq, the state held in registers over the sequence's tokens and written back once.
  ``NORM`` (when one program holds the whole head, ``BV ≥ Dv``): the gated RMSNorm
  w · norm(o) · SiLU(z) before the store.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def conv_step(X, Y, W, CONV, STARTS, LENS, SLOTS, CACHED, C, sx, sy, sc_slot, sc_ch,
              K: tl.constexpr, BC: tl.constexpr, DECODE: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    if DECODE:  # row n is sequence n's one token
        start = n
        length = 1
    else:
        start = tl.load(STARTS + n)
        length = tl.load(LENS + n)
    slot = tl.load(SLOTS + n).to(tl.int64)
    keep = (tl.zeros([BC], tl.int32) + tl.load(CACHED + n).to(tl.int32)) != 0
    state = CONV + slot * sc_slot + c * sc_ch
    dt = X.dtype.element_ty  # the torch path's roundings to the input dtype (no-ops in float32)
    for t in range(0, length):
        acc = tl.zeros([BC], tl.float32)
        for j in tl.static_range(K):
            # the input's index among the new rows (< 0: a rolling one), per lane
            i = tl.zeros([BC], tl.int32) + (t + j - (K - 1))
            w = tl.load(W + c * K + j, mask=cm, other=0.0).to(dt).to(tl.float32)
            new = tl.load(X + (start + i).to(tl.int64) * sx + c, mask=cm & (i >= 0),
                          other=0.0).to(tl.float32)
            old = tl.load(state + (K - 1 + i), mask=cm & (i < 0) & keep, other=0.0)
            prod = w * (new + old.to(dt).to(tl.float32))
            # a decode row's products round one by one (the torch step multiplies in the
            # dtype), a chunk's accumulate (a convolution)
            acc += tl.where(length == 1, prod.to(dt).to(tl.float32), prod)
        acc = acc.to(dt).to(tl.float32)
        y = acc / (1.0 + tl.exp(-acc))
        tl.store(Y + (start + t).to(tl.int64) * sy + c, y.to(Y.dtype.element_ty), mask=cm)
    # the last K-1 inputs, in increasing order: slot j takes input length+j, which is a new row
    # or the rolling input length+j > j, not yet overwritten
    for j in tl.static_range(K - 1):
        i = tl.zeros([BC], tl.int32) + (length + j - (K - 1))
        new = tl.load(X + (start + i).to(tl.int64) * sx + c, mask=cm & (i >= 0),
                      other=0.0).to(tl.float32)
        old = tl.load(state + (K - 1 + i), mask=cm & (i < 0) & keep, other=0.0)
        tl.store(state + j, new + old.to(dt).to(tl.float32), mask=cm)


@triton.jit
def delta_step(Y, A, B, Z, A_LOG, DT_BIAS, NORM_W, SSM, OUT, STARTS, LENS, SLOTS, CACHED,
               sy, sab, sz_row, so_row, ss_slot, ss_head, eps,
               HK: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr, HV: tl.constexpr,
               DV: tl.constexpr, BV: tl.constexpr, TILED: tl.constexpr, NORM: tl.constexpr,
               DECODE: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    if DECODE:
        start = n
        length = 1
    else:
        start = tl.load(STARTS + n)
        length = tl.load(LENS + n)
    slot = tl.load(SLOTS + n).to(tl.int64)
    keep = tl.load(CACHED + n).to(tl.int32)
    if TILED:
        kh = h % HK
    else:
        kh = h // (HV // HK)
    dk = tl.arange(0, DK_PAD)
    dv = vb * BV + tl.arange(0, BV)
    km = dk < DK
    vm = dv < DV
    sm = km[:, None] & vm[None, :]
    s_ptr = SSM + slot * ss_slot + h * ss_head + dk[:, None] * DV + dv[None, :]
    s = tl.load(s_ptr, mask=sm & ((tl.zeros([DK_PAD, BV], tl.int32) + keep) != 0), other=0.0)
    decay = -tl.exp(tl.load(A_LOG + h).to(tl.float32))
    bias = tl.load(DT_BIAS + h).to(tl.float32)
    if NORM:
        w = tl.load(NORM_W + dv, mask=vm, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(DK * 1.0)
    for t in range(0, length):
        row = (start + t).to(tl.int64)
        y = Y + row * sy
        q = tl.load(y + kh * DK + dk, mask=km, other=0.0).to(tl.float32)
        k = tl.load(y + HK * DK + kh * DK + dk, mask=km, other=0.0).to(tl.float32)
        v = tl.load(y + 2 * HK * DK + h * DV + dv, mask=vm, other=0.0).to(tl.float32)
        q = q / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6) * scale
        k = k / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6)
        a = tl.load(A + row * sab + h).to(tl.float32) + bias
        g = decay * tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
        beta = 1.0 / (1.0 + tl.exp(-tl.load(B + row * sab + h).to(tl.float32)))
        beta = beta.to(B.dtype.element_ty).to(tl.float32)  # the torch path's sigmoid in b's dtype
        s = s * tl.exp(g)
        delta = (v - tl.sum(s * k[:, None], axis=0)) * beta
        s = s + k[:, None] * delta[None, :]
        o = tl.sum(s * q[:, None], axis=0)
        if NORM:
            o = o.to(OUT.dtype.element_ty).to(tl.float32)  # the reference's o in v's dtype
            ms = tl.sum(tl.where(vm, o * o, 0.0), axis=0) / DV
            zt = tl.load(Z + row * sz_row + h * DV + dv, mask=vm, other=0.0).to(tl.float32)
            normed = (o / tl.sqrt(ms + eps)).to(OUT.dtype.element_ty).to(tl.float32)
            # w · norm rounds in the dtype before the float32 SiLU(z) product (the torch order)
            o = (w * normed).to(OUT.dtype.element_ty).to(tl.float32) * (zt / (1.0 + tl.exp(-zt)))
        tl.store(OUT + row * so_row + h * DV + dv, o.to(OUT.dtype.element_ty), mask=vm)
    tl.store(s_ptr, s, mask=sm)
