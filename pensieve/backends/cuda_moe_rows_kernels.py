"""The expert-major pick GEMV on the CUDA cores (``cuda_moe_rows``): ``cuda_moe_kernels.pick_gemv``'s
K loop run once over an expert's weight tile for up to R of the tokens that picked it.

``pick_gemv`` reads an expert's slice once a pick: at 8 tokens gpt-oss-20b's 32 picks land on
~21 distinct experts (~50% more bytes than needed), Qwen3-30B-A3B's 64 on ~51. Here one program
per (expert, BLOCK_N outputs) finds on the device the tokens that picked its expert (``IDS``
token-major [T·TOPK], a token's top-k ids distinct: an expert has at most one pick a token;
an expert no token picked exits at once), then runs passes of R rows (R = ``ROWS``, a
constexpr 1, 2 or 4): each pass streams the expert's weight tile once, dequantises each code
once and multiplies it against the pass's R x rows; a count that R does not divide ends in
passes of 2 and 1 rows (no padded rows), whose weights come from L1/L2.

The loads are pick_gemv's (``_row_dot``): the codes as int32 word quads, a thread holding a
row's group (4-bit layouts: one 16-byte load; SIX's high bit pairs 8 bytes; int8: two), x as
int64 words in the codes' layout (``cuda_moe_kernels._x_group``, once a row). Sharing one
weight across rows without an exchange between threads: the word quads become float32
*codes [BLOCK_N, G, 4, 2] once a step (``_step_weights``: ``_quad_dot``'s exponent-OR decodes;
where a group has an offset — INT4, Q4K, int8 ``HAS_MIN`` — times its scale plus its offset in
the same registers, the whole dequantised weight, one FMA a code for all rows where a row's Σx
a group would cost each row about as much), and each row multiplies its own x quads into them
and sums a group in-thread into its [BLOCK_N, G] accumulator (``_row_acc``; the scale-only
layouts: × the group's or half group's scale there, as pick_gemv). The row axis is unrolled
(explicit accumulators, constexpr R), every row's tensors in the codes' layout; the
accumulators are summed over groups after the loop. FP4 keeps ``_quad_dot``'s 2^−14 (× 2^14
once a row sum).

Outputs per pick exactly as ``pick_gemv``: row p = t·TOPK + j of Y; ``GATHER``: x row = token
t (gate/up), else the pick's own row (down reads h's pick rows); ``FUSE`` (+ ``PAIR``: gate and
up rows interleaved in one loop), ``HAS_BIAS``, ``SWIGLU``, ``ROUTED``; every layout
(``INT4``, ``Q4K``, ``SIX``, int8 ``GS`` 16/32 ± ``HAS_MIN``, ``FP4``); ``MASK_K``: steps
masked past K (a BLOCK_K that does not divide it). No host sync, grid fixed by the shapes:
CUDA graphs capture it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_moe_kernels import (_e8m0, _glu, _half, _load, _q4k_factors,
                                                _quad_words, _scale_offset, _x_group)


@triton.jit
def _codes(u, CODE: tl.constexpr, BIAS: tl.constexpr):
    """Word quads ``u`` [BN, G, 4, 2] → the float32 codes of their bytes 0..3 (c_j: byte j of
    each word), minus ``BIAS`` — ``cuda_moe_kernels._quad_dot``'s decodes (``CODE`` 0: codes
    below 128; 1: int8 codes with the top bits flipped; 2: E2M1 pairs × 2^−14), kept as values
    instead of summed against one row's x."""
    if CODE == 2:
        hb = tl.arange(0, 2)[None, None, None, :] * 4  # the high nibbles four bits on
        v = u >> hb
        h = ((v << 9) & 0x0E000E00) | ((v << 12) & -0x7FFF8000)  # bytes 0 | 2
        c0 = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        c2 = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        h = ((v << 1) & 0x0E000E00) | ((v << 4) & -0x7FFF8000)  # bytes 1 | 3
        c1 = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        c3 = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        FLIP: tl.constexpr = 128.0 if CODE == 1 else 0.0
        c0 = ((u & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + FLIP + BIAS)
        c1 = ((u & 0xFF00) | 0x47000000).to(tl.float32, bitcast=True) - (32768.0 + FLIP + BIAS)
        if CODE == 0:
            c2 = ((u & 0x7F0000) | 0x43000000).to(tl.float32, bitcast=True) - (128.0 + BIAS)
        else:
            c2 = (((u >> 16) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - (
                8388608.0 + FLIP)
        c3 = (((u >> 24) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - (
            8388608.0 + FLIP + BIAS)
    return c0, c1, c2, c3


@triton.jit
def _scaled(c0, c1, c2, c3, s, o, HAS_O: tl.constexpr):
    """c_j · s (+ o): ``s``, ``o`` broadcast over the codes."""
    if HAS_O:
        c0 = c0 * s + o
        c1 = c1 * s + o
        c2 = c2 * s + o
        c3 = c3 * s + o
    else:
        c0 = c0 * s
        c1 = c1 * s
        c2 = c2 * s
        c3 = c3 * s
    return c0, c1, c2, c3


@triton.jit
def _step_weights(w_ptrs, s_ptrs, d_ptrs, h_ptrs, m_ptrs, gm, q, j, NIBBLES: tl.constexpr,
                  SIX: tl.constexpr, FP4: tl.constexpr, Q4K: tl.constexpr, GS: tl.constexpr,
                  HAS_MIN: tl.constexpr, MASKED: tl.constexpr):
    """One step's codes at the step's pointers (as ``_row_dot``'s): four float32 [BN, G, 4, 2]
    (c_j[n, g, q, h]: column 32g + 16h + 4q + j of row n) and a scale ``s``. Where a group has
    an offset (``DEQ``: INT4, Q4K, int8 with ``HAS_MIN``) the codes come out dequantised —
    code·scale + offset, one FMA a code for all the rows, where a row's Σx per group would cost
    it more — and ``s`` is unused; else the raw codes (SIX's − 32, FP4's × 2^−14) and ``s`` the
    scale to multiply a row's sums by: [BN, G, 1], or [BN, G, 2] a half group each (SIX, int8
    with 16-wide groups). Q4K: ``s_ptrs`` [BN, G, 4] each group's super-block word quad,
    ``j`` [G] the groups' sub-blocks in it (``cuda_moe_kernels._q4k_factors``)."""
    if NIBBLES:
        w = _load(w_ptrs, gm[None, :, None], MASKED)
        if FP4:
            c0, c1, c2, c3 = _codes(tl.join(w, w), 2, 0.0)
            s = _e8m0(_load(s_ptrs, gm[None, :], MASKED).to(tl.int32))[:, :, None]
        else:
            lo = w & 0x0F0F0F0F
            hi = (w >> 4) & 0x0F0F0F0F
            if SIX:  # the high bit pairs (``_nibble_step``'s); codes u − 32
                h = _load(h_ptrs, gm[None, :, None], MASKED)
                sh = ((q // 2) * 2)[None, None, :]
                lo |= ((h >> sh) & 0x03030303) << 4
                hi |= ((h >> (sh + 4)) & 0x03030303) << 4
                c0, c1, c2, c3 = _codes(tl.join(lo, hi), 0, 32.0)
                sc = _load(s_ptrs, gm[None, :], MASKED).to(tl.int32)  # two int8 sub-scales
                d = _half(_load(d_ptrs, gm[None, :], MASKED))
                s = tl.join(((sc << 24) >> 24).to(tl.float32) * d, (sc >> 8).to(tl.float32) * d)
            elif Q4K:  # code·(d·sc) − dmin·m: both products exact in float32
                c0, c1, c2, c3 = _codes(tl.join(lo, hi), 0, 0.0)
                w0, w1, w2, w3 = _quad_words(_load(s_ptrs, gm[None, :, None], MASKED))
                s, o = _q4k_factors(w0, w1, w2, w3, j[None, :])
                s = s[:, :, None, None]
                c0, c1, c2, c3 = _scaled(c0, c1, c2, c3, s, (-o)[:, :, None, None], True)
            else:
                c0, c1, c2, c3 = _codes(tl.join(lo, hi), 0, 0.0)
                s, o = _scale_offset(_load(s_ptrs, gm[None, :], MASKED))
                s = s[:, :, None, None]
                c0, c1, c2, c3 = _scaled(c0, c1, c2, c3, s, o[:, :, None, None], True)
    else:  # int8: a group's two word quads (a half group each), top bits flipped
        wa = _load(w_ptrs, gm[None, :, None], MASKED)
        wb = _load(w_ptrs + 4, gm[None, :, None], MASKED)
        c0, c1, c2, c3 = _codes(tl.join(wa, wb) ^ -0x7F7F7F80, 1, 0.0)
        if GS == 32:
            s = _half(_load(s_ptrs, gm[None, :], MASKED))[:, :, None]
            if HAS_MIN:
                o = _half(_load(m_ptrs, gm[None, :], MASKED))[:, :, None, None]
                c0, c1, c2, c3 = _scaled(c0, c1, c2, c3, s[:, :, :, None], o, True)
        else:  # a scale a half group: the group's two as one int32
            ss = _load(s_ptrs, gm[None, :], MASKED)
            s = tl.join(_half(ss.to(tl.int16)), _half((ss >> 16).to(tl.int16)))
    return c0, c1, c2, c3, s


@triton.jit
def _row_acc(acc, c0, c1, c2, c3, s, x_ptrs, gm, DT: tl.constexpr, MASKED: tl.constexpr,
             DEQ: tl.constexpr):
    """acc [BN, G] + one row's step over the step's codes (``_step_weights``) and its x quads
    at ``x_ptrs`` (``_x_group``): ``DEQ`` (dequantised weights) Σ_{q,h,j} w_j · x_j; else the
    half groups' Σ c·x times their scales (``pick_gemv``'s order of work). (Accumulating
    [BN, G, 4, 2] instead saves the in-thread sums, 8 adds a row a group, but took 150-255
    registers at 4 rows or paired and spilled fused.)"""
    x0, x1, x2, x3 = _x_group(x_ptrs, gm[:, None], DT, MASKED)
    if DEQ:
        out = acc + tl.sum(tl.sum(c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3, 3), 2)
    else:
        p = tl.sum(c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3, 2)  # [BN, G, 2]
        out = acc + tl.sum(p * s, 2)
    return out


@triton.jit
def _rows_dot(X0, X1, X2, X3, W, S, MN, D, wrow, K, INT4: tl.constexpr, SIX: tl.constexpr,
              GS: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, FP4: tl.constexpr, Q4K: tl.constexpr,
              MASKED: tl.constexpr, R: tl.constexpr):
    """Σ_k x_r[k] · w[wrow, k] for the rows' x at ``X0``..``X{R-1}`` (the others unused) and
    the stacked weight rows ``wrow`` [BLOCK_N]: each step's codes decoded once for the R
    rows. Pointers as ``cuda_moe_kernels._row_dot``'s; returns four [BLOCK_N] (rows past R:
    zeros)."""
    NIBBLES: tl.constexpr = INT4 or Q4K or SIX or FP4
    DEQ: tl.constexpr = INT4 or Q4K or (HAS_MIN and not NIBBLES)  # groups with offsets
    DT: tl.constexpr = X0.dtype.element_ty
    WORDS: tl.constexpr = 4 if NIBBLES else 8  # code words a group
    G: tl.constexpr = BLOCK_K // 32
    gi = tl.arange(0, G)
    q = tl.arange(0, 4)
    w_ptrs = (W.to(tl.pointer_type(tl.int32)) + (wrow * ((K // 32) * WORDS))[:, None, None]
              + (gi * WORDS)[None, :, None] + q[None, None, :])
    XW: tl.constexpr = 2 if DT == tl.float32 else 4  # x's columns an int64 word
    xo = (gi * (32 // XW))[:, None] + (q * (4 // XW))[None, :]
    x0p = X0.to(tl.pointer_type(tl.int64)) + xo
    x1p = X1.to(tl.pointer_type(tl.int64)) + xo
    x2p = X2.to(tl.pointer_type(tl.int64)) + xo
    x3p = X3.to(tl.pointer_type(tl.int64)) + xo
    s_row = wrow[:, None] * (K // 32) + gi[None, :]
    if SIX:
        s_ptrs = S.to(tl.pointer_type(tl.int16)) + s_row
    elif Q4K:  # each group's super-block word quad (``_row_dot``'s)
        s_ptrs = (S.to(tl.pointer_type(tl.int32)) + (wrow * ((K // 256) * 4))[:, None, None]
                  + ((gi // 8) * 4)[None, :, None] + q[None, None, :])
    elif GS == 16 and not NIBBLES:
        s_ptrs = S.to(tl.pointer_type(tl.int32)) + s_row
    else:
        s_ptrs = S + s_row
    d_ptrs = D + wrow[:, None] * (K // 256) + gi[None, :] // 8
    h_ptrs = (MN.to(tl.pointer_type(tl.int32)) + (wrow * ((K // 32) * 2))[:, None, None]
              + (gi * 2)[None, :, None] + (q % 2)[None, None, :])
    a0 = tl.zeros([BLOCK_N, G], tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    for k0 in range(0, K, BLOCK_K):
        gm = k0 + gi * 32 < K
        g0 = k0 // 32
        if Q4K:  # the step's super-block(s): a quad each
            sp = s_ptrs + (k0 // 256) * 4
        else:
            sp = s_ptrs + g0
        c0, c1, c2, c3, s = _step_weights(w_ptrs + g0 * WORDS, sp, d_ptrs + k0 // 256,
                                          h_ptrs + g0 * 2, MN + s_row + g0, gm, q,
                                          (g0 + gi) % 8, NIBBLES, SIX, FP4, Q4K, GS, HAS_MIN,
                                          MASKED)
        xk = k0 // XW
        a0 = _row_acc(a0, c0, c1, c2, c3, s, x0p + xk, gm, DT, MASKED, DEQ)
        if R > 1:
            a1 = _row_acc(a1, c0, c1, c2, c3, s, x1p + xk, gm, DT, MASKED, DEQ)
        if R > 2:
            a2 = _row_acc(a2, c0, c1, c2, c3, s, x2p + xk, gm, DT, MASKED, DEQ)
            a3 = _row_acc(a3, c0, c1, c2, c3, s, x3p + xk, gm, DT, MASKED, DEQ)
    y0 = tl.sum(a0, 1)
    y1 = tl.sum(a1, 1)
    y2 = tl.sum(a2, 1)
    y3 = tl.sum(a3, 1)
    if FP4:  # the decode's 2^-14 back (a power of two: exact)
        y0 = y0 * 16384.0
        y1 = y1 * 16384.0
        y2 = y2 * 16384.0
        y3 = y3 * 16384.0
    return y0, y1, y2, y3


@triton.jit
def _row_of(rank, pick, r, TOPK: tl.constexpr, GATHER: tl.constexpr):
    """The r-th token (in token order) that picked the program's expert (``rank`` [TB]: each
    token's among them, −1 where it did not pick it; ``pick`` [TB]: its pick t·TOPK + j): (its
    pick, x's row: t where ``GATHER`` else the pick), int64; one reduction."""
    p = tl.sum(tl.where(rank == r, pick, 0), 0).to(tl.int64)
    if GATHER:
        row = p // TOPK
    else:
        row = p
    return p, row


@triton.jit
def _finish(y, u, B, RW, Y, wrow, wrow2, n, nmask, pick, n_out, stride_y, FUSE: tl.constexpr,
            PAIR: tl.constexpr, ROUTED: tl.constexpr, HAS_BIAS: tl.constexpr,
            SWIGLU: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """A row's epilogue as ``pick_gemv``'s: biases, the fused activation (``PAIR``: ``y``
    holds gate and up interleaved, [2·BLOCK_N]; else ``u`` the up row sums), the routing
    weight, the store at the pick's row."""
    if FUSE and PAIR:
        if HAS_BIAS:
            y += tl.load(B + wrow2).to(tl.float32)
        g, u = tl.split(tl.reshape(y, [BLOCK_N, 2]))
        y = _glu(g, u, SWIGLU, ALPHA, LIMIT)
    else:
        if HAS_BIAS:
            y += tl.load(B + wrow).to(tl.float32)
        if FUSE:
            if HAS_BIAS:
                u += tl.load(B + wrow + n_out).to(tl.float32)
            y = _glu(y, u, SWIGLU, ALPHA, LIMIT)
    if ROUTED:
        y = y * tl.load(RW + pick).to(tl.float32)
    tl.store(Y + pick * stride_y + n, y.to(Y.dtype.element_ty), mask=nmask)


@triton.jit
def _rows_pass(X, RW, W, S, MN, D, B, Y, rank, pick, r0, e, pid, N, K, stride_x,
               stride_y, TOPK: tl.constexpr, GATHER: tl.constexpr, FUSE: tl.constexpr,
               ROUTED: tl.constexpr, INT4: tl.constexpr, SIX: tl.constexpr, GS: tl.constexpr,
               HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
               ALPHA: tl.constexpr, LIMIT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, FP4: tl.constexpr, PAIR: tl.constexpr,
               Q4K: tl.constexpr, MASKED: tl.constexpr, R: tl.constexpr):
    """Rows r0 .. r0 + R − 1 of the expert's tokens (all live): one pass over its weights."""
    p0, x0 = _row_of(rank, pick, r0, TOPK, GATHER)
    p1, x1, p2, x2, p3, x3 = p0, x0, p0, x0, p0, x0
    if R > 1:
        p1, x1 = _row_of(rank, pick, r0 + 1, TOPK, GATHER)
    if R > 2:
        p2, x2 = _row_of(rank, pick, r0 + 2, TOPK, GATHER)
        p3, x3 = _row_of(rank, pick, r0 + 3, TOPK, GATHER)
    if FUSE:
        n_out = N // 2
    else:
        n_out = N
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < n_out
    wrow = e * N + tl.where(nmask, n, 0).to(tl.int64)
    j = tl.arange(0, 2 * BLOCK_N)  # PAIR: row j is output j // 2's gate (j even) or up (odd)
    n2 = pid * BLOCK_N + j // 2
    wrow2 = e * N + tl.where(n2 < n_out, n2, 0).to(tl.int64) + (j % 2) * n_out
    X0 = X + x0 * stride_x
    X1 = X + x1 * stride_x
    X2 = X + x2 * stride_x
    X3 = X + x3 * stride_x
    if FUSE and PAIR:
        y0, y1, y2, y3 = _rows_dot(X0, X1, X2, X3, W, S, MN, D, wrow2, K, INT4, SIX, GS,
                                   HAS_MIN, 2 * BLOCK_N, BLOCK_K, FP4, Q4K, MASKED, R)
        u0, u1, u2, u3 = y0, y1, y2, y3
    else:
        y0, y1, y2, y3 = _rows_dot(X0, X1, X2, X3, W, S, MN, D, wrow, K, INT4, SIX, GS,
                                   HAS_MIN, BLOCK_N, BLOCK_K, FP4, Q4K, MASKED, R)
        u0, u1, u2, u3 = y0, y1, y2, y3
        if FUSE:
            u0, u1, u2, u3 = _rows_dot(X0, X1, X2, X3, W, S, MN, D, wrow + n_out, K, INT4, SIX,
                                       GS, HAS_MIN, BLOCK_N, BLOCK_K, FP4, Q4K, MASKED, R)
    _finish(y0, u0, B, RW, Y, wrow, wrow2, n, nmask, p0, n_out, stride_y, FUSE, PAIR, ROUTED,
            HAS_BIAS, SWIGLU, ALPHA, LIMIT, BLOCK_N)
    if R > 1:
        _finish(y1, u1, B, RW, Y, wrow, wrow2, n, nmask, p1, n_out, stride_y, FUSE, PAIR,
                ROUTED, HAS_BIAS, SWIGLU, ALPHA, LIMIT, BLOCK_N)
    if R > 2:
        _finish(y2, u2, B, RW, Y, wrow, wrow2, n, nmask, p2, n_out, stride_y, FUSE, PAIR,
                ROUTED, HAS_BIAS, SWIGLU, ALPHA, LIMIT, BLOCK_N)
        _finish(y3, u3, B, RW, Y, wrow, wrow2, n, nmask, p3, n_out, stride_y, FUSE, PAIR,
                ROUTED, HAS_BIAS, SWIGLU, ALPHA, LIMIT, BLOCK_N)


# T (the tokens) changes with the decode bucket: not specialised on (a count of 1 or 16 would
# compile another variant while serving); TB (a power of two ≥ T, at least 16) fixes the shapes
@triton.jit(do_not_specialize=["T"])
def rows_gemv(X, IDS, RW, W, S, MN, D, B, Y, T, N, K, stride_x, stride_y, TOPK: tl.constexpr,
              K_PAD: tl.constexpr, TB: tl.constexpr, GATHER: tl.constexpr, FUSE: tl.constexpr,
              ROUTED: tl.constexpr, INT4: tl.constexpr, SIX: tl.constexpr, GS: tl.constexpr,
              HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
              ALPHA: tl.constexpr, LIMIT: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, ROWS: tl.constexpr, FP4: tl.constexpr = False,
              PAIR: tl.constexpr = False, Q4K: tl.constexpr = False,
              MASK_K: tl.constexpr = False):
    """y[picks of expert program 0, outputs of program 1] (the module text); grid (E,
    cdiv(N_out, BLOCK_N)); ``IDS`` [T·TOPK] token-major, T ≤ TB; K_PAD a power of two ≥ TOPK;
    ``ROWS`` (1, 2, 4): the rows a pass over the weights serves; other arguments as
    ``cuda_moe_kernels.pick_gemv``'s."""
    e = tl.program_id(0)
    pid = tl.program_id(1)
    tok = tl.arange(0, TB)
    j = tl.arange(0, K_PAD)
    live = (tok < T)[:, None] & (j < TOPK)[None, :]
    hit2 = (tl.load(IDS + tok[:, None] * TOPK + j[None, :], mask=live, other=-1) == e) & live
    hit = tl.max(hit2.to(tl.int32), axis=1)
    count = tl.sum(hit, axis=0)
    if count == 0:  # no token picked this expert
        return
    pick = tok * TOPK + tl.sum(tl.where(hit2, j[None, :], 0), axis=1)
    # each token's rank among those that picked the expert (−1: not one of them)
    rank = tl.where(hit > 0, tl.cumsum(hit, axis=0) - 1, -1)
    e64 = e.to(tl.int64)
    full = (count // ROWS) * ROWS
    for r0 in range(0, full, ROWS):
        _rows_pass(X, RW, W, S, MN, D, B, Y, rank, pick, r0, e64, pid, N, K,
                   stride_x, stride_y, TOPK, GATHER, FUSE, ROUTED, INT4, SIX, GS, HAS_MIN,
                   HAS_BIAS, SWIGLU, ALPHA, LIMIT, BLOCK_N, BLOCK_K, FP4, PAIR, Q4K, MASK_K,
                   ROWS)
    if ROWS > 2:
        if count - full >= 2:
            _rows_pass(X, RW, W, S, MN, D, B, Y, rank, pick, full, e64, pid, N, K,
                       stride_x, stride_y, TOPK, GATHER, FUSE, ROUTED, INT4, SIX, GS, HAS_MIN,
                       HAS_BIAS, SWIGLU, ALPHA, LIMIT, BLOCK_N, BLOCK_K, FP4, PAIR, Q4K,
                       MASK_K, 2)
    if ROWS > 1:
        if (count - full) % 2 == 1:
            _rows_pass(X, RW, W, S, MN, D, B, Y, rank, pick, count - 1, e64, pid, N,
                       K, stride_x, stride_y, TOPK, GATHER, FUSE, ROUTED, INT4, SIX, GS,
                       HAS_MIN, HAS_BIAS, SWIGLU, ALPHA, LIMIT, BLOCK_N, BLOCK_K, FP4, PAIR,
                       Q4K, MASK_K, 1)
