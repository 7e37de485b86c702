"""Split-K Triton GEMV for 1-8 activation rows over the int4 layout of ``cuda_int4.py``.

The weight is ``packed`` read as int32 words (a group's 16 bytes are 4 words: byte j of word q
holds column 32g + 4q + j in its low nibble and 32g + 16 + 4q + j in its high one) and the
group's scale/offset (``SYM``: float16 scales alone, offset −8 · scale). One program reads
BLOCK_N weight rows over one SPLIT_K-th of the groups, BLOCK_G groups a step (``tl.range``
with NUM_STAGES), each thread a 128-bit word quad of BLOCK_N rows, the group's scale loaded once
for the BLOCK_M rows of x it serves. More programs than ``gemv_words`` (SPLIT_K of them a
weight tile) put more bytes in flight on short weights.

Two products:

* float (``Q8=False``): ``Σ (128 + c)·x`` in float32 as ``gemv_words`` (the code OR-ed under
  bfloat16's exponent of 128: a shift and an AND-OR a weight), exact products.
* int8 (``Q8=1``, llama.cpp's mmvq way): x quantised once per call to int8 with a float
  scale per 32 (``quantize_q8``, the rounded x's sum beside; ``Q8=2``: by each program for its
  own columns instead, no extra launch), then per word
  ``dp4a(w & 0x0F0F0F0F, x_lo)`` and ``dp4a((w >> 4) & 0x0F0F0F0F, x_hi)``: 8 multiply-adds in
  five integer instructions instead of ~24, then ``s·dx·Σ c·q + o·Σ x`` per group. x's
  rounding (~0.5% relative on a product) is llama.cpp's. ``ASM=False`` (Triton's interpreter,
  which runs no PTX) does dp4a with shifts.

SPLIT_K > 1: each program's float32 partials go to WS and a counter; the last of a tile's
SPLIT_K programs sums them in a fixed order (deterministic), writes y and resets the counter:
one launch, capturable in CUDA graphs (as ``cuda_int4_kernels.skinny``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_int4_kernels import _code128, _scale_offset


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + Σ_j a.byte[j] · b.byte[j], a's bytes unsigned, b's signed (PTX dp4a.u32.s32)."""
    if ASM:
        r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for j in tl.static_range(4):
            r += ((a >> (8 * j)) & 0xFF) * ((b << (24 - 8 * j)) >> 24)
    return r


@triton.jit
def _four3(t, A: tl.constexpr, B: tl.constexpr):
    """[A, B, 4] → its [A, B] slices 0, 2, 1, 3 (in-thread: a thread holds a group's 4)."""
    even, odd = tl.split(tl.reshape(t, [A, B, 2, 2]))
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t2, t1, t3


@triton.jit
def _four2(t, B: tl.constexpr):
    """[B, 4] → its [B] slices 0, 2, 1, 3."""
    even, odd = tl.split(tl.reshape(t, [B, 2, 2]))
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t2, t1, t3


@triton.jit
def _opaque(x, ASM: tl.constexpr):
    """x unchanged, but hidden from Triton's analysis of contiguous offsets: a per-group load
    (scales, x's per-group scale and sum) then takes the weight words' layout (a thread per
    group) instead of a vectorised one that a shared-memory conversion must undo each step."""
    if ASM:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                      is_pure=True, pack=1)
    return x


@triton.jit
def _q8_inline(X, row, g, gmask, stride_x, EVEN: tl.constexpr):
    """``quantize_q8`` of one row's groups g, done by the program itself (no extra launch,
    repeated by each program of a column run): the int8 codes as the words the weight's
    words meet (lo: columns 32g + 4q + j, hi: + 16), the scales and the rounded sums."""
    q = tl.arange(0, 4)
    j = tl.arange(0, 4)
    off = row * stride_x + g[:, None, None] * 32 + q[None, :, None] * 4 + j[None, None, :]
    if EVEN:
        lo = tl.load(X + off).to(tl.float32)
        hi = tl.load(X + off + 16).to(tl.float32)
    else:
        lo = tl.load(X + off, mask=gmask[:, None, None], other=0.0).to(tl.float32)
        hi = tl.load(X + off + 16, mask=gmask[:, None, None], other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(lo), 2), 1), tl.max(tl.max(tl.abs(hi), 2), 1))
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)[:, None, None]
    d = amax / 127.0
    ql = tl.minimum(tl.maximum(tl.floor(lo * inv + 0.5), -127.0), 127.0).to(tl.int32)
    qh = tl.minimum(tl.maximum(tl.floor(hi * inv + 0.5), -127.0), 127.0).to(tl.int32)
    xs = (tl.sum(tl.sum(ql, 2), 1) + tl.sum(tl.sum(qh, 2), 1)).to(tl.float32) * d
    shift = (8 * j)[None, None, :]
    xl = tl.sum((ql & 0xFF) << shift, 2)  # disjoint bytes: the sum is their OR
    xh = tl.sum((qh & 0xFF) << shift, 2)
    return xl, xh, d, xs


@triton.jit
def _row(X, XD, XS, w, s, o, row, g, gmask, stride_x, GROUPS,
         BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr, Q8: tl.constexpr,
         ASM: tl.constexpr):
    """One row of x against the step's weight words w [BLOCK_N, BLOCK_G, 4]: the step's
    [BLOCK_N, BLOCK_G] per-group sums, scale and offset applied."""
    q = tl.arange(0, 4)
    if Q8:  # X: int8 codes read as int32 words, XD/XS: float32 scale and sum per group
        xp = X + row * stride_x + g[:, None] * 8 + q[None, :]
        gp = row * GROUPS + _opaque(g, ASM)
        if Q8 == 2:  # X: the float rows, rounded here
            xl, xh, dx, xs = _q8_inline(X, row, g, gmask, stride_x, EVEN)
        elif EVEN:
            xl = tl.load(xp)
            xh = tl.load(xp + 4)
            dx = tl.load(XD + gp)
            xs = tl.load(XS + gp)
        else:
            xl = tl.load(xp, mask=gmask[:, None], other=0)
            xh = tl.load(xp + 4, mask=gmask[:, None], other=0)
            dx = tl.load(XD + gp, mask=gmask, other=0.0)
            xs = tl.load(XS + gp, mask=gmask, other=0.0)
        # the 4 words of a group are one thread's: one chain of 8 dp4a, no sums
        w0, w2, w1, w3 = _four3(w, BLOCK_N, BLOCK_G)
        l0, l2, l1, l3 = _four2(xl, BLOCK_G)
        h0, h2, h1, h3 = _four2(xh, BLOCK_G)
        isum = tl.zeros([BLOCK_N, BLOCK_G], tl.int32)
        isum = _dp4a(w0 & 0x0F0F0F0F, l0[None, :], isum, ASM)
        isum = _dp4a((w0 >> 4) & 0x0F0F0F0F, h0[None, :], isum, ASM)
        isum = _dp4a(w1 & 0x0F0F0F0F, l1[None, :], isum, ASM)
        isum = _dp4a((w1 >> 4) & 0x0F0F0F0F, h1[None, :], isum, ASM)
        isum = _dp4a(w2 & 0x0F0F0F0F, l2[None, :], isum, ASM)
        isum = _dp4a((w2 >> 4) & 0x0F0F0F0F, h2[None, :], isum, ASM)
        isum = _dp4a(w3 & 0x0F0F0F0F, l3[None, :], isum, ASM)
        isum = _dp4a((w3 >> 4) & 0x0F0F0F0F, h3[None, :], isum, ASM)
        out = isum.to(tl.float32) * (s * dx[None, :]) + o * xs[None, :]
    else:
        xp = X + row * stride_x + g[:, None] * 32 + q[None, :] * 4
        part = tl.zeros([BLOCK_N, BLOCK_G, 4], tl.float32)
        xsum = tl.zeros([BLOCK_G, 4], tl.float32)
        for j in tl.static_range(4):
            if EVEN:
                xl = tl.load(xp + j).to(tl.float32)
                xh = tl.load(xp + 16 + j).to(tl.float32)
            else:
                xl = tl.load(xp + j, mask=gmask[:, None], other=0.0).to(tl.float32)
                xh = tl.load(xp + 16 + j, mask=gmask[:, None], other=0.0).to(tl.float32)
            part += _code128(w, 16 - 8 * j) * xl[None, :, :]
            part += _code128(w, 12 - 8 * j) * xh[None, :, :]
            xsum += xl + xh
        out = tl.sum(part, 2) * s + (o - 128.0 * s) * tl.sum(xsum, 1)[None, :]
    return out


@triton.jit
def _put(Y, acc, row, M, n, nmask, stride_y):
    tl.store(Y + row * stride_y + n, tl.sum(acc, 1).to(Y.dtype.element_ty),
             mask=nmask & ((n * 0 + row) < M))


@triton.jit
def gemv_split(X, XD, XS, W, SO, Y, WS, CNT, M, N, GROUPS, stride_x, stride_y, stride_w,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
               SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN: tl.constexpr,
               Q8: tl.constexpr, SYM: tl.constexpr, ASM: tl.constexpr):
    """y[m, n] = Σ_k x[m, k] · w[n, k]; grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)).

    ``stride_w`` = K / 8 words a weight row. WS: float32 [SPLIT_K, grid_m · BLOCK_M, N],
    CNT: int32 zeros, one a (row block, tile). EVEN: the groups split into SPLIT_K equal runs
    of whole BLOCK_G steps (else the last steps are masked)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    q = tl.arange(0, 4)
    per = tl.cdiv(tl.cdiv(GROUPS, BLOCK_G), SPLIT_K) * BLOCK_G
    g_lo = pid_k * per
    g_hi = tl.minimum(GROUPS, g_lo + per)
    w_ptrs = W + n[:, None, None] * stride_w + (g_lo + gi)[None, :, None] * 4 + q[None, None, :]
    so_ptrs = SO + n[:, None] * GROUPS + _opaque(g_lo + gi, ASM)[None, :]
    m0 = pid_m * BLOCK_M
    r0 = tl.minimum(m0, M - 1)  # rows past M read row M - 1 and are not stored
    r1 = tl.minimum(m0 + 1, M - 1)
    r2 = tl.minimum(m0 + 2, M - 1)
    r3 = tl.minimum(m0 + 3, M - 1)
    acc0 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    for g0 in tl.range(g_lo, g_hi, BLOCK_G, num_stages=NUM_STAGES):
        g = g0 + gi
        gmask = g < g_hi
        if EVEN:
            w = tl.load(w_ptrs)
            so = tl.load(so_ptrs)
        else:
            w = tl.load(w_ptrs, mask=gmask[None, :, None], other=0)
            so = tl.load(so_ptrs, mask=gmask[None, :], other=0)
        s, o = _scale_offset(so, SYM)
        acc0 += _row(X, XD, XS, w, s, o, r0, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                     EVEN, Q8, ASM)
        if BLOCK_M > 1:
            acc1 += _row(X, XD, XS, w, s, o, r1, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                         EVEN, Q8, ASM)
        if BLOCK_M > 2:
            acc2 += _row(X, XD, XS, w, s, o, r2, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                         EVEN, Q8, ASM)
            acc3 += _row(X, XD, XS, w, s, o, r3, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                         EVEN, Q8, ASM)
        w_ptrs += BLOCK_G * 4
        so_ptrs += BLOCK_G
    if SPLIT_K == 1:
        _put(Y, acc0, m0, M, n, nmask, stride_y)
        if BLOCK_M > 1:
            _put(Y, acc1, m0 + 1, M, n, nmask, stride_y)
        if BLOCK_M > 2:
            _put(Y, acc2, m0 + 2, M, n, nmask, stride_y)
            _put(Y, acc3, m0 + 3, M, n, nmask, stride_y)
    else:
        rows = tl.num_programs(2) * BLOCK_M
        ws = WS + (pid_k * rows + m0) * N + n
        tl.store(ws, tl.sum(acc0, 1), mask=nmask)
        if BLOCK_M > 1:
            tl.store(ws + N, tl.sum(acc1, 1), mask=nmask)
        if BLOCK_M > 2:
            tl.store(ws + 2 * N, tl.sum(acc2, 1), mask=nmask)
            tl.store(ws + 3 * N, tl.sum(acc3, 1), mask=nmask)
        tl.debug_barrier()  # this program's partials stored before the release below
        cnt = CNT + pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            for r in tl.static_range(BLOCK_M):
                total = tl.zeros([BLOCK_N], tl.float32)
                for k_ in range(SPLIT_K):  # fixed order; .cg: from L2, never a stale L1 line
                    total += tl.load(WS + (k_ * rows + m0 + r) * N + n, mask=nmask, other=0.0,
                                     cache_modifier=".cg")
                tl.store(Y + (m0 + r) * stride_y + n, total.to(Y.dtype.element_ty),
                         mask=nmask & ((n * 0 + m0 + r) < M))
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


@triton.jit
def quantize_q8(X, XQ, XD, XS, GROUPS, stride_x, stride_q, BLOCK_G: tl.constexpr):
    """x [M, K] → int8 codes XQ [M, K] (round to nearest of x · 127 / max|x| per 32), float32
    scales XD = max|x| / 127 and the sums of the rounded x XS = XD · Σ codes [M, K/32] (the
    offset term then sees the same x as the codes' term: the product is the weight's with the
    rounded x, its error proportional to w, not to the codes); grid (cdiv(GROUPS, BLOCK_G), M)."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < GROUPS
    i = tl.arange(0, 32)
    cols = g[:, None] * 32 + i[None, :]
    x = tl.load(X + row * stride_x + cols, mask=gmask[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    v = tl.floor(x * inv[:, None] + 0.5)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    tl.store(XQ + row * stride_q + cols, v.to(tl.int8), mask=gmask[:, None])
    d = amax / 127.0
    tl.store(XD + row * GROUPS + g, d, mask=gmask)
    tl.store(XS + row * GROUPS + g, tl.sum(v, 1) * d, mask=gmask)
