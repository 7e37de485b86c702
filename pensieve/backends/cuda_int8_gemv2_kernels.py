"""``gemv2``: the int8-code decode GEMV with every load 16 bytes wide and in one layout.

Same weights as ``cuda_int8_kernels`` (codes uint8 [N, K], float16-bit scales per ``GS``
columns, offsets per 32), same sums; what differs is how a step is laid out. ``gemv`` reads
codes as a [BLOCK_N, BLOCK_S, GS] byte tensor and x as [BLOCK_S, GS] broadcast over the rows:
at sm_90 that compiles to 2-8 byte loads and, where the layouts of x and of the codes differ,
a shared-memory exchange (``bar.sync``) every step; and its step must be a power-of-two
number of groups dividing K / 32 — gpt-oss's K = 2880 (90 groups) gets 2 groups a step.

Here a thread owns a *half group*: 16 columns of one weight row, its 16 code bytes read as a
quad of int32 words (one ``ld.global.v4.b32``), and x's same 16 columns read as int32 words
(16-bit x: two columns a word, two 16-byte loads; float32 x: four) in that same [BLOCK_H, 4]
layout broadcast over the rows, so nothing is exchanged in the loop. Each code byte becomes
float32 exactly with no conversion instruction: the word's top bits flipped once
(``u ^ 0x80808080``: byte = code + 128), the byte OR-ed under a float32 exponent whose
mantissa unit is 1 where it sits (2^23 at bits 0-7, 2^15 at bits 8-15; bytes 2 and 3 shifted
down first), and 2^e + 128 subtracted. A half group's sums get their scale (and offset:
``s·Σ x·c + o·Σ x``) once, so GS = 16 (Q6_K) and GS = 32 share the loop. The K step is any
number of half groups; a K it does not divide masks its last step (no power-of-two rule).

Up to 4 rows of x run in one program against each weight word loaded once (``ROWS``); rows
past M are clamped on load and masked on store. The row starts are written (K // 32) · 8
words so Triton sees them 16-byte aligned whatever K's specialisation; x's rows must start
16-byte aligned (the launcher copies x otherwise).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _half(bits):
    """float16 bits (int16) → float32."""
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _split4(t, A: tl.constexpr, B: tl.constexpr):
    """[A, B, 4] → its four [A, B] slices, in order (a thread holds all four: no exchange)."""
    lo, hi = tl.split(tl.reshape(t, [A, B, 2, 2]))  # lo: slices 0, 2; hi: 1, 3
    t0, t2 = tl.split(lo)
    t1, t3 = tl.split(hi)
    return t0, t1, t2, t3


@triton.jit
def _code(u, J: tl.constexpr):
    """Byte J of the flipped words ``u`` (byte = code + 128) as the code in float32, exactly:
    the byte OR-ed under an exponent whose mantissa unit is 1 there, the power of two and
    the 128 taken off (one logic op and one add; bytes 2 and 3 a shift first)."""
    if J == 0:
        f = ((u & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    elif J == 1:
        f = ((u & 0xFF00) | 0x47000000).to(tl.float32, bitcast=True) - 32896.0
    elif J == 2:
        f = (((u >> 16) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    else:
        f = (((u >> 24) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    return f


@triton.jit
def _x16(w, HIGH: tl.constexpr, DT: tl.constexpr):
    """The 16-bit float in the low (or high) half of int32 words ``w`` as float32."""
    if DT == tl.bfloat16:  # float32's top half: a shift or a mask
        if HIGH:
            f = (w & -65536).to(tl.float32, bitcast=True)
        else:
            f = (w << 16).to(tl.float32, bitcast=True)
    else:
        if HIGH:
            f = (w >> 16).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
        else:
            f = w.to(tl.int16).to(DT, bitcast=True).to(tl.float32)
    return f


@triton.jit
def _x_quads(XR, zn, hh, hmask, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
             EVEN: tl.constexpr):
    """x's 16 columns of half groups ``hh`` [BLOCK_H] of the row at ``XR`` as 16 float32
    [BLOCK_N, BLOCK_H] (column order), read as word quads — 16 bytes a load — through
    pointers broadcast over the weight rows (``zn``: zeros [BLOCK_N, 1, 1]): a tensor of the
    codes' shape takes the codes' layout, a thread loading the x of its own words. (Loaded
    as [BLOCK_H, 4], x took a layout of its own, 8 bytes a load, and a shared-memory
    exchange each step.) 16-bit x: int32 words of two columns (two loads); float32 x: the
    floats (four)."""
    DT: tl.constexpr = XR.dtype.element_ty
    i = tl.arange(0, 4)[None, None, :]
    hm = hmask[None, :, None]
    if DT == tl.float32:
        p = XR + zn + hh[None, :, None] * 16 + i
        if EVEN:
            a, b, c, d = tl.load(p), tl.load(p + 4), tl.load(p + 8), tl.load(p + 12)
        else:
            m = hm
            a = tl.load(p, mask=m, other=0.0)
            b = tl.load(p + 4, mask=m, other=0.0)
            c = tl.load(p + 8, mask=m, other=0.0)
            d = tl.load(p + 12, mask=m, other=0.0)
        a0, a1, a2, a3 = _split4(a, BLOCK_N, BLOCK_H)
        b0, b1, b2, b3 = _split4(b, BLOCK_N, BLOCK_H)
        c0, c1, c2, c3 = _split4(c, BLOCK_N, BLOCK_H)
        d0, d1, d2, d3 = _split4(d, BLOCK_N, BLOCK_H)
        out = (a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3)
    else:
        p = XR.to(tl.pointer_type(tl.int32)) + zn + hh[None, :, None] * 8 + i
        if EVEN:
            a, b = tl.load(p), tl.load(p + 4)
        else:
            a = tl.load(p, mask=hm, other=0)
            b = tl.load(p + 4, mask=hm, other=0)
        a0, a1, a2, a3 = _split4(a, BLOCK_N, BLOCK_H)
        b0, b1, b2, b3 = _split4(b, BLOCK_N, BLOCK_H)
        out = (_x16(a0, False, DT), _x16(a0, True, DT), _x16(a1, False, DT), _x16(a1, True, DT),
               _x16(a2, False, DT), _x16(a2, True, DT), _x16(a3, False, DT), _x16(a3, True, DT),
               _x16(b0, False, DT), _x16(b0, True, DT), _x16(b1, False, DT), _x16(b1, True, DT),
               _x16(b2, False, DT), _x16(b2, True, DT), _x16(b3, False, DT), _x16(b3, True, DT))
    return out


@triton.jit
def _xsum(xs):
    """Σ of a half group's 16 x columns (``_x_quads``), a pairwise tree."""
    s0 = (xs[0] + xs[1]) + (xs[2] + xs[3])
    s1 = (xs[4] + xs[5]) + (xs[6] + xs[7])
    s2 = (xs[8] + xs[9]) + (xs[10] + xs[11])
    s3 = (xs[12] + xs[13]) + (xs[14] + xs[15])
    return (s0 + s1) + (s2 + s3)


@triton.jit
def _scaled(p, xs, s, o, HAS_MIN: tl.constexpr):
    """A half group's sums p [BLOCK_N, BLOCK_H] with its scale (and offset: ``s·p + o·Σ x``)."""
    if HAS_MIN:
        out = p * s + o * _xsum(xs)
    else:
        out = p * s
    return out


@triton.jit
def gemv2(X, C, S, MN, Y, M, N, K, stride_x, stride_y, GS: tl.constexpr, HAS_MIN: tl.constexpr,
          ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, EVEN: tl.constexpr):
    """y[r, n] = Σ_k x[r, k] · w[n, k] for ROWS rows of x a program; grid (cdiv(M, ROWS),
    cdiv(N, BLOCK_N)); BLOCK_H half groups (16 columns) a step. ``EVEN``: the step divides K
    (no masks)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    r0 = pid_m * ROWS
    h = tl.arange(0, BLOCK_H)
    q = tl.arange(0, 4)
    halves = K // 16
    # a row's words: (K // 32) · 8, so Triton sees each row start 16-byte aligned
    w_ptrs = (C.to(tl.pointer_type(tl.int32)) + (n * ((K // 32) * 8))[:, None, None]
              + (h * 4)[None, :, None] + q[None, None, :])
    GPH: tl.constexpr = 32 // GS  # scales a group of 32 columns holds (2 for GS = 16)
    s_ptrs = S + (n * ((K // 32) * GPH))[:, None] + (h * GPH // 2)[None, :]
    m_ptrs = MN + (n * (K // 32))[:, None] + (h // 2)[None, :]
    # the rows' x (past M: the last row, read but not stored)
    xr0 = X + tl.minimum(r0, M - 1).to(tl.int64) * stride_x
    xr1 = X + tl.minimum(r0 + 1, M - 1).to(tl.int64) * stride_x
    xr2 = X + tl.minimum(r0 + 2, M - 1).to(tl.int64) * stride_x
    xr3 = X + tl.minimum(r0 + 3, M - 1).to(tl.int64) * stride_x
    zn = (n * 0)[:, None, None]  # x's pointers broadcast over the weight rows (``_x_quads``)
    acc0 = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for h0 in range(0, halves, BLOCK_H):
        hh = h0 + h
        hmask = hh < halves
        if EVEN:
            u = tl.load(w_ptrs + h0 * 4)
            s = _half(tl.load(s_ptrs + h0 * GPH // 2))
            o = _half(tl.load(m_ptrs + h0 // 2)) if HAS_MIN else s
        else:
            u = tl.load(w_ptrs + h0 * 4, mask=hmask[None, :, None], other=0)
            s = _half(tl.load(s_ptrs + h0 * GPH // 2, mask=hmask[None, :], other=0))
            if HAS_MIN:
                o = _half(tl.load(m_ptrs + h0 // 2, mask=hmask[None, :], other=0))
            else:
                o = s
        u0, u1, u2, u3 = _split4(u ^ -0x7F7F7F80, BLOCK_N, BLOCK_H)  # bytes: code + 128
        us = (u0, u1, u2, u3)
        x0 = _x_quads(xr0, zn, hh, hmask, BLOCK_N, BLOCK_H, EVEN)
        x1 = x0
        x2 = x0
        x3 = x0
        if ROWS > 1:
            x1 = _x_quads(xr1, zn, hh, hmask, BLOCK_N, BLOCK_H, EVEN)
        if ROWS > 2:
            x2 = _x_quads(xr2, zn, hh, hmask, BLOCK_N, BLOCK_H, EVEN)
            x3 = _x_quads(xr3, zn, hh, hmask, BLOCK_N, BLOCK_H, EVEN)
        p0 = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
        p1 = p0
        p2 = p0
        p3 = p0
        for qq in tl.static_range(4):
            for j in tl.static_range(4):
                c = _code(us[qq], j)  # made once, met by every row's x
                p0 += c * x0[4 * qq + j]
                if ROWS > 1:
                    p1 += c * x1[4 * qq + j]
                if ROWS > 2:
                    p2 += c * x2[4 * qq + j]
                    p3 += c * x3[4 * qq + j]
        acc0 += _scaled(p0, x0, s, o, HAS_MIN)
        if ROWS > 1:
            acc1 += _scaled(p1, x1, s, o, HAS_MIN)
        if ROWS > 2:
            acc2 += _scaled(p2, x2, s, o, HAS_MIN)
            acc3 += _scaled(p3, x3, s, o, HAS_MIN)
    _store(Y, acc0, r0, M, n, nmask, stride_y)
    if ROWS > 1:
        _store(Y, acc1, r0 + 1, M, n, nmask, stride_y)
    if ROWS > 2:
        _store(Y, acc2, r0 + 2, M, n, nmask, stride_y)
        _store(Y, acc3, r0 + 3, M, n, nmask, stride_y)


@triton.jit
def _store(Y, acc, row, M, n, nmask, stride_y):
    """Row ``row``'s outputs (the half-group sums added up) where it is below M."""
    y = tl.sum(acc, 1)
    tl.store(Y + row.to(tl.int64) * stride_y + n, y.to(Y.dtype.element_ty),
             mask=nmask & (row + 0 * n < M))
