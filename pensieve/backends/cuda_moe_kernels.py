"""Triton kernels of the fused mixture-of-experts MLP over expert weights kept as GGUF codes
(see ``cuda_moe.py`` for the layouts and the launchers).

Every expert's projection is one slice ``e`` of a stacked weight [E, N, K] held in one of the
two code layouts of the dense CUDA layers, or a 6-bit one:

* ``INT4`` (Q4_0/Q4_1/Q4_K, ``cuda_int4``): ``W`` uint8 [E, N, K/2], byte ``i`` of group ``g``
  holding column 32g+i (low nibble) and 32g+16+i (high nibble); ``S`` int32 [E, N, K/32], a
  group's float16 scale (low half) and float16 offset (high half): ``w = code·scale + offset``;
* int8 (Q8_0/Q5_x/IQ4_x/..., ``cuda_int8``): ``W`` the codes read as uint8 [E, N, K], ``S``
  float16 bits (int16) of a scale per ``GS`` columns, ``MN`` float16 bits of an offset per 32
  where ``HAS_MIN``: ``w = code·scale (+ offset)``;
* ``Q4K`` (Q4_K with the file's own factors): ``W`` as ``INT4``'s, ``S`` int32
  [E, N, K/256, 4], a word quad a super-block — word 0 the float16 ``d`` (low half) and
  ``dmin`` (high half), words 1-3 the file's 12 bytes of packed 6-bit sub-scales and sub-mins
  verbatim (``_q4k_factors``: sub-block j's ``sc``/``m`` from byte j % 4 of words 1-3) — one
  16-byte load gives a row's d, dmin and all 8 groups' factors (the 8 groups share it: L1);
  ``w = code·(d·sc) − dmin·m``, both products formed in float32 in the kernel (exact: 17 and
  17 significant bits) — the file's value exactly, in the file's 144 bytes a 256;
* ``SIX`` (Q6_K, 6-bit codes ``u = code + 32``): ``W`` the low 4 bits in the int4 layout
  [E, N, K/2], ``MN`` the high 2 bits four a byte [E, N, K/4] (byte ``i`` of group ``g``:
  columns 32g+i, +8, +16, +24 in bits 0-1, 2-3, 4-5, 6-7), ``S`` the int8 sub-scale per 16 and
  ``D`` the float16 bits of the super-scale per 256: ``w = (u − 32)·d·sc`` — the file's 210
  bytes a 256 (``cuda_q6k``'s layout). Other formats (Q4K too) take ``D`` as an unused
  argument.
* ``FP4`` (MXFP4, gpt-oss's experts): ``W`` uint8 [E, N, K/2], two E2M1 codes a byte in the
  int4 layout's order (GGML's own block order: byte ``i`` of group ``g`` holds column 32g+i in
  the low nibble, 32g+16+i in the high one), ``S`` uint8 [E, N, K/32] the E8M0 exponent byte
  ``e`` of each 32: ``w = e2m1(code) · 2^(e − 127)`` — the file's 17 bytes a 32 (``e`` = 0
  reads as a zero scale). The decode (``_e2m1``) is bit arithmetic: the code's three magnitude
  bits put at bits 9-11 of a float16 and its sign at bit 15 are that float16's exponent (bias
  15) and top mantissa bit, whose value is e2m1 · 2^−14 exactly — subnormals included (0.5 is
  a float16 subnormal here; the float16 → float32 conversion keeps them, where float32 bit
  tricks would meet denormal flushing) — so a code costs two shifts, one three-input logic op
  and one conversion, no table load or select chain; the 2^14 is folded into the group's
  scale (the GEMV: once per row sum).

A row of the MoE is a *pick*: (token t, its j-th expert), ``p = t·TOPK + j``. The first
projection reads x's row ``p // TOPK`` (``GATHER``), the second the pick's own row of the
activations. ``FUSE``: the weight is gate rows then up rows ([E, 2I, K]); a program computes
output column n from rows n and I+n and stores ``silu(gate)·up``. ``ROUTED``: the output row is
multiplied by the pick's routing weight (the down projection's epilogue). Outputs are per pick
([P, ·]); the caller sums a token's TOPK rows. ``HAS_BIAS``: ``B`` holds a bias per stacked
weight row [E·N] (gpt-oss), added to each row's dot product before the activation / routing
weight. ``SWIGLU``: gpt-oss's clamped activation instead of SiLU·up —
``g = min(g, LIMIT); u = clamp(u, ±LIMIT); (u + 1)·g·σ(ALPHA·g)``.

* ``pick_gemv`` — few picks (decode at small batch): one program per (pick, BLOCK_N outputs),
  no sorting: it reads its pick's expert id and runs a float32 GEMV on that expert's slice.
  Its codes come in as int32 words, a thread holding a row's group: the 4-bit layouts' 16
  bytes as a word quad (byte j of word q: column 32g + 4q + j, low nibble, and + 16, high
  nibble) in one 16-byte load (``ld.global.v4.b32``; SIX's high bit pairs 8 bytes,
  ``.v2.b32``; int8: a quad a half group; Q4K's super-block quad one more), row starts
  written (K // 32)·(words a group) so that Triton sees them 16-byte aligned whatever K's
  specialisation (the byte tensors this replaced took 8 bytes a load on the GPU, one with K
  unspecialised); x as int64 words, four
  16-bit columns each — the quad a code word meets — a thread's quads contiguous: 16-byte
  loads, in the words' layout, so the loop has no shared-memory exchange (``_x_group``). A
  word's bytes become floats by OR-ing each in place under a float32 exponent whose unit is
  1 there and taking the power of two off, E2M1 codes two at a time as a float16 pair
  (``_quad_dot``): the same exact products as before, summed in another order.
* ``align`` — one program sorts up to a few hundred picks by expert on the device: per expert
  its rows padded to BLOCK_M, ``SORTED`` the pick of each padded slot (P where empty) and
  ``BEXP`` each block's expert (E past the last block); the worst case fixes the grid.
* ``grouped_gemm`` — one program per (block of BLOCK_M sorted picks of one expert, BLOCK_N
  outputs): x's gathered rows times the expert's weight tile dequantised in registers to x's
  dtype, on the tensor cores; blocks past the last exit at once. The 4-bit codes' rows are
  written (K // 32)·16 bytes so that the pipeline's async copies take up to 16 bytes (8 at
  most before; SIX's high bit pairs 8, one byte before); the scales are still loaded per
  element of the tile (L1 hits), except Q4K's: a row's super-block words once a step (steps
  of at most 256 columns), each element's factors picked from them by its column.

Nothing here syncs with the host and every grid is fixed by (picks, shapes): CUDA graphs
capture them. float32 x (tests) takes IEEE products, never TF32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _half(bits):
    """float16 bits (int16) → float32."""
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _codes8(b):
    """uint8 bytes of int8 codes → the codes as float32, exactly (no conversion instruction)."""
    u = (b.to(tl.int32) ^ 0x80) | 0x4B000000  # 2**23 + 128 + code
    return u.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _u6(u):
    """int32 values 0..63 (or any below 2**23) → float32, exactly, without a conversion."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _e2m1(n):
    """int32 ``n``'s low nibble (an E2M1 code; bits above 3 ignored) → float32 e2m1(code) ·
    2^−14, exactly: the code's bits placed as a float16's (see the module text)."""
    bits = ((n & 7) << 9) | ((n & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e8m0(e):
    """E8M0 exponent bytes (int32 0..254) → float32 2^(e − 127); 0 → 0."""
    return (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_offset(so):
    s = (so & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    o = (so >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, o


@triton.jit
def _q4k_factors(w0, w1, w2, w3, j):
    """float32 (d·sc, dmin·m) of Q4_K sub-block ``j`` (0..7, broadcast against the words) of
    a super-block's word quad (``Q4K``'s ``S``; the module text): whole-word masks give the 8
    sub-scales as the bytes of two words (j < 4: the low 6 bits of word 1's byte j; j ≥ 4:
    word 3's low nibbles with word 1's top bit pairs as bits 4-5), the sub-mins likewise
    (words 2 and 3's high nibbles), and ``j`` picks one word and its byte. Both products
    exact in float32 (a float16 times an integer < 64)."""
    sh = (j % 4) * 8
    hi = j >= 4
    sc = tl.where(hi, (w3 & 0x0F0F0F0F) | ((w1 >> 2) & 0x30303030), w1 & 0x3F3F3F3F)
    m = tl.where(hi, ((w3 >> 4) & 0x0F0F0F0F) | ((w2 >> 2) & 0x30303030), w2 & 0x3F3F3F3F)
    d, dmin = _scale_offset(w0)
    return d * _u6((sc >> sh) & 63), dmin * _u6((m >> sh) & 63)


@triton.jit
def _quad_words(v):
    """A [R, G, 4] word quad tensor's four words, each [R, G] (in-thread: no exchange)."""
    a, b = tl.split(tl.reshape(v, [v.shape[0], v.shape[1], 2, 2]))  # words (0, 2), (1, 3)
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    return w0, w1, w2, w3


@triton.jit
def _dot(a, b, acc):
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _mma(x, w, acc, SWAP: tl.constexpr):
    """acc += x·w ([M, K]·[K, N]), or with ``SWAP`` the transposed product w·x: the weight tile
    [N, K] the left operand, the tokens' x [K, M] the right (acc [N, M])."""
    if SWAP:
        acc = _dot(w.to(x.dtype), x, acc)
    else:
        acc = _dot(x, w.to(x.dtype), acc)
    return acc


@triton.jit
def _glu(g, u, SWIGLU: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """The fused activation of gate ``g`` and up ``u`` (float32)."""
    if SWIGLU:
        g = tl.minimum(g, LIMIT)
        u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        out = (u + 1.0) * (g * tl.sigmoid(g * ALPHA))
    else:
        out = g * tl.sigmoid(g) * u
    return out


@triton.jit
def _x_group(x_ptrs, mask, DT: tl.constexpr, MASKED: tl.constexpr):
    """x[4·quad + j] and x[4·quad + 16 + j] for j < 4 at ``x_ptrs`` (x's int64 words at the
    low half group's quads [G, 4]; ``MASKED``: where ``mask`` [G, 1]) as four float32 [1, G,
    4, 2] (last axis: the half group). x is read as int64 words — four 16-bit columns a word
    (bfloat16: a shift or a mask each, float16: a conversion), two a word for float32
    (tests) — a thread's quads contiguous: 16 bytes a load. Fewer quads a half than a
    program's threads (BLOCK_K / 8 < 32·num_warps), Triton loads them in the layout of the
    weight words they meet: no shared-memory exchange. Masked quads read zeros."""
    if DT == tl.float32:  # x_ptrs: 2·quad
        if MASKED:
            a0 = tl.load(x_ptrs, mask=mask, other=0)
            a1 = tl.load(x_ptrs + 1, mask=mask, other=0)
            b0 = tl.load(x_ptrs + 8, mask=mask, other=0)
            b1 = tl.load(x_ptrs + 9, mask=mask, other=0)
        else:
            a0 = tl.load(x_ptrs)
            a1 = tl.load(x_ptrs + 1)
            b0 = tl.load(x_ptrs + 8)
            b1 = tl.load(x_ptrs + 9)
        v01 = tl.join(a0, b0)[None, :, :, :]
        v23 = tl.join(a1, b1)[None, :, :, :]
        x0 = v01.to(tl.int32).to(tl.float32, bitcast=True)
        x1 = (v01 >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        x2 = v23.to(tl.int32).to(tl.float32, bitcast=True)
        x3 = (v23 >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        if MASKED:
            v = tl.join(tl.load(x_ptrs, mask=mask, other=0),
                        tl.load(x_ptrs + 4, mask=mask, other=0))[None, :, :, :]
        else:
            v = tl.join(tl.load(x_ptrs), tl.load(x_ptrs + 4))[None, :, :, :]
        lo = v.to(tl.int32)
        hi = (v >> 32).to(tl.int32)
        if DT == tl.bfloat16:  # float32's top half
            x0 = (lo << 16).to(tl.float32, bitcast=True)
            x1 = (lo & -65536).to(tl.float32, bitcast=True)
            x2 = (hi << 16).to(tl.float32, bitcast=True)
            x3 = (hi & -65536).to(tl.float32, bitcast=True)
        else:
            x0 = lo.to(tl.int16).to(DT, bitcast=True).to(tl.float32)
            x1 = (lo >> 16).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
            x2 = hi.to(tl.int16).to(DT, bitcast=True).to(tl.float32)
            x3 = (hi >> 16).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
    return x0, x1, x2, x3


@triton.jit
def _quad_dot(u, x0, x1, x2, x3, CODE: tl.constexpr):
    """[R, G, 2]: each half group's Σ_q Σ_j code(byte j of u[.., q, h]) · x_j[.., q, h] over
    word quads u [R, G, 4, 2] (byte j of word q: column 4q + j of half h) and x's quads
    (``_x_group``), and its Σ x (the second result, 0 for E2M1). ``CODE`` 0: codes below 128
    (words whose bytes' top bits are clear: the 4- and 6-bit codes), 1: int8 codes in words
    whose bytes' top bits are flipped (``u ^ 0x80808080``): each byte OR-ed in place under a
    float32 exponent whose unit there is 1 (2^23 at bits 0-7, 2^15 at 8-15, 2^7 at 16-22) and
    the power of two taken off — the code exactly, one logic op and one add (byte 3, and
    int8's byte 2, shifted down first). ``CODE`` 2: E2M1 codes in the bytes' nibbles, low
    nibbles in half 0 and high ones in half 1 of ``u`` (the same word twice; × 2^−14): two
    codes a shift and logic op — the magnitude bits of bytes j and j + 2 moved to bits 9-11
    and 25-27 and the sign bits to 15 and 31 are a pair of float16 whose values are
    ``_e2m1``'s.

    Σ x comes out in the words' layout: x minus a zero made from u (``(u & 0x0F0F0F0F) >> 28``,
    folded to 0 by LLVM and the subtraction with it, x − 0.0 being x) — laid out alone, the
    sums took other threads and a shared-memory exchange each step."""
    if CODE == 2:
        hb = tl.arange(0, 2)[None, None, None, :] * 4  # the high nibbles four bits on
        v = u >> hb
        h = ((v << 9) & 0x0E000E00) | ((v << 12) & -0x7FFF8000)  # bytes 0 | 2
        p = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * x0
        p += (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * x2
        h = ((v << 1) & 0x0E000E00) | ((v << 4) & -0x7FFF8000)  # bytes 1 | 3
        p += h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * x1
        p += (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * x3
        xs = tl.zeros([1, 1, 1], tl.float32)  # (unused: E2M1 has no offsets)
    else:
        FLIP: tl.constexpr = 128.0 if CODE == 1 else 0.0  # int8: the flipped top bit's 128
        c = ((u & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + FLIP)
        p = c * x0
        c = ((u & 0xFF00) | 0x47000000).to(tl.float32, bitcast=True) - (32768.0 + FLIP)
        p += c * x1
        if CODE == 0:
            c = ((u & 0x7F0000) | 0x43000000).to(tl.float32, bitcast=True) - 128.0
        else:
            c = (((u >> 16) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - (
                8388608.0 + FLIP)
        p += c * x2
        c = (((u >> 24) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + FLIP)
        p += c * x3
        xs = tl.sum(((x0 + x1) + (x2 + x3)) - ((u & 0x0F0F0F0F) >> 28).to(tl.float32), 2)
    return tl.sum(p, 2), xs


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    """``tl.load`` of ``ptrs``: zeros where not ``mask`` if ``MASKED``, else unmasked."""
    if MASKED:
        v = tl.load(ptrs, mask=mask, other=0)
    else:
        v = tl.load(ptrs)
    return v


@triton.jit
def _nibble_step(w_ptrs, x_ptrs, s_ptrs, d_ptrs, h_ptrs, gm, q, j, DT: tl.constexpr,
                 SIX: tl.constexpr, FP4: tl.constexpr, Q4K: tl.constexpr, MASKED: tl.constexpr):
    """One step's [R, G] sums over the 4-bit layouts (``INT4``, ``Q4K``, ``SIX``, ``FP4``) at
    the step's pointers (``_row_dot``): a group's 16 code bytes are its word quad (byte j of
    word q: columns 32g + 4q + j, low nibble, and + 16, high nibble), one 16-byte load.
    ``MASKED`` (always for FP4): a K that BLOCK_K does not divide (gpt-oss's 2880, or a step
    wider than K: 30B-A3B's down, 768, in one 1024-wide step) reads zeros past it — codes,
    scales and x — so those groups add 0. Q4K: ``s_ptrs`` [R, G, 4] each group's super-block
    word quad (one 16-byte load), ``j`` [G] the groups' sub-blocks in it."""
    x0, x1, x2, x3 = _x_group(x_ptrs, gm[:, None], DT, MASKED)
    if FP4:
        w = tl.load(w_ptrs, mask=gm[None, :, None], other=0)
        p, _ = _quad_dot(tl.join(w, w), x0, x1, x2, x3, 2)
        e = tl.load(s_ptrs, mask=gm[None, :], other=0).to(tl.int32)
        out = tl.sum(p, 2) * _e8m0(e)
    else:
        w = _load(w_ptrs, gm[None, :, None], MASKED)
        lo = w & 0x0F0F0F0F
        hi = (w >> 4) & 0x0F0F0F0F
        if SIX:  # the high bit pairs: word q % 2 of the group's two holds word q's at
            # 2·(q // 2) (loaded for q = 0, 1 and, from L1, again for q = 2, 3: as one tensor
            # with the words it stays in their layout); 6-bit codes u = code + 32
            h = _load(h_ptrs, gm[None, :, None], MASKED)
            sh = ((q // 2) * 2)[None, None, :]
            lo |= ((h >> sh) & 0x03030303) << 4
            hi |= ((h >> (sh + 4)) & 0x03030303) << 4
        p, xs = _quad_dot(tl.join(lo, hi), x0, x1, x2, x3, 0)  # [R, G, 2]: the half groups
        if SIX:  # s_ptrs: the group's two int8 sub-scales (one a half group) as one int16
            pa, pb = tl.split(p - 32.0 * xs)
            sc = _load(s_ptrs, gm[None, :], MASKED).to(tl.int32)
            d = _half(_load(d_ptrs, gm[None, :], MASKED))
            out = (pa * ((sc << 24) >> 24).to(tl.float32) + pb * (sc >> 8).to(tl.float32)) * d
        elif Q4K:  # d·sc·q − dmin·m
            w0, w1, w2, w3 = _quad_words(_load(s_ptrs, gm[None, :, None], MASKED))
            s, o = _q4k_factors(w0, w1, w2, w3, j[None, :])
            out = tl.sum(p, 2) * s - tl.sum(xs, 2) * o
        else:
            s, o = _scale_offset(_load(s_ptrs, gm[None, :], MASKED))
            out = tl.sum(p, 2) * s + o * tl.sum(xs, 2)
    return out


@triton.jit
def _int8_step(w_ptrs, x_ptrs, s_ptrs, m_ptrs, gm, DT: tl.constexpr, GS: tl.constexpr,
               HAS_MIN: tl.constexpr):
    """One step's [R, G] sums over int8 codes at the step's pointers (``_row_dot``): a
    group's 32 bytes are two word quads (one a half group), each one 16-byte load. Groups
    past K (a K that BLOCK_K does not divide: gpt-oss's 2880) read zeros."""
    x0, x1, x2, x3 = _x_group(x_ptrs, gm[:, None], DT, True)
    wa = tl.load(w_ptrs, mask=gm[None, :, None], other=0)
    wb = tl.load(w_ptrs + 4, mask=gm[None, :, None], other=0)
    # each byte's top bit flipped: the codes + 128, unsigned
    p, xs = _quad_dot(tl.join(wa, wb) ^ -0x7F7F7F80, x0, x1, x2, x3, 1)
    if GS == 32:
        part = tl.sum(p, 2) * _half(tl.load(s_ptrs, mask=gm[None, :], other=0))
        if HAS_MIN:
            part += _half(tl.load(m_ptrs, mask=gm[None, :], other=0)) * tl.sum(xs, 2)
    else:  # a scale a half group: s_ptrs at the group's two as one int32
        ss = tl.load(s_ptrs, mask=gm[None, :], other=0)
        pa, pb = tl.split(p)
        part = pa * _half(ss.to(tl.int16)) + pb * _half((ss >> 16).to(tl.int16))
    return part


@triton.jit
def _row_dot(XR, W, S, MN, D, wrow, K, INT4: tl.constexpr, SIX: tl.constexpr, GS: tl.constexpr,
             HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             FP4: tl.constexpr = False, Q4K: tl.constexpr = False,
             MASK_K: tl.constexpr = False):
    """Σ_k x[k] · w[wrow, k] for the int64 weight rows ``wrow`` [BLOCK_N] of the stacked
    weight (rows counted over all experts); x's row at ``XR``; BLOCK_K columns a step (the
    module text: the codes read as int32 words, x as int64 words). Row starts are written
    (K // 32)·(words a group): multiples of 4 words Triton sees, whatever K's
    specialisation — 16-byte loads. ``MASK_K``: the INT4/Q4K/SIX steps masked past K (a
    BLOCK_K that does not divide K; the int8 and FP4 steps are masked always)."""
    NIBBLES: tl.constexpr = INT4 or Q4K or SIX or FP4
    DT: tl.constexpr = XR.dtype.element_ty
    WORDS: tl.constexpr = 4 if NIBBLES else 8  # code words a group
    gi = tl.arange(0, BLOCK_K // 32)
    q = tl.arange(0, 4)
    w_ptrs = (W.to(tl.pointer_type(tl.int32)) + (wrow * ((K // 32) * WORDS))[:, None, None]
              + (gi * WORDS)[None, :, None] + q[None, None, :])
    XW: tl.constexpr = 2 if DT == tl.float32 else 4  # x's columns an int64 word
    # x's words at the low half groups' quads (columns 32g + 4q; + 16: the high half's)
    x_ptrs = (XR.to(tl.pointer_type(tl.int64)) + (gi * (32 // XW))[:, None]
              + (q * (4 // XW))[None, :])
    s_row = wrow[:, None] * (K // 32) + gi[None, :]  # a group's index over a row's groups
    if SIX:  # the int8 sub-scales two a group: one int16
        s_ptrs = S.to(tl.pointer_type(tl.int16)) + s_row
    elif Q4K:  # each group's super-block word quad (16 bytes), a row's 8 groups of one load one
        s_ptrs = (S.to(tl.pointer_type(tl.int32)) + (wrow * ((K // 256) * 4))[:, None, None]
                  + ((gi // 8) * 4)[None, :, None] + q[None, None, :])
    elif GS == 16 and not NIBBLES:  # int8 scales two a group: one int32
        s_ptrs = S.to(tl.pointer_type(tl.int32)) + s_row
    else:
        s_ptrs = S + s_row
    # each group's super-block word (SIX: d), a row's 8 groups of one load one
    d_ptrs = D + wrow[:, None] * (K // 256) + gi[None, :] // 8
    h_ptrs = (MN.to(tl.pointer_type(tl.int32)) + (wrow * ((K // 32) * 2))[:, None, None]
              + (gi * 2)[None, :, None] + (q % 2)[None, None, :])  # SIX: the high bit pairs
    acc = tl.zeros([BLOCK_N, BLOCK_K // 32], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        gm = k0 + gi * 32 < K
        g0 = k0 // 32  # the step's first group
        if NIBBLES:
            if Q4K:  # the step's super-block(s): a quad each
                sp = s_ptrs + (k0 // 256) * 4
            else:
                sp = s_ptrs + g0
            acc += _nibble_step(w_ptrs + g0 * 4, x_ptrs + k0 // XW, sp, d_ptrs + k0 // 256,
                                h_ptrs + g0 * 2, gm, q, (g0 + gi) % 8, DT, SIX, FP4, Q4K,
                                FP4 or MASK_K)
        else:
            acc += _int8_step(w_ptrs + g0 * 8, x_ptrs + k0 // XW, s_ptrs + g0,
                              MN + s_row + g0, gm, DT, GS, HAS_MIN)
    out = tl.sum(acc, 1)
    if FP4:
        out = out * 16384.0  # the decode's 2^-14 back (a power of two: exact)
    return out


@triton.jit
def pick_gemv(X, IDS, RW, W, S, MN, D, B, Y, N, K, stride_x, stride_y, TOPK: tl.constexpr,
              GATHER: tl.constexpr, FUSE: tl.constexpr, ROUTED: tl.constexpr,
              INT4: tl.constexpr, SIX: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr,
              HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, ALPHA: tl.constexpr,
              LIMIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              FP4: tl.constexpr = False, PAIR: tl.constexpr = False,
              Q4K: tl.constexpr = False, MASK_K: tl.constexpr = False):
    """y[p, n] for pick p = program 0, outputs n in BLOCK_N; N: the expert's weight rows
    (2I where FUSE, whose output has I columns); grid (P, cdiv(N_out, BLOCK_N)). ``PAIR``
    (with FUSE): the gate and up rows of an output are one row set of 2·BLOCK_N, interleaved,
    run through one K loop — both rows' loads in flight together, half the serial load rounds
    of a gate loop then an up loop (a decode GEMV waits on load latency, not arithmetic).
    ``MASK_K``: the 4-bit layouts' steps masked past K (``_row_dot``): a step wider than K
    takes a row whole in one round of loads."""
    p = tl.program_id(0)
    pid = tl.program_id(1)
    e = tl.load(IDS + p).to(tl.int64)
    if GATHER:
        row = p // TOPK
    else:
        row = p
    if FUSE:
        n_out = N // 2
    else:
        n_out = N
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < n_out
    wrow = e * N + tl.where(nmask, n, 0).to(tl.int64)
    XR = X + row.to(tl.int64) * stride_x
    if FUSE and PAIR:
        j = tl.arange(0, 2 * BLOCK_N)  # row j: output j // 2's gate (j even) or up (odd)
        n2 = pid * BLOCK_N + j // 2
        wrow2 = e * N + tl.where(n2 < n_out, n2, 0).to(tl.int64) + (j % 2) * n_out
        gu = _row_dot(XR, W, S, MN, D, wrow2, K, INT4, SIX, GS, HAS_MIN, 2 * BLOCK_N, BLOCK_K,
                      FP4, Q4K, MASK_K)
        if HAS_BIAS:
            gu += tl.load(B + wrow2).to(tl.float32)
        y, u = tl.split(tl.reshape(gu, [BLOCK_N, 2]))
        y = _glu(y, u, SWIGLU, ALPHA, LIMIT)
    else:
        y = _row_dot(XR, W, S, MN, D, wrow, K, INT4, SIX, GS, HAS_MIN, BLOCK_N, BLOCK_K, FP4,
                     Q4K, MASK_K)
        if HAS_BIAS:
            y += tl.load(B + wrow).to(tl.float32)
        if FUSE:
            u = _row_dot(XR, W, S, MN, D, wrow + n_out, K, INT4, SIX, GS, HAS_MIN, BLOCK_N,
                         BLOCK_K, FP4, Q4K, MASK_K)
            if HAS_BIAS:
                u += tl.load(B + wrow + n_out).to(tl.float32)
            y = _glu(y, u, SWIGLU, ALPHA, LIMIT)
    if ROUTED:
        y = y * tl.load(RW + p).to(tl.float32)
    tl.store(Y + p.to(tl.int64) * stride_y + n, y.to(Y.dtype.element_ty), mask=nmask)


# P (the picks) and MAX_BLOCKS change with every step's token count: not specialised on (Triton
# would compile another variant for a count divisible by 16, or equal to 1, on first use — a
# compile while serving)
@triton.jit(do_not_specialize=["P", "MAX_BLOCKS"])
def align(IDS, SORTED, BEXP, P, E, MAX_BLOCKS, BLOCK_M: tl.constexpr, PB: tl.constexpr,
          EB: tl.constexpr, MB: tl.constexpr, CH: tl.constexpr):
    """One program: the P picks' expert ids (``IDS``) → ``SORTED`` [MB·BLOCK_M] (each expert's
    picks in pick order, its run padded to whole blocks of BLOCK_M with P) and ``BEXP``
    [MAX_BLOCKS] (each block's expert, E past the last). PB, EB, MB: powers of two ≥ P, E,
    MAX_BLOCKS; CH divides PB."""
    i = tl.arange(0, PB)
    imask = i < P
    ids_i = tl.load(IDS + i, mask=imask, other=E).to(tl.int32)
    ex = tl.arange(0, EB)
    hit = ids_i[:, None] == ex[None, :]
    counts = tl.sum(hit.to(tl.int32), 0)
    blocks = tl.where(ex < E, (counts + BLOCK_M - 1) // BLOCK_M, 0)
    ends = tl.cumsum(blocks, 0)  # each expert's blocks end here (inclusive cumsum)
    starts = ends - blocks
    first = tl.sum(tl.where(hit, starts[None, :], 0), 1)  # the first block of each pick's expert
    rank = tl.zeros([PB], tl.int32)  # picks of the same expert before it
    for j0 in tl.static_range(0, PB, CH):
        j = j0 + tl.arange(0, CH)
        ids_j = tl.load(IDS + j, mask=j < P, other=E).to(tl.int32)
        same = (ids_j[None, :] == ids_i[:, None]) & (j[None, :] < i[:, None])
        rank += tl.sum(same.to(tl.int32), 1)
    for s0 in tl.static_range(0, MB * BLOCK_M, 1024):
        s = s0 + tl.arange(0, 1024)
        tl.store(SORTED + s, tl.zeros([1024], tl.int32) + P, mask=s < MB * BLOCK_M)
    tl.debug_barrier()  # the padding stored before the picks land over it
    tl.store(SORTED + first * BLOCK_M + rank, i, mask=imask)
    b = tl.arange(0, MB)
    owner = tl.sum(((ends[None, :] <= b[:, None]) & (ex[None, :] < E)).to(tl.int32), 1)
    tl.store(BEXP + b, owner, mask=b < MAX_BLOCKS)


@triton.jit
def _int4_tile(W, S, erow, byte, K):
    """The float32 weights of 4-bit stacked rows ``erow`` at step bytes ``byte`` (broadcast int64
    indices; byte b of a row: group b // 16): (low-nibble columns, high-nibble columns)."""
    b = tl.load(W + erow * ((K // 32) * 16) + byte).to(tl.int32)  # 16-byte aligned rows
    s, o = _scale_offset(tl.load(S + erow * (K // 32) + byte // 16))
    return (b & 15).to(tl.float32) * s + o, (b >> 4).to(tl.float32) * s + o


@triton.jit
def _fp4_tile(W, S, erow, byte, K):
    """As ``_int4_tile`` for the MXFP4 layout (``S``: E8M0 exponent bytes): (low, high)."""
    b = tl.load(W + erow * ((K // 32) * 16) + byte).to(tl.int32)  # 16-byte aligned rows
    s = _e8m0(tl.load(S + erow * (K // 32) + byte // 16).to(tl.int32))
    return (_e2m1(b) * 16384.0) * s, (_e2m1(b >> 4) * 16384.0) * s


@triton.jit
def _q4k_tile(W, S, erow, byte, K, k0, BLOCK_K: tl.constexpr):
    """As ``_int4_tile`` for the ``Q4K`` layout (``S`` the super-blocks' word quads) at step
    ``k0``: (low, high) columns, code·(d·sc) − dmin·m in float32. A step of at most 256
    columns lies in one super-block: its four words loaded once a row (an element's group
    picks its factors from them: ``_q4k_factors``); a wider step loads them per element."""
    b = tl.load(W + erow * ((K // 32) * 16) + byte).to(tl.int32)  # 16-byte aligned rows
    if BLOCK_K <= 256:
        quad = S.to(tl.pointer_type(tl.int32)) + (erow * (K // 256) + k0 // 256) * 4
    else:
        quad = S.to(tl.pointer_type(tl.int32)) + (erow * (K // 256) + byte // 128) * 4
    s, o = _q4k_factors(tl.load(quad), tl.load(quad + 1), tl.load(quad + 2),
                        tl.load(quad + 3), (byte // 16) % 8)
    return _u6(b & 15) * s - o, _u6(b >> 4) * s - o


@triton.jit
def _six_tile(W, S, H, D, erow, byte, K):
    """As ``_int4_tile`` for the 6-bit layout (``H``: the high-bit bytes, ``S`` int8 sub-scales,
    ``D`` float16 super-scales): (low, high) columns."""
    b = tl.load(W + erow * ((K // 32) * 16) + byte).to(tl.int32)  # 16-byte aligned rows
    h = tl.load(H + erow * ((K // 32) * 8) + (byte // 16) * 8 + byte % 8).to(tl.int32)
    sh = ((byte % 16) // 8) * 2
    ulo = _u6((b & 15) | (((h >> sh) & 3) << 4)) - 32.0
    uhi = _u6((b >> 4) | (((h >> (sh + 4)) & 3) << 4)) - 32.0
    srow = S + erow * (K // 16) + (byte // 16) * 2
    d = _half(tl.load(D + erow * (K // 256) + byte // 128))
    return ulo * (d * tl.load(srow).to(tl.float32)), uhi * (d * tl.load(srow + 1).to(tl.float32))


@triton.jit
def _int8_tile(W, S, MN, erow, k, K, GS: tl.constexpr, HAS_MIN: tl.constexpr):
    """The float32 weights of int8-code stacked rows ``erow`` × columns ``k`` (broadcast)."""
    w = _codes8(tl.load(W + erow * K + k)) * _half(tl.load(S + erow * (K // GS) + k // GS))
    if HAS_MIN:
        w += _half(tl.load(MN + erow * (K // 32) + k // 32))
    return w


@triton.jit(do_not_specialize=["P"])  # the picks: as align's
def grouped_gemm(X, SORTED, BEXP, RW, W, S, MN, D, B, Y, P, E, N, K, stride_x, stride_y,
                 TOPK: tl.constexpr, GATHER: tl.constexpr, FUSE: tl.constexpr,
                 ROUTED: tl.constexpr, INT4: tl.constexpr, SIX: tl.constexpr,
                 GS: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SWIGLU: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 FP4: tl.constexpr = False, SWAP: tl.constexpr = False,
                 Q4K: tl.constexpr = False):
    """y[picks of block b, outputs of program 1] (see the module text); grid
    (MAX_BLOCKS, cdiv(N_out, BLOCK_N)). ``SWAP``: ``expert_rows``' swap-AB products."""
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BEXP + blk).to(tl.int64)
    if e >= E:
        return
    pick = tl.load(SORTED + blk * BLOCK_M + tl.arange(0, BLOCK_M))
    mmask = pick < P
    pick = tl.where(mmask, pick, 0).to(tl.int64)
    if GATHER:
        row = pick // TOPK
    else:
        row = pick
    expert_rows(X, RW, W, S, MN, D, B, Y, row, pick, mmask, e, pid_n, N, K, stride_x, stride_y,
                FUSE, ROUTED, INT4, SIX, GS, HAS_MIN, HAS_BIAS, SWIGLU, ALPHA, LIMIT, BLOCK_M,
                BLOCK_N, BLOCK_K, FP4, SWAP, Q4K)


@triton.jit
def expert_rows(X, RW, W, S, MN, D, B, Y, row, pick, mmask, e, pid_n, N, K, stride_x,
                stride_y, FUSE: tl.constexpr, ROUTED: tl.constexpr, INT4: tl.constexpr,
                SIX: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr,
                HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, ALPHA: tl.constexpr,
                LIMIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, FP4: tl.constexpr = False, SWAP: tl.constexpr = False,
                Q4K: tl.constexpr = False):
    """Expert ``e``'s outputs ``pid_n`` for BLOCK_M rows (x's ``row``, y's ``pick``, where
    ``mmask``): its weight tile dequantised in registers once for all of them, on the tensor
    cores (``grouped_gemm``'s and ``cuda_moe_expert_kernels.expert_gemv``'s body). ``SWAP``
    (swap-AB, for 1-2 tokens an expert): the weight tile [BLOCK_N, step] is the product's left
    operand and the rows' x [step, BLOCK_M] the right — the outputs fill the MMA's M side
    instead of the 16 mostly padded rows — transposed back before the epilogue."""
    if FUSE:
        n_out = N // 2
    else:
        n_out = N
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < n_out
    erow = e * N + tl.where(nmask, n, 0).to(tl.int64)
    if SWAP:  # acc [BLOCK_N, BLOCK_M]; weight tiles [BLOCK_N, step], x [step, BLOCK_M]
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        wrow = erow[:, None]
        xmask = mmask[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        wrow = erow[None, :]
        xmask = mmask[:, None]
    if INT4 or SIX or FP4 or Q4K:
        # a step: BLOCK_K // 32 groups = BLOCK_K // 2 bytes a row, contiguous; byte j of the step
        # holds columns 32·(j // 16) + j % 16 (low nibble) and 16 more (high nibble)
        j = tl.arange(0, BLOCK_K // 2)
        xcol = (j // 16) * 32 + j % 16
        if SWAP:
            x_ptrs = X + row[None, :] * stride_x + xcol[:, None]
            wcol = j[None, :]
        else:
            x_ptrs = X + row[:, None] * stride_x + xcol[None, :]
            wcol = j[:, None]
        for k0 in range(0, K, BLOCK_K):
            xlo = tl.load(x_ptrs + k0, mask=xmask, other=0.0)
            xhi = tl.load(x_ptrs + k0 + 16, mask=xmask, other=0.0)
            if SIX:
                lo, hi = _six_tile(W, S, MN, D, wrow, wcol + k0 // 2, K)
            elif Q4K:
                lo, hi = _q4k_tile(W, S, wrow, wcol + k0 // 2, K, k0, BLOCK_K)
            elif FP4:
                lo, hi = _fp4_tile(W, S, wrow, wcol + k0 // 2, K)
            else:
                lo, hi = _int4_tile(W, S, wrow, wcol + k0 // 2, K)
            acc = _mma(xlo, lo, acc, SWAP)
            acc = _mma(xhi, hi, acc, SWAP)
            if FUSE:
                if SIX:
                    lo, hi = _six_tile(W, S, MN, D, wrow + n_out, wcol + k0 // 2, K)
                elif Q4K:
                    lo, hi = _q4k_tile(W, S, wrow + n_out, wcol + k0 // 2, K, k0, BLOCK_K)
                elif FP4:
                    lo, hi = _fp4_tile(W, S, wrow + n_out, wcol + k0 // 2, K)
                else:
                    lo, hi = _int4_tile(W, S, wrow + n_out, wcol + k0 // 2, K)
                acc_u = _mma(xlo, lo, acc_u, SWAP)
                acc_u = _mma(xhi, hi, acc_u, SWAP)
    else:
        k = tl.arange(0, BLOCK_K)
        if SWAP:
            x_ptrs = X + row[None, :] * stride_x + k[:, None]
        else:
            x_ptrs = X + row[:, None] * stride_x + k[None, :]
        for k0 in range(0, K, BLOCK_K):
            xt = tl.load(x_ptrs + k0, mask=xmask, other=0.0)
            if SWAP:
                kk = (k0 + k)[None, :].to(tl.int64)
            else:
                kk = (k0 + k)[:, None].to(tl.int64)
            w = _int8_tile(W, S, MN, wrow, kk, K, GS, HAS_MIN)
            acc = _mma(xt, w, acc, SWAP)
            if FUSE:
                wu = _int8_tile(W, S, MN, wrow + n_out, kk, K, GS, HAS_MIN)
                acc_u = _mma(xt, wu, acc_u, SWAP)
    if SWAP:  # back to [BLOCK_M, BLOCK_N] for the epilogue
        acc = tl.trans(acc)
        acc_u = tl.trans(acc_u)
    if HAS_BIAS:
        acc += tl.load(B + erow).to(tl.float32)[None, :]
    if FUSE:
        if HAS_BIAS:
            acc_u += tl.load(B + erow + n_out).to(tl.float32)[None, :]
        acc = _glu(acc, acc_u, SWIGLU, ALPHA, LIMIT)
    if ROUTED:
        acc = acc * tl.load(RW + pick, mask=mmask, other=0.0).to(tl.float32)[:, None]
    out = Y + pick[:, None] * stride_y + n[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
