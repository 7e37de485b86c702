"""Triton kernels for Q6_K weights kept as 6-bit codes (see ``cuda_q6k.py`` for the layout).

A weight [N, K] (K a multiple of 256) is four buffers, 210 bytes a 256 weights as in the file:
``LO`` uint8 [N, K/2], the low four bits of ``u = code + 32`` in the int4 layout (byte ``i`` of
group ``g``: column 32g+i in its low nibble, 32g+16+i in its high one); ``HI`` uint8 [N, K/4],
the high two bits four a byte (byte ``j`` of group ``g``: columns 32g+j, +8, +16, +24 in bits
0-1, 2-3, 4-5, 6-7); ``SC`` int8 [N, K/16] the sub-scales and ``D`` int16 [N, K/256] the float16
bits of the super-scale: ``w = (u − 32) · d · sc``.

A step reads a group's 16 low bytes as two runs of 8 and its 8 high bytes once, and makes the
group's four *quarters* — columns 32g + 8q + j for j < 8 — each from one nibble and one bit
pair: quarters 0 and 1 share sub-scale 2g, quarters 2 and 3 sub-scale 2g+1. Codes become float32
without a conversion instruction (OR-ed under the exponent of 2²³, the 2²³ subtracted).

* ``gemv`` — 1-2 rows (decode): float32 FMAs, one program per (BLOCK_N outputs, row); ``Σ (u −
  32)·x = Σ u·x − 32·Σ x`` per sub-block, then its scale. Rows run side by side (the weight tile
  comes from L2 after the first).
* ``gemm`` — more rows: the weight tile dequantised in registers to x's dtype (one rounding, as
  a dense copy in that dtype) as the left operand of the tensor cores (``w @ x.T``, [BLOCK_N,
  BLOCK_M]), float32 sums, one product per quarter. BLOCK_M = 16 is the decode-batch form (x's
  rows padded by masked loads); larger tiles serve prefill, ordered GROUP_M row tiles at a time
  so that neighbouring programs share weight tiles in L2.

The launcher picks BLOCK_G (groups of 32 a step) dividing K / 32; rows past N and M are clamped
on load and masked on store. float32 x (tests, a float32 model) takes IEEE products, never TF32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _u6(u):
    """int32 values 0..63 → float32, exactly, without a conversion instruction."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _code(b, h, Q: tl.constexpr):
    """Quarter Q's codes ``u`` (float32) from its low-nibble bytes ``b`` (bytes 0-7 of the
    group for quarters 0 and 2, 8-15 for 1 and 3) and the group's high-bit bytes ``h``."""
    if Q == 0:
        u = (b & 15) | ((h & 3) << 4)
    elif Q == 1:
        u = (b & 15) | ((h & 12) << 2)
    elif Q == 2:
        u = (b >> 4) | (h & 48)
    else:
        u = (b >> 4) | ((h >> 2) & 48)
    return _u6(u)


@triton.jit
def _quarters(LO, HI, n, g, j, GROUPS):
    """The codes ``u`` (0..63, float32) of rows ``n`` × groups ``g`` × ``j`` (0..7; broadcast
    int64 indices): quarter q holds columns 32g + 8q + j."""
    lo = LO + n * (GROUPS * 16) + g * 16 + j
    b0 = tl.load(lo).to(tl.int32)
    b1 = tl.load(lo + 8).to(tl.int32)
    h = tl.load(HI + n * (GROUPS * 8) + g * 8 + j).to(tl.int32)
    return _code(b0, h, 0), _code(b1, h, 1), _code(b0, h, 2), _code(b1, h, 3)


@triton.jit
def _steps(SC, D, n, g, GROUPS):
    """float32 (d·sc of columns 32g..32g+15, of 32g+16..32g+31) for rows ``n`` × groups ``g``."""
    d = tl.load(D + n * (GROUPS // 8) + g // 8).to(tl.float16, bitcast=True).to(tl.float32)
    sc = SC + n * (GROUPS * 2) + g * 2
    return d * tl.load(sc).to(tl.float32), d * tl.load(sc + 1).to(tl.float32)


@triton.jit
def gemv(X, LO, HI, SC, D, Y, N, GROUPS, stride_x, stride_y,
         BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """y[row, n] = Σ_k x[row, k] · w[n, k]; grid (cdiv(N, BLOCK_N), rows)."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    j = tl.arange(0, 8)
    x_ptrs = X + row.to(tl.int64) * stride_x + gi[:, None] * 32 + j[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    for g0 in range(0, GROUPS, BLOCK_G):
        g = g0 + gi
        u0, u1, u2, u3 = _quarters(LO, HI, n[:, None, None], g[None, :, None],
                                   j[None, None, :], GROUPS)
        x0 = tl.load(x_ptrs + g0 * 32).to(tl.float32)
        x1 = tl.load(x_ptrs + g0 * 32 + 8).to(tl.float32)
        x2 = tl.load(x_ptrs + g0 * 32 + 16).to(tl.float32)
        x3 = tl.load(x_ptrs + g0 * 32 + 24).to(tl.float32)
        p_lo = tl.sum(u0 * x0[None, :, :] + u1 * x1[None, :, :], 2) \
            - 32.0 * tl.sum(x0 + x1, 1)[None, :]
        p_hi = tl.sum(u2 * x2[None, :, :] + u3 * x3[None, :, :], 2) \
            - 32.0 * tl.sum(x2 + x3, 1)[None, :]
        s_lo, s_hi = _steps(SC, D, n[:, None], g[None, :], GROUPS)
        acc += p_lo * s_lo + p_hi * s_hi
    y = tl.sum(acc, 1)
    tl.store(Y + row.to(tl.int64) * stride_y + n, y.to(Y.dtype.element_ty), mask=nmask)


@triton.jit
def _dot(w, x, acc):
    if x.dtype == tl.float32:
        acc = tl.dot(w, x, acc, input_precision="ieee")
    else:
        acc = tl.dot(w, x, acc)
    return acc


@triton.jit
def gemm(X, LO, HI, SC, D, Y, M, N, GROUPS, stride_x, stride_y,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
         GROUP_M: tl.constexpr):
    """y = x @ w.T, the weight dequantised in the kernel; grid (cdiv(M, BLOCK_M) ·
    cdiv(N, BLOCK_N),). BLOCK_G ≥ 2 (a quarter's product spans 8·BLOCK_G ≥ 16 columns)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    # the tile's first row and column as 64-bit scalar bases, int32 offsets within it (fewer
    # live registers than 64-bit pointer tensors); rows past M and N read row 0 of the tile
    m_loc = tl.arange(0, BLOCK_M)
    mmask = pid_m * BLOCK_M + m_loc < M
    m_loc = tl.where(mmask, m_loc, 0)
    n_loc = tl.arange(0, BLOCK_N)
    nmask = pid_n * BLOCK_N + n_loc < N
    n_loc = tl.where(nmask, n_loc, 0)
    row0 = (pid_n * BLOCK_N).to(tl.int64)
    LO = LO + row0 * (GROUPS * 16)
    HI = HI + row0 * (GROUPS * 8)
    SC = SC + row0 * (GROUPS * 2)
    D = D + row0 * (GROUPS // 8)
    X = X + (pid_m * BLOCK_M).to(tl.int64) * stride_x
    gi = tl.arange(0, BLOCK_G)
    j = tl.arange(0, 8)
    kq = tl.reshape(gi[:, None] * 32 + j[None, :], [BLOCK_G * 8])  # quarter 0's columns
    x_off = m_loc[None, :] * stride_x + kq[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    nn = n_loc[:, None, None]
    lo_off = nn * (GROUPS * 16) + gi[None, :, None] * 16 + j[None, None, :]
    hi_off = nn * (GROUPS * 8) + gi[None, :, None] * 8 + j[None, None, :]
    for g0 in range(0, GROUPS, BLOCK_G):
        # one quarter's weights at a time, each just before its product
        s_lo, s_hi = _steps(SC, D, n_loc[:, None], (g0 + gi)[None, :], GROUPS)
        h = tl.load(HI + hi_off + g0 * 8).to(tl.int32)
        for half in tl.static_range(2):  # bytes 0-7 (quarters 0, 2), then 8-15 (1, 3)
            b = tl.load(LO + lo_off + g0 * 16 + half * 8).to(tl.int32)
            for hi in tl.static_range(2):  # low nibbles (sub-scale 2g), high (2g + 1)
                if hi == 0:
                    s = s_lo[:, :, None]
                else:
                    s = s_hi[:, :, None]
                xq = tl.load(X + x_off + g0 * 32 + 8 * (half + 2 * hi), mask=mmask[None, :],
                             other=0.0)
                u = _code(b, h, half + 2 * hi)
                w = tl.reshape(((u - 32.0) * s).to(xq.dtype), [BLOCK_N, BLOCK_G * 8])
                acc = _dot(w, xq, acc)
    m_safe = (pid_m * BLOCK_M + m_loc).to(tl.int64)
    n_safe = pid_n * BLOCK_N + n_loc
    out = Y + m_safe[None, :] * stride_y + n_safe[:, None]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])
