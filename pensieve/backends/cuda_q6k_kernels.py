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
* ``skinny`` — 2-32 rows (decode batches): the weight tile unpacked once for all rows by
  *halves* (below), in x's dtype (bfloat16/float16 bit tricks; float32 for tests), the tensor
  cores' left operand against x padded to 16 or 32 rows; split-K with a one-launch reduction.
* ``dequant`` — the weight in a dtype, for cuBLAS at many rows (nothing kept).

The launcher picks BLOCK_G (groups of 32 a step) dividing K / 32 for gemv/gemm/dequant (skinny
masks a last partial step); rows past N and M are clamped on load and masked on store. float32
x (tests, a float32 model) takes IEEE products, never TF32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_splitk_kernels import finish


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
def _quarter_bytes(LO, HI, n, g, j, GROUPS):
    """The raw bytes ``_quarters`` reads (int8 loads: low runs 0-7 and 8-15, high bits)."""
    lo = LO + n * (GROUPS * 16) + g * 16 + j
    return tl.load(lo), tl.load(lo + 8), tl.load(HI + n * (GROUPS * 8) + g * 8 + j)


@triton.jit
def _steps(SC, D, n, g, GROUPS):
    """float32 (d·sc of columns 32g..32g+15, of 32g+16..32g+31) for rows ``n`` × groups ``g``."""
    d = tl.load(D + n * (GROUPS // 8) + g // 8).to(tl.float16, bitcast=True).to(tl.float32)
    sc = SC + n * (GROUPS * 2) + g * 2
    return d * tl.load(sc).to(tl.float32), d * tl.load(sc + 1).to(tl.float32)


@triton.jit
def gemv(X, LO, HI, SC, D, Y, N, GROUPS, stride_x, stride_y,
         BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, PREFETCH: tl.constexpr = False):
    """y[row, n] = Σ_k x[row, k] · w[n, k]; grid (cdiv(N, BLOCK_N), rows). PREFETCH: the next
    step's code bytes loaded before this step's products (two steps in flight; the last step
    reloads itself instead of reading past the row)."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    j = tl.arange(0, 8)
    x_ptrs = X + row.to(tl.int64) * stride_x + gi[:, None] * 32 + j[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    if PREFETCH:
        b0n, b1n, hn = _quarter_bytes(LO, HI, n[:, None, None], gi[None, :, None],
                                      j[None, None, :], GROUPS)
    for g0 in range(0, GROUPS, BLOCK_G):
        g = g0 + gi
        if PREFETCH:
            b0 = b0n.to(tl.int32)
            b1 = b1n.to(tl.int32)
            h = hn.to(tl.int32)
            nxt = tl.minimum(g0 + BLOCK_G, GROUPS - BLOCK_G) + gi
            b0n, b1n, hn = _quarter_bytes(LO, HI, n[:, None, None], nxt[None, :, None],
                                          j[None, None, :], GROUPS)
            u0, u1 = _code(b0, h, 0), _code(b1, h, 1)
            u2, u3 = _code(b0, h, 2), _code(b1, h, 3)
        else:
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


# ---- skinny (2-32 rows) and dequant (the weight into a temporary for cuBLAS) ----------------
# Both read a group's 16 low-nibble bytes as [2, 8] (a, j) and its 8 high-bit bytes once, and
# make the group's two *halves*: columns 32g + i (low nibbles, sub-scale 2g) and 32g + 16 + i
# (high nibbles, sub-scale 2g + 1), i = 8a + j, the high bit pair of column 32g + 8a + j sitting
# at bits 2a of high byte j (4 + 2a for the second half). One sub-scale a half: the weight is
# ``(u − 32) · d · sc`` with ``d · sc`` formed once per half in float32.


@triton.jit
def _unpack(b, h, d, sc0, sc1, DT: tl.constexpr):
    """A tile's weights in DT from its loaded bytes: ``b`` low-nibble bytes [BN, BG, 2, 8],
    ``h`` high-bit bytes [BN, BG, 1, 8] (both int16), ``d`` the float16 bits [BN, BG] and
    ``sc0``/``sc1`` the sub-scales of the halves [BN, BG] → (first half, second half).

    bfloat16/float16: ``u | magic`` read as DT is ``magic + u`` exactly (128 + u under
    bfloat16's exponent of 2⁷, 1024 + u under float16's 2¹⁰), minus ``magic + 32`` gives
    ``u − 32`` exactly, times ``d·sc`` rounded to DT: two roundings, in DT's paired
    instructions. float32 (tests, a float32 model): one rounding, in float32."""
    sh = (tl.arange(0, 2)[None, None, :, None] * 2).to(h.dtype)
    hs = h >> sh  # bits 0-1: the first half's high pair, bits 4-5: the second's
    u0 = (b & 15) | ((hs << 4) & 48)
    u1 = (b >> 4) | (hs & 48)
    d = d.to(tl.float16, bitcast=True).to(tl.float32)
    s0 = (d * sc0.to(tl.float32))[:, :, None, None]
    s1 = (d * sc1.to(tl.float32))[:, :, None, None]
    if DT == tl.bfloat16:
        w0 = ((u0 | 0x4300).to(tl.bfloat16, bitcast=True) - 160.0) * s0.to(tl.bfloat16)
        w1 = ((u1 | 0x4300).to(tl.bfloat16, bitcast=True) - 160.0) * s1.to(tl.bfloat16)
    elif DT == tl.float16:
        w0 = ((u0 | 0x6400).to(tl.float16, bitcast=True) - 1056.0) * s0.to(tl.float16)
        w1 = ((u1 | 0x6400).to(tl.float16, bitcast=True) - 1056.0) * s1.to(tl.float16)
    else:  # 2**23 + u as float32, minus 2**23 + 32
        w0 = ((u0.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388640.0) * s0
        w1 = ((u1.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388640.0) * s1
    return w0.to(DT), w1.to(DT)


@triton.jit
def skinny(X, LO, HI, SC, D, Y, WS, CNT, M, N, GROUPS, G_PER, stride_x, stride_y,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
           SPLIT_K: tl.constexpr, EVEN: tl.constexpr):
    """y = x @ w.T for up to BLOCK_M (16 or 32) rows of x, the weight as the tensor cores' left
    operand (``w @ x.T`` → [BLOCK_N, BLOCK_M]; x's rows padded by masked loads), so each weight
    byte is read and unpacked once for all rows. Each weight is ``(u − 32)·d·sc`` in float32,
    rounded once to x's dtype (as a dense copy in that dtype), float32 sums.

    Grid (cdiv(N, BLOCK_N), SPLIT_K): program (n, s) reads groups [s·G_PER, min((s+1)·G_PER,
    GROUPS)), BLOCK_G a step (G_PER a multiple of BLOCK_G; EVEN: G_PER · SPLIT_K == GROUPS,
    no masks). SPLIT_K > 1: float32 partials to WS [SPLIT_K, 32, N], the last program of a
    column tile (counter CNT[n], zero between calls: that program resets it) sums them in a
    fixed order — one launch, deterministic, capturable in a CUDA graph."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0)
    gi = tl.arange(0, BLOCK_G)
    a = tl.arange(0, 2)[None, None, :, None]
    j = tl.arange(0, 8)[None, None, None, :]
    kk = tl.arange(0, BLOCK_G * 16)
    g_start = pid_k * G_PER
    g_end = tl.minimum(GROUPS, g_start + G_PER)
    # pointers at the program's first step, advanced a step at a time
    lo_p = LO + (n * (GROUPS * 16) + g_start * 16)[:, None, None, None] \
        + gi[None, :, None, None] * 16 + a * 8 + j
    hi_p = HI + (n * (GROUPS * 8) + g_start * 8)[:, None, None, None] \
        + gi[None, :, None, None] * 8 + j
    sc_p = SC + (n * (GROUPS * 2) + g_start * 2)[:, None] + gi[None, :] * 2
    d_row = D + (n * (GROUPS // 8))[:, None]
    x_p = X + m_safe[None, :] * stride_x + (g_start * 32 + (kk // 16) * 32 + kk % 16)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g0 in range(g_start, g_start + G_PER, BLOCK_G):
        g = g0 + gi
        if EVEN:
            b = tl.load(lo_p).to(tl.int16)
            h = tl.load(hi_p).to(tl.int16)
            sc0 = tl.load(sc_p)
            sc1 = tl.load(sc_p + 1)
            d = tl.load(d_row + g[None, :] // 8)
            x0 = tl.load(x_p, mask=mmask[None, :], other=0.0)
            x1 = tl.load(x_p + 16, mask=mmask[None, :], other=0.0)
        else:
            gm = (g < g_end)[None, :]
            b = tl.load(lo_p, mask=gm[:, :, None, None], other=0).to(tl.int16)
            h = tl.load(hi_p, mask=gm[:, :, None, None], other=0).to(tl.int16)
            sc0 = tl.load(sc_p, mask=gm, other=0)
            sc1 = tl.load(sc_p + 1, mask=gm, other=0)
            d = tl.load(d_row + g[None, :] // 8, mask=gm, other=0)
            xm = mmask[None, :] & ((g0 + kk // 16) < g_end)[:, None]
            x0 = tl.load(x_p, mask=xm, other=0.0)
            x1 = tl.load(x_p + 16, mask=xm, other=0.0)
        w0, w1 = _unpack(b, h, d, sc0, sc1, X.dtype.element_ty)
        acc = _dot(tl.reshape(w0, [BLOCK_N, BLOCK_G * 16]), x0, acc)
        acc = _dot(tl.reshape(w1, [BLOCK_N, BLOCK_G * 16]), x1, acc)
        lo_p += BLOCK_G * 16
        hi_p += BLOCK_G * 8
        sc_p += BLOCK_G * 2
        x_p += BLOCK_G * 32
    out = Y + m_safe[None, :] * stride_y + n[:, None]
    omask = nmask[:, None] & mmask[None, :]
    finish(acc, Y, out, omask, WS + m_safe[None, :] * N + n[:, None], 32 * N, CNT, pid_n, pid_k,
           SPLIT_K)


@triton.jit
def dequant(LO, HI, SC, D, OUT, N, GROUPS, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """OUT [N, 32·GROUPS] = the weight in OUT's dtype (rounded once from float32); grid
    (cdiv(N, BLOCK_N), GROUPS // BLOCK_G), BLOCK_G dividing GROUPS."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    a = tl.arange(0, 2)[None, None, :, None]
    j = tl.arange(0, 8)[None, None, None, :]
    nn = n[:, None, None, None]
    gg = g[None, :, None, None]
    b = tl.load(LO + nn * (GROUPS * 16) + gg * 16 + a * 8 + j).to(tl.int16)
    h = tl.load(HI + nn * (GROUPS * 8) + gg * 8 + j).to(tl.int16)
    sc = SC + n[:, None] * (GROUPS * 2) + g[None, :] * 2
    d = tl.load(D + n[:, None] * (GROUPS // 8) + g[None, :] // 8)
    w0, w1 = _unpack(b, h, d, tl.load(sc), tl.load(sc + 1), tl.float32)
    out = OUT + n[:, None, None, None] * (GROUPS * 32) + g[None, :, None, None] * 32 + a * 8 + j
    mask = nmask[:, None, None, None]
    tl.store(out, w0.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out + 16, w1.to(OUT.dtype.element_ty), mask=mask)
