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

``V2`` (the launcher's with ``PENSIEVE_INT4_GEMV_V2=1``; the loop before it by default): for float x
and ``Q8=2`` the step reads x as 16-byte loads laid out as the weight words are (16-bit x as
int32 words of two columns, ``_x_words``): in the old loop x's loads took another layout and
each step exchanged it through shared memory (4-36 ``bar.sync`` a step on sm_90, ~750 bytes of
spills at 4 rows). A float code is one ``prmt`` (``_byte128``: the nibble's byte under
0x43, the same 128 + code as ``_code128``'s shift and AND-OR), made once for every row; the
products are the same exact float32 ones, summed in another order. ``Q8=1`` is unchanged.

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
def _byte128(t, J: tl.constexpr, sel, ASM: tl.constexpr):
    """Byte J of ``t`` (a nibble: ``t``'s bytes are masked to 0-15) as float32 128 + nibble: the
    byte moved to bits 16-23 under exponent byte 0x43 (float32 0x43000000 = 128, whose mantissa
    unit there is 1) — one ``prmt`` a weight (selector ``sel`` = 0x4J55, in a register) instead
    of a shift and an AND-OR, the same exact value (``_code128``'s)."""
    if ASM:
        c = tl.inline_asm_elementwise("prmt.b32 $0, $1, 67, $2;", "=r,r,r", [t, sel],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        c = (((t >> (8 * J)) & 0xFF) << 16) | 0x43000000
    return c.to(tl.float32, bitcast=True)


@triton.jit
def _selectors(gi, GROUPS):
    """``_byte128``'s ``prmt`` selectors 0x4J55 (J < 4) as [BLOCK_G] values that ptxas cannot
    see are constant (GROUPS ≥ 0 always): held in registers for the loop. As immediates, ptxas
    put 0x43 in the instruction and copied each selector from a uniform register before every
    ``prmt`` (~100 MOVs a step)."""
    live = (gi + GROUPS) >= 0  # per thread: a uniform value would sit in a uniform register
    return (tl.where(live, 0x4055, 0), tl.where(live, 0x4155, 0), tl.where(live, 0x4255, 0),
            tl.where(live, 0x4355, 0))


@triton.jit
def _x_load(p, gmask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(p)
    else:
        return tl.load(p, mask=gmask[:, None], other=0)


@triton.jit
def _xn_load(p, m, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(p)
    else:
        return tl.load(p, mask=m, other=0)


@triton.jit
def _x_pairs_n(XP, g, gmask, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
    """``_x_pairs`` as [BLOCK_N, BLOCK_G] slices, each weight row's copy loaded from the same
    address: for tiles with fewer groups a step than threads, whose [BLOCK_G, 4] quads Triton
    would load 8 bytes a thread and exchange into the words' layout; shaped as the words, the
    quads take their layout (16 bytes a thread, a thread's copies one load)."""
    i = tl.arange(0, 4)
    p = tl.broadcast_to((XP + g[:, None] * 16 + i[None, :])[None, :, :], [BLOCK_N, BLOCK_G, 4])
    m = tl.broadcast_to(gmask[None, :, None], [BLOCK_N, BLOCK_G, 4])
    a0, a2, a1, a3 = _four3(_xn_load(p, m, EVEN), BLOCK_N, BLOCK_G)
    b0, b2, b1, b3 = _four3(_xn_load(p + 4, m, EVEN), BLOCK_N, BLOCK_G)
    c0, c2, c1, c3 = _four3(_xn_load(p + 8, m, EVEN), BLOCK_N, BLOCK_G)
    d0, d2, d1, d3 = _four3(_xn_load(p + 12, m, EVEN), BLOCK_N, BLOCK_G)
    return (a0, a1, c0, c1), (a2, a3, c2, c3), (b0, b1, d0, d1), (b2, b3, d2, d3)


@triton.jit
def _f32_word(p, gmask, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
    """float32 x of one word: columns p + j and p + 16 + j (j < 4), a 16-byte load each."""
    a0, a2, a1, a3 = _four2(_x_load(p, gmask, EVEN), BLOCK_G)
    b0, b2, b1, b3 = _four2(_x_load(p + 16, gmask, EVEN), BLOCK_G)
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _x_words(X, row, g, gmask, stride_x, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
    """One row's x over groups g, loaded in the weight words' layout (a thread a group, 16
    bytes a load, no shared-memory exchange), as the four words' x: word q's tuple holds x at
    columns 32g + 4q + j and 32g + 16 + 4q + j (j < 4). 16-bit x: int32 words of two columns
    (4 a word, converted where used: ``_xf``); float32 x: the floats (8 a word)."""
    DT: tl.constexpr = X.dtype.element_ty
    if DT == tl.float32:
        i = tl.arange(0, 4)
        p = X + row * stride_x + g[:, None] * 32 + i[None, :]
        out = (_f32_word(p, gmask, BLOCK_G, EVEN), _f32_word(p + 4, gmask, BLOCK_G, EVEN),
               _f32_word(p + 8, gmask, BLOCK_G, EVEN), _f32_word(p + 12, gmask, BLOCK_G, EVEN))
    else:
        out = _x_pairs((X + row * stride_x).to(tl.pointer_type(tl.int32)), g, gmask, BLOCK_G,
                       EVEN)
    return out


@triton.jit
def _x_pairs(XP, g, gmask, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
    """16-bit x of groups g from its row's int32 words ``XP`` (word 16g + i: columns 32g + 2i
    and + 1), as ``_x_words``: a [BLOCK_G, 4] quad a load, a thread's 16 bytes."""
    i = tl.arange(0, 4)
    p = XP + g[:, None] * 16 + i[None, :]
    a0, a2, a1, a3 = _four2(_x_load(p, gmask, EVEN), BLOCK_G)  # columns 0-7
    b0, b2, b1, b3 = _four2(_x_load(p + 4, gmask, EVEN), BLOCK_G)  # 8-15
    c0, c2, c1, c3 = _four2(_x_load(p + 8, gmask, EVEN), BLOCK_G)  # 16-23
    d0, d2, d1, d3 = _four2(_x_load(p + 12, gmask, EVEN), BLOCK_G)  # 24-31
    return (a0, a1, c0, c1), (a2, a3, c2, c3), (b0, b1, d0, d1), (b2, b3, d2, d3)


@triton.jit
def _xf(xw, J: tl.constexpr, DT: tl.constexpr):
    """Column J of a word's x tuple (``_x_words``; 4q + J, J < 4, then 16 + 4q + J − 4) as
    float32: bfloat16 is float32's top half (a shift or a mask), float16 a conversion."""
    if DT == tl.float32:
        return xw[J]
    else:
        p = xw[(J // 4) * 2 + (J % 4) // 2]
        if DT == tl.bfloat16:
            if J % 2 == 0:
                v = (p << 16).to(tl.float32, bitcast=True)
            else:
                v = (p & -65536).to(tl.float32, bitcast=True)
        else:
            if J % 2 == 0:
                v = p.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                v = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return v


@triton.jit
def _fma_x(c, xw, J: tl.constexpr, part, xsum, DT: tl.constexpr, XN: tl.constexpr = False):
    """``part`` + c · x_J (a product exact: 8-bit 128 + code times a 16-bit float), ``xsum`` + x_J
    for one row's word x (``_x_words``; ``XN``: ``_x_pairs_n``'s, one a weight row)."""
    x = _xf(xw, J, DT)
    if XN:
        out = part + c * x
    else:
        out = part + c * x[None, :]
    return out, xsum + x


@triton.jit
def _row_sums(w, so, xw, sels, SYM: tl.constexpr, DT: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_G: tl.constexpr, ASM: tl.constexpr, XN: tl.constexpr = False):
    """One row of x (its words' tuples, ``_x_words``) against the step's weight words w
    [BLOCK_N, BLOCK_G, 4] with their scales ``so``: the [BLOCK_N, BLOCK_G] group sums
    (``_float_rows`` for one row; ``gemv_wide``'s V2 step)."""
    w0, w2, w1, w3 = _four3(w, BLOCK_N, BLOCK_G)
    ws = (w0, w1, w2, w3)
    part = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    if XN:
        xsum = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    else:
        xsum = tl.zeros([BLOCK_G], tl.float32)
    for q in tl.static_range(4):
        t = ws[q] & 0x0F0F0F0F
        u = (ws[q] >> 4) & 0x0F0F0F0F
        for j in tl.static_range(8):
            c = _byte128(t if j < 4 else u, j % 4, sels[j % 4], ASM)
            part, xsum = _fma_x(c, xw[q], j, part, xsum, DT, XN)
    s, o = _scale_offset(so, SYM)
    if XN:
        out = part * s + (o - 128.0 * s) * xsum
    else:
        out = part * s + (o - 128.0 * s) * xsum[None, :]
    return out


@triton.jit
def _float_rows(X, w, s, o, r0, r1, r2, r3, g, gmask, stride_x, sels, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr,
                ASM: tl.constexpr):
    """V2, float x: the step's [BLOCK_N, BLOCK_G] group sums of each of BLOCK_M rows, scale and
    offset applied. Each code is made once (``_byte128``) and met by every row's x (4 rows at
    254 registers, no spills; the old loop spilled ~750 bytes there)."""
    DT: tl.constexpr = X.dtype.element_ty
    x0 = _x_words(X, r0, g, gmask, stride_x, BLOCK_G, EVEN)
    x1 = x0
    x2 = x0
    x3 = x0
    if BLOCK_M > 1:
        x1 = _x_words(X, r1, g, gmask, stride_x, BLOCK_G, EVEN)
    if BLOCK_M > 2:
        x2 = _x_words(X, r2, g, gmask, stride_x, BLOCK_G, EVEN)
        x3 = _x_words(X, r3, g, gmask, stride_x, BLOCK_G, EVEN)
    w0, w2, w1, w3 = _four3(w, BLOCK_N, BLOCK_G)
    ws = (w0, w1, w2, w3)
    p0 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    p1 = p0
    p2 = p0
    p3 = p0
    s0 = tl.zeros([BLOCK_G], tl.float32)
    s1 = s0
    s2 = s0
    s3 = s0
    for q in tl.static_range(4):
        t = ws[q] & 0x0F0F0F0F  # the low nibbles' bytes
        u = (ws[q] >> 4) & 0x0F0F0F0F  # the high ones'
        for j in tl.static_range(8):  # a code, then every row's product with it
            c = _byte128(t if j < 4 else u, j % 4, sels[j % 4], ASM)
            p0, s0 = _fma_x(c, x0[q], j, p0, s0, DT)
            if BLOCK_M > 1:
                p1, s1 = _fma_x(c, x1[q], j, p1, s1, DT)
            if BLOCK_M > 2:
                p2, s2 = _fma_x(c, x2[q], j, p2, s2, DT)
                p3, s3 = _fma_x(c, x3[q], j, p3, s3, DT)
    off = o - 128.0 * s
    return (p0 * s + off * s0[None, :], p1 * s + off * s1[None, :], p2 * s + off * s2[None, :],
            p3 * s + off * s3[None, :])


@triton.jit
def _round_q8(x, inv):
    """x · inv rounded to the nearest int8 code in ±127 (``quantize_q8``'s rounding)."""
    return tl.minimum(tl.maximum(tl.floor(x * inv + 0.5), -127.0), 127.0).to(tl.int32)


@triton.jit
def _q8_word(xw, inv, DT: tl.constexpr):
    """One word's x (``_x_words``) as int8 codes: (the low nibbles' word, the high nibbles'
    word — byte j: column 4q + j, 16 + 4q + j — and the sum of the 8 codes)."""
    lo = tl.zeros_like(inv).to(tl.int32)
    hi = lo
    total = lo
    for j in tl.static_range(4):
        a = _round_q8(_xf(xw, j, DT), inv)
        b = _round_q8(_xf(xw, j + 4, DT), inv)
        lo = lo | ((a & 0xFF) << (8 * j))
        hi = hi | ((b & 0xFF) << (8 * j))
        total += a + b
    return lo, hi, total


@triton.jit
def _q8_words(X, row, g, gmask, stride_x, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
    """V2's ``_q8_inline``: one row's x over groups g rounded to int8 per group by the program,
    read in the weight words' layout (``_x_words``: no shared-memory exchange): the four
    words' low and high code words (each [BLOCK_G]), the scales and the rounded sums."""
    DT: tl.constexpr = X.dtype.element_ty
    xw = _x_words(X, row, g, gmask, stride_x, BLOCK_G, EVEN)
    amax = tl.zeros([BLOCK_G], tl.float32)
    for q in tl.static_range(4):
        for j in tl.static_range(8):
            amax = tl.maximum(amax, tl.abs(_xf(xw[q], j, DT)))
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    d = amax / 127.0
    l0, h0, t0 = _q8_word(xw[0], inv, DT)
    l1, h1, t1 = _q8_word(xw[1], inv, DT)
    l2, h2, t2 = _q8_word(xw[2], inv, DT)
    l3, h3, t3 = _q8_word(xw[3], inv, DT)
    xs = ((t0 + t1) + (t2 + t3)).to(tl.float32) * d
    return (l0, l1, l2, l3), (h0, h1, h2, h3), d, xs


@triton.jit
def _dp4a_words(w, xl, xh, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, ASM: tl.constexpr):
    """Σ codes · int8 x over a group's four words w [BLOCK_N, BLOCK_G, 4] and x's code words
    (xl/xh: the low/high nibbles' columns, a [BLOCK_G] a word): one chain of 8 dp4a."""
    w0, w2, w1, w3 = _four3(w, BLOCK_N, BLOCK_G)
    isum = tl.zeros([BLOCK_N, BLOCK_G], tl.int32)
    isum = _dp4a(w0 & 0x0F0F0F0F, xl[0][None, :], isum, ASM)
    isum = _dp4a((w0 >> 4) & 0x0F0F0F0F, xh[0][None, :], isum, ASM)
    isum = _dp4a(w1 & 0x0F0F0F0F, xl[1][None, :], isum, ASM)
    isum = _dp4a((w1 >> 4) & 0x0F0F0F0F, xh[1][None, :], isum, ASM)
    isum = _dp4a(w2 & 0x0F0F0F0F, xl[2][None, :], isum, ASM)
    isum = _dp4a((w2 >> 4) & 0x0F0F0F0F, xh[2][None, :], isum, ASM)
    isum = _dp4a(w3 & 0x0F0F0F0F, xl[3][None, :], isum, ASM)
    isum = _dp4a((w3 >> 4) & 0x0F0F0F0F, xh[3][None, :], isum, ASM)
    return isum


@triton.jit
def _q8_rows(X, w, s, o, r0, r1, r2, r3, g, gmask, stride_x, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr,
             ASM: tl.constexpr):
    """V2, ``Q8=2``: the step's [BLOCK_N, BLOCK_G] group sums of each of BLOCK_M rows, x
    rounded to int8 here (``_q8_words``), every row's x first (its floats then die before
    the products: fewer registers live)."""
    q0 = _q8_words(X, r0, g, gmask, stride_x, BLOCK_G, EVEN)
    q1 = q0
    q2 = q0
    q3 = q0
    if BLOCK_M > 1:
        q1 = _q8_words(X, r1, g, gmask, stride_x, BLOCK_G, EVEN)
    if BLOCK_M > 2:
        q2 = _q8_words(X, r2, g, gmask, stride_x, BLOCK_G, EVEN)
        q3 = _q8_words(X, r3, g, gmask, stride_x, BLOCK_G, EVEN)
    out0 = _q8_sums(w, s, o, q0, BLOCK_N, BLOCK_G, ASM)
    out1 = out0
    out2 = out0
    out3 = out0
    if BLOCK_M > 1:
        out1 = _q8_sums(w, s, o, q1, BLOCK_N, BLOCK_G, ASM)
    if BLOCK_M > 2:
        out2 = _q8_sums(w, s, o, q2, BLOCK_N, BLOCK_G, ASM)
        out3 = _q8_sums(w, s, o, q3, BLOCK_N, BLOCK_G, ASM)
    return out0, out1, out2, out3


@triton.jit
def _q8_sums(w, s, o, xq, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, ASM: tl.constexpr):
    """s · dx · Σ codes · x codes + o · Σ x over one row's rounded x ``xq`` (``_q8_words``)."""
    xl, xh, d, xs = xq
    isum = _dp4a_words(w, xl, xh, BLOCK_N, BLOCK_G, ASM)
    return isum.to(tl.float32) * (s * d[None, :]) + o * xs[None, :]


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
               Q8: tl.constexpr, SYM: tl.constexpr, ASM: tl.constexpr,
               V2: tl.constexpr = False):
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
    sels = _selectors(gi, GROUPS)
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
        if V2 and Q8 != 1:  # x read in the words' layout: no exchange in the loop
            if Q8 == 2:
                o0, o1, o2, o3 = _q8_rows(X, w, s, o, r0, r1, r2, r3, g, gmask, stride_x,
                                          BLOCK_M, BLOCK_N, BLOCK_G, EVEN, ASM)
            else:
                o0, o1, o2, o3 = _float_rows(X, w, s, o, r0, r1, r2, r3, g, gmask, stride_x,
                                             sels, BLOCK_M, BLOCK_N, BLOCK_G, EVEN, ASM)
            acc0 += o0
            if BLOCK_M > 1:
                acc1 += o1
            if BLOCK_M > 2:
                acc2 += o2
                acc3 += o3
        else:
            acc0 += _row(X, XD, XS, w, s, o, r0, g, gmask, stride_x, GROUPS, BLOCK_N,
                         BLOCK_G, EVEN, Q8, ASM)
            if BLOCK_M > 1:
                acc1 += _row(X, XD, XS, w, s, o, r1, g, gmask, stride_x, GROUPS, BLOCK_N,
                             BLOCK_G, EVEN, Q8, ASM)
            if BLOCK_M > 2:
                acc2 += _row(X, XD, XS, w, s, o, r2, g, gmask, stride_x, GROUPS, BLOCK_N,
                             BLOCK_G, EVEN, Q8, ASM)
                acc3 += _row(X, XD, XS, w, s, o, r3, g, gmask, stride_x, GROUPS, BLOCK_N,
                             BLOCK_G, EVEN, Q8, ASM)
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
