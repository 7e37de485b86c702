"""Triton kernel for Q6_K weights (``cuda_q6k``'s layout) at 1-16 rows: split-K FMA GEMV.

``gemv_split`` — y = x @ w.T for up to BLOCK_M rows of x on CUDA cores. A program dequantises
its weight tile [BLOCK_N, BLOCK_G groups of 32] once into float32 registers (``u − 32`` exactly,
by the exponent trick; ``d · sc`` formed in float32 per 16 columns) and makes BLOCK_M dot
products from it, so each weight byte is read once for all rows. A group's 16 low-nibble bytes
are read as [2, 8] (a, j), one contiguous run, its 8 high-bit bytes once for both halves:
column 32g + 8a + j (low nibbles, sub-scale 2g) takes bits 2a of high byte j, column
32g + 16 + 8a + j (high nibbles, sub-scale 2g + 1) bits 4 + 2a. x is loaded at the weight
tile's shape (each thread the x its weights meet; L1 serves the repeats), so that the loads
take the weight's layout rather than x's small one.

Grid (cdiv(N, BLOCK_N), SPLIT_K): program (n, s) reads groups [s·G_PER, (s+1)·G_PER) (the
launcher makes G_PER · SPLIT_K == GROUPS, G_PER a multiple of BLOCK_G: no masks on the codes).
SPLIT_K > 1: float32 partials to WS [SPLIT_K, 16, N]; the last program of a column tile (a
counter CNT[n] per tile, zero between calls: that program resets it) sums them in a fixed
order — one launch, deterministic, capturable in a CUDA graph. Rows past M read row 0 and are
not stored; outputs past N read row 0 of the weight and are not stored.

``gemv_split_words`` — the same on the code bytes read as int32 words: the nibble masks and
high-bit shifts run four codes at a time.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_splitk_kernels import finish


@triton.jit
def gemv_split(X, LO, HI, SC, D, Y, WS, CNT, M, N, GROUPS, G_PER, stride_x, stride_y,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
               SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)[None, :, None, None]
    a = tl.arange(0, 2)[None, None, :, None]
    j = tl.arange(0, 8)[None, None, None, :]
    g_start = pid_k * G_PER
    nn = n[:, None, None, None]
    lo_p = LO + nn * (GROUPS * 16) + (g_start * 16 + gi * 16 + a * 8 + j)  # [BN, BG, 2, 8]
    # the high bytes at the low bytes' shape [BN, BG, 2, 8] (a's two rows read the same 8
    # bytes): the same layout as the low bytes', no shuffle between them
    hi_p = tl.broadcast_to(HI + nn * (GROUPS * 8) + (g_start * 8 + gi * 8 + j),
                           [BLOCK_N, BLOCK_G, 2, 8])
    shift = a * 2
    g2 = tl.arange(0, BLOCK_G)[None, :]
    sc_p = SC + n[:, None] * (GROUPS * 2) + (g_start * 2 + g2 * 2)
    d_row = D + n[:, None] * (GROUPS // 8)
    x_p = X + m_safe[:, None, None, None, None] * stride_x \
        + (g_start * 32 + gi * 32 + a * 8 + j)[None, :, :, :, :]
    # x at the weight tile's shape [BM, BN, BG, 2, 8] (each thread loads the x its weights
    # meet, from L1 after the first): the loads then take the weight's layout, 16 bytes a run
    x_p = tl.broadcast_to(x_p, [BLOCK_M, BLOCK_N, BLOCK_G, 2, 8])
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G], tl.float32)
    for g0 in range(g_start, g_start + G_PER, BLOCK_G):
        b = tl.load(lo_p).to(tl.int32)
        h = tl.load(hi_p).to(tl.int32) >> shift
        # 2**23 + u read as float32, minus 2**23 + 32: u − 32 exactly
        w0 = (((b & 15) | ((h & 3) << 4)) | 0x4B000000).to(tl.float32, bitcast=True) \
            - 8388640.0
        w1 = (((b >> 4) | (h & 48)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388640.0
        x0 = tl.load(x_p).to(tl.float32)
        x1 = tl.load(x_p + 16).to(tl.float32)
        p0 = tl.sum(tl.sum(w0[None, :, :, :, :] * x0, 4), 3)
        p1 = tl.sum(tl.sum(w1[None, :, :, :, :] * x1, 4), 3)
        d = tl.load(d_row + (g0 + g2) // 8).to(tl.float16, bitcast=True)
        d = d.to(tl.float32)
        s0 = d * tl.load(sc_p).to(tl.float32)
        s1 = d * tl.load(sc_p + 1).to(tl.float32)
        acc += p0 * s0[None, :, :] + p1 * s1[None, :, :]
        lo_p += BLOCK_G * 16
        hi_p += BLOCK_G * 8
        sc_p += BLOCK_G * 2
        x_p += BLOCK_G * 32
    _finish(tl.sum(acc, 2), Y, WS, CNT, m_safe, mmask, n, nmask, N, pid_n, pid_k, stride_y,
            SPLIT_K)


@triton.jit
def _finish(y, Y, WS, CNT, m_safe, mmask, n, nmask, N, pid_n, pid_k, stride_y,
            SPLIT_K: tl.constexpr):
    """Store a program's [rows, outputs] sums at their places in Y (split-K: through WS
    [SPLIT_K, 16, N], ``cuda_splitk_kernels.finish``)."""
    omask = mmask[:, None] & nmask[None, :]
    out = Y + m_safe[:, None] * stride_y + n[None, :]
    finish(y, Y, out, omask, WS + m_safe[:, None] * N + n[None, :], 16 * N, CNT, pid_n, pid_k,
           SPLIT_K)


@triton.jit
def _floats(u, k):
    """Byte ``k`` (a [1, 1, 1, 4] index) of int32 words ``u`` [..., 4] as float32 ``byte − 32``,
    exactly (2**23 + byte read as float32, minus 2**23 + 32)."""
    v = ((u[:, :, :, None] >> (k * 8)) & 0xFF) | 0x4B000000
    return v.to(tl.float32, bitcast=True) - 8388640.0


@triton.jit
def gemv_split_words(X, LO, HI, SC, D, Y, WS, CNT, M, N, GROUPS, G_PER, stride_x, stride_y,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    """``gemv_split`` on the code bytes as int32 words (LO, HI: int32 views of the same
    buffers, 4 and 2 words a group): the nibble masks and high-bit shifts run on four codes at
    once (``0x0F0F0F0F``, ``0x03030303``), then each byte becomes a float. Word q of a group's
    low bytes holds columns 32g + 4q + k (low nibbles) and 32g + 16 + 4q + k (high), k < 4,
    whose high bit pairs sit in high word q % 2 at bits 2·(q // 2) (+ 4) of byte k."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)[None, :, None]
    q = tl.arange(0, 4)[None, None, :]
    k = tl.arange(0, 4)[None, None, None, :]
    g_start = pid_k * G_PER
    nn = n[:, None, None]
    lo_p = LO + nn * (GROUPS * 4) + (g_start * 4 + gi * 4 + q)  # [BN, BG, 4] words
    hi_p = HI + nn * (GROUPS * 2) + (g_start * 2 + gi * 2 + q % 2)  # each high word twice
    shift = (q // 2) * 2
    g2 = tl.arange(0, BLOCK_G)[None, :]
    sc_p = SC + n[:, None] * (GROUPS * 2) + (g_start * 2 + g2 * 2)
    d_row = D + n[:, None] * (GROUPS // 8)
    col = (g_start * 32 + gi * 32 + q * 4)[:, :, :, None] + k  # [1, BG, 4, 4]: the first half
    x_p = tl.broadcast_to(X + m_safe[:, None, None, None, None] * stride_x + col[None],
                          [BLOCK_M, BLOCK_N, BLOCK_G, 4, 4])
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G], tl.float32)
    for g0 in range(g_start, g_start + G_PER, BLOCK_G):
        lo = tl.load(lo_p)
        t = tl.load(hi_p) >> shift
        ua = (lo & 0x0F0F0F0F) | ((t & 0x03030303) << 4)
        ub = ((lo >> 4) & 0x0F0F0F0F) | (t & 0x30303030)
        x0 = tl.load(x_p).to(tl.float32)
        x1 = tl.load(x_p + 16).to(tl.float32)
        p0 = tl.sum(tl.sum(_floats(ua, k)[None, :, :, :, :] * x0, 4), 3)
        p1 = tl.sum(tl.sum(_floats(ub, k)[None, :, :, :, :] * x1, 4), 3)
        d = tl.load(d_row + (g0 + g2) // 8).to(tl.float16, bitcast=True).to(tl.float32)
        s0 = d * tl.load(sc_p).to(tl.float32)
        s1 = d * tl.load(sc_p + 1).to(tl.float32)
        acc += p0 * s0[None, :, :] + p1 * s1[None, :, :]
        lo_p += BLOCK_G * 4
        hi_p += BLOCK_G * 2
        sc_p += BLOCK_G * 2
        x_p += BLOCK_G * 32
    _finish(tl.sum(acc, 2), Y, WS, CNT, m_safe, mmask, n, nmask, N, pid_n, pid_k, stride_y,
            SPLIT_K)
