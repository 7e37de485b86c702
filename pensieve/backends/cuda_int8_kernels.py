"""Triton kernels for weight-only int8-code linear layers (see ``cuda_int8.py`` for the layout).

A weight [N, K] is held as its int8 codes ``C`` [N, K] (read through a uint8 view), the float16
bits of one scale per ``GS`` columns ``S`` int16 [N, K/GS] (GS = 32, or 16 for Q6_K) and, where
the format has them, the float16 bits of one offset per 32 columns ``MN`` int16 [N, K/32]:
``w = code · scale (+ offset)`` (``Int8Groups``: Q8_0, Q5_0, Q5_1, Q5_K, Q6_K, IQ4_NL, IQ4_XS).

Codes become float32 without a conversion instruction (those run at a quarter of the FMA rate):
the byte XOR 0x80 is ``code + 128`` in 0..255, OR-ed into the mantissa of 2²³ it reads as
``2²³ + 128 + code`` exactly, and one subtraction leaves ``code``.

* ``gemv`` — decode: one program per (row, BLOCK_N outputs), float32 FMAs, each group's scale
  (and offset, ``s·Σ x·c + o·Σ x``) applied once per group; several rows run side by side in
  one launch (the weight tile comes from L2 after the first row).
* ``skinny`` — 2-16 rows on the tensor cores: the weight dequantised to x's dtype in registers
  as the left operand (``w @ x.T``, [BLOCK_N, 16]), x's rows padded to 16 by masked loads.
* ``matmul`` — more rows: a GEMM tile, the weight tile dequantised in the kernel and fed to
  ``tl.dot`` against x's tile; no dense copy is ever kept.
* ``dequantize`` — the float weight (large prefill GEMMs go to cuBLAS on a temporary; checks).

(``gemv2``, a start-time race candidate for ``gemv``'s buckets with 16-byte loads and any K
step, is in ``cuda_int8_gemv2_kernels.py``.)

K must be a multiple of the step each launcher picks (a power-of-two number of 32-column groups
that divides K / 32); rows past N and M are clamped on load and masked on store. float32 x (tests,
a float32 model) takes IEEE products, never TF32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _half(bits):
    """float16 bits (int16) → float32."""
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _codes(b):
    """uint8 bytes of int8 codes → the codes as float32, exactly."""
    u = (b.to(tl.int32) ^ 0x80) | 0x4B000000  # 2**23 + 128 + code
    return u.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _dot(a, b, acc):
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def gemv(X, C, S, MN, Y, N, K, stride_x, stride_y, GS: tl.constexpr, HAS_MIN: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """y[row, n] = Σ_k x[row, k] · w[n, k]; grid (rows, cdiv(N, BLOCK_N)); BLOCK_S groups of
    GS columns a step."""
    row = tl.program_id(0)
    pid = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    si = tl.arange(0, BLOCK_S)
    i = tl.arange(0, GS)
    c_ptrs = C + n[:, None, None] * K + si[None, :, None] * GS + i[None, None, :]
    s_ptrs = S + n[:, None] * (K // GS) + si[None, :]
    m_ptrs = MN + n[:, None] * (K // 32) + si[None, :]
    x_ptrs = X + row * stride_x + si[:, None] * GS + i[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    for k0 in range(0, K, BLOCK_S * GS):
        w = _codes(tl.load(c_ptrs + k0))
        x = tl.load(x_ptrs + k0).to(tl.float32)
        part = tl.sum(w * x[None, :, :], 2)
        s = _half(tl.load(s_ptrs + k0 // GS))
        if HAS_MIN:  # GS == 32 here
            o = _half(tl.load(m_ptrs + k0 // 32))
            acc += part * s + o * tl.sum(x, 1)[None, :]
        else:
            acc += part * s
    y = tl.sum(acc, 1)
    tl.store(Y + row * stride_y + n, y.to(Y.dtype.element_ty), mask=nmask)


@triton.jit
def _weight_tile(C, S, MN, n, k, K, GS: tl.constexpr, HAS_MIN: tl.constexpr):
    """The float32 weight at rows ``n`` × columns ``k`` (broadcast index tensors)."""
    w = _codes(tl.load(C + n * K + k)) * _half(tl.load(S + n * (K // GS) + k // GS))
    if HAS_MIN:
        w += _half(tl.load(MN + n * (K // 32) + k // 32))
    return w


@triton.jit
def skinny(X, C, S, MN, Y, M, N, K, stride_x, stride_y, GS: tl.constexpr,
           HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = x @ w.T for up to 16 rows of x: per step the [BLOCK_N, BLOCK_K] weight tile,
    dequantised to x's dtype (one rounding, as a dense copy in that dtype), times x.T
    [BLOCK_K, 16] on the tensor cores, float32 sums; grid (cdiv(N, BLOCK_N),)."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    m = tl.arange(0, 16)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0)
    k = tl.arange(0, BLOCK_K)
    x_ptrs = X + m_safe[None, :] * stride_x + k[:, None]
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _weight_tile(C, S, MN, n_safe[:, None], k0 + k[None, :], K, GS, HAS_MIN)
        xt = tl.load(x_ptrs + k0, mask=mmask[None, :], other=0.0)
        acc = _dot(w.to(xt.dtype), xt, acc)
    out = Y + m_safe[None, :] * stride_y + n_safe[:, None]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


@triton.jit
def matmul(X, C, S, MN, Y, M, N, K, stride_x, stride_y, GS: tl.constexpr,
           HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """y = x @ w.T for x [M, K]: x's [BLOCK_M, BLOCK_K] tile times the weight's
    [BLOCK_K, BLOCK_N] tile dequantised to x's dtype; grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    m = tl.where(mmask, m, 0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    x_ptrs = X + m[:, None] * stride_x + k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xt = tl.load(x_ptrs + k0)
        w = _weight_tile(C, S, MN, n_safe[None, :], k0 + k[:, None], K, GS, HAS_MIN)
        acc = _dot(xt, w.to(xt.dtype), acc)
    out = Y + m[:, None] * stride_y + n_safe[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def dequantize(C, S, MN, OUT, N, K, stride_out, GS: tl.constexpr, HAS_MIN: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = w[n, k] in OUT's dtype; grid (cdiv(N, BLOCK_N), K // BLOCK_K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _weight_tile(C, S, MN, n_safe[:, None], k[None, :], K, GS, HAS_MIN)
    tl.store(OUT + n_safe[:, None] * stride_out + k[None, :], w.to(OUT.dtype.element_ty),
             mask=nmask[:, None])
