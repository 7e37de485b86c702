"""Triton kernel for Q6_K weights (``cuda_q6k``'s layout) at 1-16 rows (made for 4-16): ``rows``,
a swap-AB tensor-core GEMM on the code *words*.

``rows`` — y = x @ w.T for up to BLOCK_M (8 or 16) rows of x, the weight tile as the tensor cores'
left operand ([BLOCK_N, K] @ [K, BLOCK_M], x's rows padded by masked loads), like ``skinny``; it
differs in how the tile is made. The code buffers are read as int32 words (``LO``: 4 a group,
``HI``: 2): word q of a group's low bytes holds columns 32g + 4q + k in its low nibbles and
32g + 16 + 4q + k in its high ones (k < 4, byte k); high word q % 2 holds their high bit pairs
at bits 2·(q // 2) (+ 4 for the second half) of byte k. So a half h (16 columns, one sub-scale)
of a group is four *code words* ``U = ((lo >> 4h) & 0x0F0F0F0F) | (((hi >> 4h + 2(q // 2)) &
0x03030303) << 4)`` — the masks and shifts run on four codes at once — and each byte of a code
word becomes a weight by the exponent trick (``u | 0x4300`` read as bfloat16 is 128 + u
exactly; 1024 + u under float16's ``0x6400``; 2²³ + u under float32's; 16-bit types two bytes
at a time, as one 32-bit pair) minus ``magic + 32``, times ``d · sc`` (formed in float32,
rounded to x's dtype: the ``skinny`` kernel's two roundings).

K order: the dot sums over K, so the tile's columns may be in any order that x's rows share.
The tile is built as [BLOCK_N, BLOCK_G, 2 (h), 2 (f), 4 (q), 2 (e)] — byte 2f + e of code word
q — and flattened: tile column 32g + 16h + 8f + 2q + e holds weight column 32g + 16h + 4q +
2f + e, and x is loaded in that order. Within a 16-column step of the tensor cores a thread's
pairs (2t, 2t + 1) and (2t + 8, 2t + 9) then come from one code word t (the mma A fragment),
so that layout needs no exchange between threads. (Triton 3.9 for sm_90 still stages the
unpacked tile through shared memory once — 16-byte stores and ``ldmatrix`` loads — but
unpacks it in the load's layout: 5.5-7.3 instructions a weight in the loop at 64-256 outputs
with PREFETCH, 78-127 registers, against ~9 for ``skinny``'s tiles; counted in the sm_90
SASS, not timed.)

Grid (cdiv(N, BLOCK_N), SPLIT_K): program (n, s) reads groups [s·G_PER, (s+1)·G_PER), BLOCK_G
a step (the launcher makes G_PER · SPLIT_K == GROUPS and G_PER a multiple of BLOCK_G: no masks
on the codes). PREFETCH (1 or 2): the next one or two steps' code words, sub-scales,
super-scales and x are loaded into registers before this step's unpacking and product (two or
three steps of bytes in flight without the shared-memory pipeline; past the program's last
step it is reloaded). SPLIT_K > 1: float32 partials to WS [SPLIT_K, 16, N]; the last
program of a column tile (counter CNT[n], zero between calls: that program resets it) sums them
in a fixed order — one launch, deterministic, capturable in a CUDA graph
(``cuda_q6k_rows.rows_workspace``; the scheme of ``skinny``). Rows past M read row 0 and are
not stored; outputs past N read row 0 of the weight and are not stored.
float32 x (tests) takes IEEE products, never TF32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_splitk_kernels import finish


@triton.jit
def _load_at(lo_b, hi_b, sc_b, d_row, x_b, off, g_start, gi, mmask):
    """The step at ``off`` groups past the program's first: low and high words [BN, BG, 1, 1,
    4] (each high word twice), sub-scales [BN, BG, 2], super-scale bits [BN, BG] and x's rows
    [BG·32, BM]."""
    lo = tl.load(lo_b + off * 4)
    hi = tl.load(hi_b + off * 2)
    sc = tl.load(sc_b + off * 2)
    d = tl.load(d_row + (g_start + off + gi[None, :]) // 8)
    x = tl.load(x_b + off * 32, mask=mmask[None, :], other=0.0)
    return lo, hi, sc, d, x


@triton.jit
def _tile(lo, hi, sc, d, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, DT: tl.constexpr):
    """The weight tile [BLOCK_N, BLOCK_G · 32] in DT (columns in the module's K order) from a
    step's words (``_load_at``; loaded at the tile's rank, so that the unpacking stays in
    the layout the tensor cores' operand derives from — sm_90: no exchange but one pass
    through shared memory before the product). A 16-bit DT takes bytes 2f and 2f + 1 of a
    code word as one 32-bit pair under the magic exponent (``0x43004300``: two bfloat16),
    joined as the last axis e, so the subtraction and the scale run on pairs."""
    hh = tl.arange(0, 2)[None, None, :, None, None]
    ff = tl.arange(0, 2)[None, None, None, :, None]
    qq = tl.arange(0, 4)[None, None, None, None, :]
    # the code words of half h: four 6-bit codes a word
    u = ((lo >> (hh * 4)) & 0x0F0F0F0F) \
        | (((hi >> (hh * 4 + (qq // 2) * 2)) & 0x03030303) << 4)  # [BN, BG, 2, 1, 4]
    v = u >> (ff * 16)  # bytes 2f, 2f + 1 at the bottom [BN, BG, 2, 2, 4]
    # joined: [BN, BG, 2, 2, 4, 2], byte 2f + e of code word q
    s = d.to(tl.float16, bitcast=True).to(tl.float32)[:, :, None] * sc.to(tl.float32)
    s = s[:, :, :, None, None, None]  # d·sc of each half [BN, BG, 2, 1, 1, 1]
    if DT == tl.bfloat16:
        p = (v & 0xFF) | ((v & 0xFF00) << 8) | 0x43004300
        b = tl.join(p.to(tl.int16), (p >> 16).to(tl.int16))
        w = (b.to(tl.bfloat16, bitcast=True) - 160.0) * s.to(tl.bfloat16)
    elif DT == tl.float16:
        p = (v & 0xFF) | ((v & 0xFF00) << 8) | 0x64006400
        b = tl.join(p.to(tl.int16), (p >> 16).to(tl.int16))
        w = (b.to(tl.float16, bitcast=True) - 1056.0) * s.to(tl.float16)
    else:  # 2**23 + u as float32, minus 2**23 + 32
        b = tl.join(v & 0xFF, (v >> 8) & 0xFF)
        w = ((b | 0x4B000000).to(tl.float32, bitcast=True) - 8388640.0) * s
    return tl.reshape(w.to(DT), [BLOCK_N, BLOCK_G * 32])


@triton.jit
def _dot(w, x, acc):
    if x.dtype == tl.float32:
        acc = tl.dot(w, x, acc, input_precision="ieee")
    else:
        acc = tl.dot(w, x, acc)
    return acc


@triton.jit
def rows(X, LO, HI, SC, D, Y, WS, CNT, M, N, GROUPS, G_PER, stride_x, stride_y,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
         SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0)
    g_start = pid_k * G_PER
    gi = tl.arange(0, BLOCK_G)
    q = tl.arange(0, 4)
    # pointers at the program's first step
    g6 = gi[None, :, None, None, None]
    q6 = q[None, None, None, None, :]
    n6 = n[:, None, None, None, None]
    lo_b = LO + n6 * (GROUPS * 4) + (g_start * 4 + g6 * 4 + q6)
    hi_b = HI + n6 * (GROUPS * 2) + (g_start * 2 + g6 * 2 + q6 % 2)
    sc_b = SC + n[:, None, None] * (GROUPS * 2) + (g_start * 2 + gi[None, :, None] * 2
                                                   + tl.arange(0, 2)[None, None, :])
    d_row = D + n[:, None] * (GROUPS // 8)
    # x's rows in the tile's K order: tile column 32g + 16h + 8f + 2q + e is x's 32g + 16h +
    # 4q + 2f + e
    two = tl.arange(0, 2)
    col = tl.reshape(gi[:, None, None, None, None] * 32 + two[None, :, None, None, None] * 16
                     + two[None, None, :, None, None] * 2 + q[None, None, None, :, None] * 4
                     + two[None, None, None, None, :], [BLOCK_G * 32])
    x_b = X + m_safe[None, :] * stride_x + (g_start * 32 + col)[:, None]  # [BG·32, BM]
    last = G_PER - BLOCK_G  # the last step's offset: later prefetches reload it
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    if PREFETCH >= 1:
        a_lo, a_hi, a_sc, a_d, a_x = _load_at(lo_b, hi_b, sc_b, d_row, x_b, 0, g_start, gi,
                                              mmask)
    if PREFETCH == 2:
        b_lo, b_hi, b_sc, b_d, b_x = _load_at(lo_b, hi_b, sc_b, d_row, x_b,
                                              tl.minimum(BLOCK_G, last), g_start, gi, mmask)
    for off in range(0, G_PER, BLOCK_G):
        if PREFETCH == 2:  # steps off + 1 and off + 2 in flight during this one
            cur_lo, cur_hi, cur_sc, cur_d, xt = a_lo, a_hi, a_sc, a_d, a_x
            a_lo, a_hi, a_sc, a_d, a_x = b_lo, b_hi, b_sc, b_d, b_x
            b_lo, b_hi, b_sc, b_d, b_x = _load_at(lo_b, hi_b, sc_b, d_row, x_b,
                                                  tl.minimum(off + 2 * BLOCK_G, last),
                                                  g_start, gi, mmask)
        elif PREFETCH == 1:  # step off + 1 in flight during this one
            cur_lo, cur_hi, cur_sc, cur_d, xt = a_lo, a_hi, a_sc, a_d, a_x
            a_lo, a_hi, a_sc, a_d, a_x = _load_at(lo_b, hi_b, sc_b, d_row, x_b,
                                                  tl.minimum(off + BLOCK_G, last), g_start,
                                                  gi, mmask)
        else:
            cur_lo, cur_hi, cur_sc, cur_d, xt = _load_at(lo_b, hi_b, sc_b, d_row, x_b, off,
                                                         g_start, gi, mmask)
        w = _tile(cur_lo, cur_hi, cur_sc, cur_d, BLOCK_N, BLOCK_G, X.dtype.element_ty)
        acc = _dot(w, xt, acc)
    out = Y + m_safe[None, :] * stride_y + n[:, None]
    omask = nmask[:, None] & mmask[None, :]
    finish(acc, Y, out, omask, WS + m_safe[None, :] * N + n[:, None], 16 * N, CNT, pid_n, pid_k,
           SPLIT_K)
