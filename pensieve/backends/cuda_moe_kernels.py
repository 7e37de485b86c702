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
* ``Q4K`` (Q4_K with the file's own factors): ``W`` as ``INT4``'s, ``S`` int16 [E, N, K/32]
  the 6-bit sub-scale ``sc`` (low byte) and sub-min ``m`` (high byte) of each 32, ``D`` int32
  [E, N, K/256] the float16 ``d`` (low half) and ``dmin`` (high half) of each 256:
  ``w = code·(d·sc) − dmin·m``, both products formed in float32 in the kernel (exact: 17 and
  17 significant bits) — the file's value exactly, in 148 bytes a 256;
* ``SIX`` (Q6_K, 6-bit codes ``u = code + 32``): ``W`` the low 4 bits in the int4 layout
  [E, N, K/2], ``MN`` the high 2 bits four a byte [E, N, K/4] (byte ``i`` of group ``g``:
  columns 32g+i, +8, +16, +24 in bits 0-1, 2-3, 4-5, 6-7), ``S`` the int8 sub-scale per 16 and
  ``D`` the float16 bits of the super-scale per 256: ``w = (u − 32)·d·sc`` — the file's 210
  bytes a 256 (``cuda_q6k``'s layout). Other formats take ``D`` as an unused argument.
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
* ``align`` — one program sorts up to a few hundred picks by expert on the device: per expert
  its rows padded to BLOCK_M, ``SORTED`` the pick of each padded slot (P where empty) and
  ``BEXP`` each block's expert (E past the last block); the worst case fixes the grid.
* ``grouped_gemm`` — one program per (block of BLOCK_M sorted picks of one expert, BLOCK_N
  outputs): x's gathered rows times the expert's weight tile dequantised in registers to x's
  dtype, on the tensor cores; blocks past the last exit at once.

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
def _row_dot(XR, W, S, MN, D, wrow, K, INT4: tl.constexpr, SIX: tl.constexpr, GS: tl.constexpr,
             HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             FP4: tl.constexpr = False, Q4K: tl.constexpr = False):
    """Σ_k x[k] · w[wrow, k] for the int64 weight rows ``wrow`` [BLOCK_N] of the stacked
    weight (rows counted over all experts); x's row at ``XR``; BLOCK_K columns a step."""
    if FP4:
        gi = tl.arange(0, BLOCK_K // 32)
        i = tl.arange(0, 16)
        w_ptrs = W + wrow[:, None, None] * (K // 2) + gi[None, :, None] * 16 + i[None, None, :]
        e_ptrs = S + wrow[:, None] * (K // 32) + gi[None, :]
        x_ptrs = XR + gi[:, None] * 32 + i[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K // 32], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # whole groups (K % 32 == 0); a K that BLOCK_K does not divide (gpt-oss's 2880 =
            # 90 groups) reads its last step's groups past K as zeros
            gm = k0 + gi * 32 < K
            b = tl.load(w_ptrs + k0 // 2, mask=gm[None, :, None], other=0).to(tl.int32)
            xlo = tl.load(x_ptrs + k0, mask=gm[:, None], other=0.0).to(tl.float32)
            xhi = tl.load(x_ptrs + k0 + 16, mask=gm[:, None], other=0.0).to(tl.float32)
            part = tl.sum(_e2m1(b) * xlo[None, :, :] + _e2m1(b >> 4) * xhi[None, :, :], 2)
            e = tl.load(e_ptrs + k0 // 32, mask=gm[None, :], other=0).to(tl.int32)
            acc += part * _e8m0(e)
    elif INT4:
        gi = tl.arange(0, BLOCK_K // 32)
        i = tl.arange(0, 16)
        w_ptrs = W + wrow[:, None, None] * (K // 2) + gi[None, :, None] * 16 + i[None, None, :]
        so_ptrs = S + wrow[:, None] * (K // 32) + gi[None, :]
        x_ptrs = XR + gi[:, None] * 32 + i[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K // 32], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            b = tl.load(w_ptrs + k0 // 2).to(tl.int32)
            xlo = tl.load(x_ptrs + k0).to(tl.float32)
            xhi = tl.load(x_ptrs + k0 + 16).to(tl.float32)
            lo = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            part = tl.sum(lo * xlo[None, :, :] + hi * xhi[None, :, :], 2)
            s, o = _scale_offset(tl.load(so_ptrs + k0 // 32))
            acc += part * s + o * tl.sum(xlo + xhi, 1)[None, :]
    elif Q4K:
        gi = tl.arange(0, BLOCK_K // 32)
        i = tl.arange(0, 16)
        w_ptrs = W + wrow[:, None, None] * (K // 2) + gi[None, :, None] * 16 + i[None, None, :]
        s_ptrs = S + wrow[:, None] * (K // 32) + gi[None, :]
        # each group's super-block word, k0 // 256 + gi // 8 (BLOCK_K a power of two: a step
        # shorter than 256 columns lies inside one); 8 groups of a row load one address
        d_ptrs = D + wrow[:, None] * (K // 256) + gi[None, :] // 8
        x_ptrs = XR + gi[:, None] * 32 + i[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K // 32], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            b = tl.load(w_ptrs + k0 // 2).to(tl.int32)
            xlo = tl.load(x_ptrs + k0).to(tl.float32)
            xhi = tl.load(x_ptrs + k0 + 16).to(tl.float32)
            part = tl.sum(_u6(b & 15) * xlo[None, :, :] + _u6(b >> 4) * xhi[None, :, :], 2)
            sub = tl.load(s_ptrs + k0 // 32).to(tl.int32)
            d, dmin = _scale_offset(tl.load(d_ptrs + k0 // 256))
            acc += (part * (d * _u6(sub & 255))
                    - tl.sum(xlo + xhi, 1)[None, :] * (dmin * _u6(sub >> 8)))
    elif SIX:
        gi = tl.arange(0, BLOCK_K // 32)
        i = tl.arange(0, 16)
        w_ptrs = W + wrow[:, None, None] * (K // 2) + gi[None, :, None] * 16 + i[None, None, :]
        h_ptrs = (MN + wrow[:, None, None] * (K // 4) + gi[None, :, None] * 8
                  + (i % 8)[None, None, :])
        s_ptrs = S + wrow[:, None] * (K // 16) + gi[None, :] * 2
        x_ptrs = XR + gi[:, None] * 32 + i[None, :]
        sh = ((i // 8) * 2)[None, None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K // 32], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            b = tl.load(w_ptrs + k0 // 2).to(tl.int32)
            h = tl.load(h_ptrs + k0 // 4).to(tl.int32)
            ulo = _u6((b & 15) | (((h >> sh) & 3) << 4))
            uhi = _u6((b >> 4) | (((h >> (sh + 4)) & 3) << 4))
            xlo = tl.load(x_ptrs + k0).to(tl.float32)
            xhi = tl.load(x_ptrs + k0 + 16).to(tl.float32)
            plo = tl.sum(ulo * xlo[None, :, :], 2) - 32.0 * tl.sum(xlo, 1)[None, :]
            phi = tl.sum(uhi * xhi[None, :, :], 2) - 32.0 * tl.sum(xhi, 1)[None, :]
            d = _half(tl.load(D + wrow[:, None] * (K // 256) + (k0 // 32 + gi[None, :]) // 8))
            acc += (plo * tl.load(s_ptrs + k0 // 16).to(tl.float32)
                    + phi * tl.load(s_ptrs + k0 // 16 + 1).to(tl.float32)) * d
    else:
        si = tl.arange(0, BLOCK_K // GS)
        i = tl.arange(0, GS)
        c_ptrs = W + wrow[:, None, None] * K + si[None, :, None] * GS + i[None, None, :]
        s_ptrs = S + wrow[:, None] * (K // GS) + si[None, :]
        x_ptrs = XR + si[:, None] * GS + i[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K // GS], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # whole groups (K % 32 == 0): a K that BLOCK_K does not divide (gpt-oss's 2880)
            # reads its last step's groups past K as zeros
            gm = k0 + si * GS < K
            w = _codes8(tl.load(c_ptrs + k0, mask=gm[None, :, None], other=0))
            x = tl.load(x_ptrs + k0, mask=gm[:, None], other=0.0).to(tl.float32)
            part = tl.sum(w * x[None, :, :], 2) * _half(
                tl.load(s_ptrs + k0 // GS, mask=gm[None, :], other=0))
            if HAS_MIN:  # GS == 32
                part += _half(tl.load(MN + wrow[:, None] * (K // 32) + si[None, :] + k0 // 32,
                                      mask=gm[None, :], other=0)) * tl.sum(x, 1)[None, :]
            acc += part
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
              Q4K: tl.constexpr = False):
    """y[p, n] for pick p = program 0, outputs n in BLOCK_N; N: the expert's weight rows
    (2I where FUSE, whose output has I columns); grid (P, cdiv(N_out, BLOCK_N)). ``PAIR``
    (with FUSE): the gate and up rows of an output are one row set of 2·BLOCK_N, interleaved,
    run through one K loop — both rows' loads in flight together, half the serial load rounds
    of a gate loop then an up loop (a decode GEMV waits on load latency, not arithmetic)."""
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
                      FP4, Q4K)
        if HAS_BIAS:
            gu += tl.load(B + wrow2).to(tl.float32)
        y, u = tl.split(tl.reshape(gu, [BLOCK_N, 2]))
        y = _glu(y, u, SWIGLU, ALPHA, LIMIT)
    else:
        y = _row_dot(XR, W, S, MN, D, wrow, K, INT4, SIX, GS, HAS_MIN, BLOCK_N, BLOCK_K, FP4,
                     Q4K)
        if HAS_BIAS:
            y += tl.load(B + wrow).to(tl.float32)
        if FUSE:
            u = _row_dot(XR, W, S, MN, D, wrow + n_out, K, INT4, SIX, GS, HAS_MIN, BLOCK_N,
                         BLOCK_K, FP4, Q4K)
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
    b = tl.load(W + erow * (K // 2) + byte).to(tl.int32)
    s, o = _scale_offset(tl.load(S + erow * (K // 32) + byte // 16))
    return (b & 15).to(tl.float32) * s + o, (b >> 4).to(tl.float32) * s + o


@triton.jit
def _fp4_tile(W, S, erow, byte, K):
    """As ``_int4_tile`` for the MXFP4 layout (``S``: E8M0 exponent bytes): (low, high)."""
    b = tl.load(W + erow * (K // 2) + byte).to(tl.int32)
    s = _e8m0(tl.load(S + erow * (K // 32) + byte // 16).to(tl.int32))
    return (_e2m1(b) * 16384.0) * s, (_e2m1(b >> 4) * 16384.0) * s


@triton.jit
def _q4k_tile(W, S, D, erow, byte, K, k0, BLOCK_K: tl.constexpr):
    """As ``_int4_tile`` for the ``Q4K`` layout (``S`` the sub-scale/sub-min pairs, ``D`` the
    float16 d/dmin words) at step ``k0``: (low, high) columns, code·(d·sc) − dmin·m in float32.
    A step of at most 256 columns lies in one super-block: its word loaded once a row."""
    b = tl.load(W + erow * (K // 2) + byte).to(tl.int32)
    sub = tl.load(S + erow * (K // 32) + byte // 16).to(tl.int32)
    if BLOCK_K <= 256:
        d, dmin = _scale_offset(tl.load(D + erow * (K // 256) + k0 // 256))
    else:
        d, dmin = _scale_offset(tl.load(D + erow * (K // 256) + byte // 128))
    s = d * _u6(sub & 255)
    o = dmin * _u6(sub >> 8)
    return _u6(b & 15) * s - o, _u6(b >> 4) * s - o


@triton.jit
def _six_tile(W, S, H, D, erow, byte, K):
    """As ``_int4_tile`` for the 6-bit layout (``H``: the high-bit bytes, ``S`` int8 sub-scales,
    ``D`` float16 super-scales): (low, high) columns."""
    b = tl.load(W + erow * (K // 2) + byte).to(tl.int32)
    h = tl.load(H + erow * (K // 4) + (byte // 16) * 8 + byte % 8).to(tl.int32)
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
                lo, hi = _q4k_tile(W, S, D, wrow, wcol + k0 // 2, K, k0, BLOCK_K)
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
                    lo, hi = _q4k_tile(W, S, D, wrow + n_out, wcol + k0 // 2, K, k0, BLOCK_K)
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
