"""Triton kernels for weight-only int4 linear layers (see ``cuda_int4.py`` for the layout).

A weight [N, K] is held as ``packed`` uint8 [N, K/2] and ``scale_offset`` int32 [N, K/32]:
byte ``i`` (0..15) of group ``g`` holds the code of column ``32g + i`` in its low nibble and
of ``32g + 16 + i`` in its high nibble (GGUF's own Q4_0 order), and each group's int32 is
its float16 scale (low half) and float16 offset (high half): ``w = code · scale + offset``.
Where every offset is −8 · scale (Q4_0) the weight holds the scales alone, int16 [N, K/32] (the
float16 bits), 4.5 bits a weight as in the file; kernels take ``SYM=True`` then.

Both products factor each group's affine map out of the inner sum,
``Σ x·(c·s + o) = s·Σ x·c + o·Σ x``, and turn codes into floats without a conversion
instruction (those run at a quarter of the FMA rate and bounded the first version): OR-ing a
code into the mantissa of a "magic" float gives ``magic + code`` exactly (2²³ + c in float32,
128 + c in bfloat16, 1024 + c in float16), and the magic is subtracted once per group.

* ``gemv`` — few activation rows (decode at batch 1): float32 FMAs, one program per (row,
  BLOCK_N outputs).
* ``matmul`` — several rows (decode batches, short prefill chunks): per group, two ``tl.dot``
  of 16 columns on the tensor cores (low nibbles against x[32g : 32g+16], high against the
  rest) on ``magic + code`` in x's dtype, then the group's scale and offset in float32.
* ``dequantize`` — the float weight, for large prefill GEMMs on cuBLAS and for checks.

Every kernel needs the number of groups (``GROUPS = K // 32``) to be a multiple of its
``BLOCK_G`` (the launcher picks one); rows past N and M are clamped on load and masked on store.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_splitk_kernels import finish


@triton.jit
def _scale_offset(so, SYM: tl.constexpr):
    """int32 pairs → (scale, offset) as float32; SYM: ``so`` holds int16 scales alone and the
    offset is −8 · scale (Q4_0)."""
    if SYM:
        s = so.to(tl.float16, bitcast=True).to(tl.float32)
        o = -8.0 * s
    else:
        s = (so & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        o = (so >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, o


@triton.jit
def gemv(X, W, SO, Y, N, K, GROUPS, stride_x, stride_y,
         BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SYM: tl.constexpr = False,
         PREFETCH: tl.constexpr = False):
    """y[row, n] = Σ_k x[row, k] · w[n, k]; grid (rows, cdiv(N, BLOCK_N)): the rows of one
    weight tile run side by side, so a tile comes from memory once and from L2 after.
    PREFETCH: the next step's codes and scales loaded before this step's products (two steps'
    bytes in flight; the last step reloads itself instead of reading past the row)."""
    row = tl.program_id(0)
    pid = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    i = tl.arange(0, 16)
    w_rows = W + n[:, None, None] * (K // 2) + gi[None, :, None] * 16 + i[None, None, :]
    so_rows = SO + n[:, None] * GROUPS + gi[None, :]
    x_cols = X + row * stride_x + gi[:, None] * 32 + i[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    if PREFETCH:
        b_nx = tl.load(w_rows)
        so_nx = tl.load(so_rows)
    for g0 in range(0, GROUPS, BLOCK_G):
        if PREFETCH:
            b = b_nx.to(tl.int32)
            so = so_nx
            nxt = tl.minimum(g0 + BLOCK_G, GROUPS - BLOCK_G)
            b_nx = tl.load(w_rows + nxt * 16)
            so_nx = tl.load(so_rows + nxt)
        else:
            b = tl.load(w_rows + g0 * 16).to(tl.int32)
            so = tl.load(so_rows + g0)
        xlo = tl.load(x_cols + g0 * 32).to(tl.float32)
        xhi = tl.load(x_cols + g0 * 32 + 16).to(tl.float32)
        lo = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + code
        hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True)
        part = tl.sum((lo - 8388608.0) * xlo[None, :, :] + (hi - 8388608.0) * xhi[None, :, :], 2)
        s, o = _scale_offset(so, SYM)
        acc += part * s + o * tl.sum(xlo + xhi, 1)[None, :]
    y = tl.sum(acc, 1)
    tl.store(Y + row * stride_y + n, y.to(Y.dtype.element_ty), mask=nmask)


@triton.jit
def matmul(X, W, SO, Y, M, N, K, GROUPS, stride_x, stride_y,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
           SYM: tl.constexpr = False):
    """y = x @ w.T for x [M, K]; grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)); BLOCK_G groups
    a loop step, unrolled, so that their loads are in flight together."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    m = tl.where(mmask, m, 0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    i = tl.arange(0, 16)
    w_rows = W + n_safe[:, None] * (K // 2) + i[None, :]
    so_rows = SO + n_safe * GROUPS
    x_rows = X + m[:, None] * stride_x + i[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g0 in range(0, GROUPS, BLOCK_G):
        for j in tl.static_range(BLOCK_G):
            g = g0 + j
            b = tl.load(w_rows + g * 16).to(tl.int16)
            xlo = tl.load(x_rows + g * 32)
            xhi = tl.load(x_rows + g * 32 + 16)
            if X.dtype.element_ty == tl.bfloat16:
                magic = 128.0
                lo = ((b & 15) | 0x4300).to(tl.bfloat16, bitcast=True)
                hi = ((b >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
            elif X.dtype.element_ty == tl.float16:
                magic = 1024.0
                lo = ((b & 15) | 0x6400).to(tl.float16, bitcast=True)
                hi = ((b >> 4) | 0x6400).to(tl.float16, bitcast=True)
            else:  # float32 x (tests): plain conversions
                magic = 0.0
                lo = (b & 15).to(X.dtype.element_ty)
                hi = (b >> 4).to(X.dtype.element_ty)
            d = tl.dot(xlo, tl.trans(lo))
            d = tl.dot(xhi, tl.trans(hi), d)
            xs = tl.sum(xlo.to(tl.float32), 1) + tl.sum(xhi.to(tl.float32), 1)
            s, o = _scale_offset(tl.load(so_rows + g), SYM)
            acc += (d - magic * xs[:, None]) * s[None, :] + xs[:, None] * o[None, :]
    out = Y + m[:, None] * stride_y + n[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def dequantize(W, SO, OUT, N, K, GROUPS, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
               SYM: tl.constexpr = False):
    """out[n, k] = w[n, k] in OUT's dtype; grid (cdiv(N, BLOCK_N), K // (32 · BLOCK_G))."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    i = tl.arange(0, 16)
    b = tl.load(W + n_safe[:, None, None] * (K // 2) + g[None, :, None] * 16 + i[None, None, :])
    s, o = _scale_offset(tl.load(SO + n_safe[:, None] * GROUPS + g[None, :]), SYM)
    lo = (b & 15).to(tl.float32) * s[:, :, None] + o[:, :, None]
    hi = (b >> 4).to(tl.float32) * s[:, :, None] + o[:, :, None]
    out = OUT + n_safe[:, None, None] * K + g[None, :, None] * 32 + i[None, None, :]
    mask = nmask[:, None, None]
    tl.store(out, lo.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out + 16, hi.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def skinny(X, W, SO, Y, WS, CNT, M, N, K, GROUPS, stride_x, stride_y, stride_w,
           BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr,
           SYM: tl.constexpr = False, BLOCK_M: tl.constexpr = 16):
    """y = x @ w.T for up to BLOCK_M (16 or 32) rows of x on the tensor cores, the weight as the
    left operand ("swap AB": the product is computed as w @ x.T, [BLOCK_N, BLOCK_M]), x's rows
    padded to BLOCK_M (masked loads): the weight is read and dequantised once for all rows.

    Grid (cdiv(N, BLOCK_N), SPLIT_K): program (n, s) reads groups [s·G/SPLIT_K, (s+1)·G/SPLIT_K)
    of its rows, BLOCK_G groups (32·BLOCK_G columns) a step. The codes dequantise to float16
    exactly (``1024 + code`` by OR-ing into the mantissa, minus 1024), then ``code·scale +
    offset`` in float16 (the stored pair is float16): one rounding a weight, finer than the
    bfloat16 dense copy's. Low nibbles (columns 32g + i) and high nibbles (32g + 16 + i) are
    two products against x's matching columns. x is cast to float16 for the product (its
    values must stay below 65504), the sum is float32.

    SPLIT_K > 1: each program writes its float32 partial to WS[s] and bumps CNT[n]; the last
    of the SPLIT_K sums the partials in a fixed order (deterministic), writes y and resets the
    counter to 0 for the next call, so one launch does it all and CUDA graphs capture it
    (WS and CNT persist; CNT starts zeroed)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0)
    gi = tl.arange(0, BLOCK_G)
    i = tl.arange(0, 16)
    g_per = GROUPS // SPLIT_K
    g_start = pid_k * g_per
    # stride_w = K // 2 as an argument: Triton then knows it is a multiple of 16 (K // 2
    # computed here would only be known as a multiple of 8) and copies 16-byte pieces
    w_ptrs = (W + n_safe[:, None, None] * stride_w + (g_start + gi[None, :, None]) * 16
              + i[None, None, :])
    so_ptrs = SO + n_safe[:, None] * GROUPS + g_start + gi[None, :]
    k_lo = tl.reshape(gi[:, None] * 32 + i[None, :], [BLOCK_G * 16])
    x_ptrs = X + m_safe[None, :] * stride_x + g_start * 32 + k_lo[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for _ in range(0, g_per, BLOCK_G):
        b = tl.load(w_ptrs).to(tl.int16)
        so = tl.load(so_ptrs)
        if SYM:
            s = so.to(tl.float16, bitcast=True)[:, :, None]
            o = (s * -8.0).to(tl.float16)
        else:
            s = (so & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)[:, :, None]
            o = (so >> 16).to(tl.int16).to(tl.float16, bitcast=True)[:, :, None]
        lo = (((b & 15) | 0x6400).to(tl.float16, bitcast=True) - 1024.0) * s + o
        hi = (((b >> 4) | 0x6400).to(tl.float16, bitcast=True) - 1024.0) * s + o
        xlo = tl.load(x_ptrs, mask=mmask[None, :], other=0.0).to(tl.float16)
        xhi = tl.load(x_ptrs + 16, mask=mmask[None, :], other=0.0).to(tl.float16)
        acc = tl.dot(tl.reshape(lo, [BLOCK_N, BLOCK_G * 16]), xlo, acc)
        acc = tl.dot(tl.reshape(hi, [BLOCK_N, BLOCK_G * 16]), xhi, acc)
        w_ptrs += BLOCK_G * 16
        so_ptrs += BLOCK_G
        x_ptrs += BLOCK_G * 32
    out = Y + m_safe[None, :] * stride_y + n_safe[:, None]
    omask = nmask[:, None] & mmask[None, :]
    # split s's partial: rows [s·BLOCK_M, (s+1)·BLOCK_M) of WS (SPLIT_K·BLOCK_M ≤ 128)
    finish(acc, Y, out, omask, WS + m[None, :] * N + n_safe[:, None], BLOCK_M * N, CNT, pid_n,
           pid_k, SPLIT_K)


@triton.jit
def _code128(w, SHIFT: tl.constexpr):
    """The nibble at bits [16 - SHIFT, 20 - SHIFT) of int32 ``w`` as float32 ``128 + code``: moved
    to bits 16..19 and OR-ed under bfloat16's exponent of 128 (float32 0x43000000), whose
    mantissa unit there is 1 — one shift and one AND-OR a weight, no conversion and no
    subtraction (the 128s come off once per group)."""
    if SHIFT > 0:
        w = w << SHIFT
    elif SHIFT < 0:
        w = w >> -SHIFT
    return ((w & 0xF0000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def gemv_words(X, W, SO, Y, N, GROUPS, stride_x, stride_y, stride_w,
               BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr,
               SYM: tl.constexpr = False):
    """y[row, n] = Σ_k x[row, k] · w[n, k] for few rows (decode); grid (cdiv(N, BLOCK_N), rows).

    W is ``packed`` read as int32 words (``stride_w`` = K / 8 words a row): a group's 16 bytes
    are 4 words, loaded as one 128-bit piece per thread; byte j of word q holds columns
    32g + 4q + j (low nibble) and 32g + 16 + 4q + j (high). Each thread holds a group of
    BLOCK_N rows (threads run along the groups), so the x values it loads serve BLOCK_N rows.
    Per group, ``Σ (128 + c)·x`` in float32 (products of a 8-bit-mantissa code and a bfloat16
    x are exact; sums of 32 terms lose ~1e-6 relative), then ``s·Σ(128+c)x + (o − 128·s)·Σx``.
    EVEN: the number of groups is a multiple of BLOCK_G (else the last step is masked)."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    q = tl.arange(0, 4)
    w_ptrs = W + n[:, None, None] * stride_w + gi[None, :, None] * 4 + q[None, None, :]
    so_ptrs = SO + n[:, None] * GROUPS + gi[None, :]
    x_ptrs = X + row * stride_x + gi[:, None] * 32 + q[None, :] * 4
    acc = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    for g0 in range(0, GROUPS, BLOCK_G):
        if EVEN:
            w = tl.load(w_ptrs)
            so = tl.load(so_ptrs)
        else:
            gmask = (g0 + gi) < GROUPS
            w = tl.load(w_ptrs, mask=gmask[None, :, None], other=0)
            so = tl.load(so_ptrs, mask=gmask[None, :], other=0)
            xmask = gmask[:, None]
        part = tl.zeros([BLOCK_N, BLOCK_G, 4], tl.float32)
        xs = tl.zeros([BLOCK_G, 4], tl.float32)
        for j in tl.static_range(4):
            if EVEN:
                xl = tl.load(x_ptrs + j).to(tl.float32)
                xh = tl.load(x_ptrs + 16 + j).to(tl.float32)
            else:
                xl = tl.load(x_ptrs + j, mask=xmask, other=0.0).to(tl.float32)
                xh = tl.load(x_ptrs + 16 + j, mask=xmask, other=0.0).to(tl.float32)
            part += _code128(w, 16 - 8 * j) * xl[None, :, :]
            part += _code128(w, 12 - 8 * j) * xh[None, :, :]
            xs += xl + xh
        s, o = _scale_offset(so, SYM)
        xsum = tl.sum(xs, 1)
        acc += tl.sum(part, 2) * s + (o - 128.0 * s) * xsum[None, :]
        w_ptrs += BLOCK_G * 4
        so_ptrs += BLOCK_G
        x_ptrs += BLOCK_G * 32
    y = tl.sum(acc, 1)
    tl.store(Y + row * stride_y + n, y.to(Y.dtype.element_ty), mask=nmask)


@triton.jit
def gemm(X, W, SO, Y, M, N, GROUPS, stride_x, stride_y, stride_w,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
         GROUP_M: tl.constexpr, SYM: tl.constexpr = False):
    """y = x @ w.T for many rows (prefill), the weight dequantised in the kernel: per step the
    [BLOCK_N, 32·BLOCK_G] weight tile becomes ``code·scale + offset`` in float32, rounded once
    to x's dtype (as a dense copy in that dtype would be), and meets x's tile on the tensor
    cores with the weight as the left operand (``w @ x.T`` → [BLOCK_N, BLOCK_M], float32
    sums; low and high nibbles are two products against x's matching columns). The weight
    tile is dequantised once for BLOCK_M rows. Grid: cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),
    ordered GROUP_M row tiles at a time so that neighbouring programs share weight tiles in
    L2. The number of groups must be a multiple of BLOCK_G (the launcher picks it)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    i = tl.arange(0, 16)
    w_ptrs = W + n_safe[:, None, None] * stride_w + gi[None, :, None] * 16 + i[None, None, :]
    so_ptrs = SO + n_safe[:, None] * GROUPS + gi[None, :]
    k_lo = tl.reshape(gi[:, None] * 32 + i[None, :], [BLOCK_G * 16])
    x_ptrs = X + m_safe[None, :] * stride_x + k_lo[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for _ in range(0, GROUPS, BLOCK_G):
        b = tl.load(w_ptrs).to(tl.int32)
        s, o = _scale_offset(tl.load(so_ptrs), SYM)
        s = s[:, :, None]
        o = o[:, :, None]
        lo = ((b & 15).to(tl.float32) * s + o).to(X.dtype.element_ty)
        hi = ((b >> 4).to(tl.float32) * s + o).to(X.dtype.element_ty)
        xlo = tl.load(x_ptrs, mask=mmask[None, :], other=0.0)
        xhi = tl.load(x_ptrs + 16, mask=mmask[None, :], other=0.0)
        if X.dtype.element_ty == tl.float32:  # tests, a float32 model: IEEE products
            acc = tl.dot(tl.reshape(lo, [BLOCK_N, BLOCK_G * 16]), xlo, acc, input_precision="ieee")
            acc = tl.dot(tl.reshape(hi, [BLOCK_N, BLOCK_G * 16]), xhi, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.reshape(lo, [BLOCK_N, BLOCK_G * 16]), xlo, acc)
            acc = tl.dot(tl.reshape(hi, [BLOCK_N, BLOCK_G * 16]), xhi, acc)
        w_ptrs += BLOCK_G * 16
        so_ptrs += BLOCK_G
        x_ptrs += BLOCK_G * 32
    out = Y + m_safe[None, :] * stride_y + n_safe[:, None]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])
