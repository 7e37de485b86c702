"""``gemv_rows``: the int4 GEMV for 2-16 activation rows that reads each weight word once for up
to 8 rows (decode with several streams; ``cuda_int4.py`` layout).

``gemv_split`` serves at most 4 rows a program, so 8 rows read the weight twice; ``skinny``
pads x to 16 rows for the tensor cores. Here one program holds BLOCK_M ≤ 8 rows' accumulators
(one [BLOCK_N, BLOCK_G] float32 tile a row) and meets each step's weight words — 16-byte loads,
a thread a group of BLOCK_N weight rows — with every row in registers: the codes leave memory
once for all rows and, for int8 x, are masked once (``w & 0x0F0F0F0F``, ``(w >> 4) & …``)
for all rows' dp4a. The per-row products are ``cuda_int4_gemv_kernels._row``'s (float32 on
``128 + code`` floats, or llama.cpp's int8 x with dp4a: ``Q8=1``, x rounded once per call by
``quantize_q8``, ~0.5% relative on a product).

Grid (row blocks, cdiv(N, BLOCK_N), SPLIT_K): the row blocks of one weight tile are neighbours
in launch order, so past 8 rows the second block finds the tile in L2. SPLIT_K > 1: the
float32 partials go to WS and a per-(tile, row block) counter; the last program of a tile sums
them in a fixed order (deterministic), writes y and resets the counter — one launch, CUDA-graph
capturable (as ``gemv_split`` and ``skinny``).

``skinny_q8``: ``skinny``'s shape (16 rows padded, the weight the left operand) on the int8
tensor cores — the codes are int8 after one AND or shift a byte, the scales applied per group
to the int32 products — instead of dequantising every weight to float16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_splitk_kernels import finish

from pensieve.backends.cuda_int4_gemv_kernels import _opaque, _row
from pensieve.backends.cuda_int4_kernels import _scale_offset


@triton.jit
def _partial(Y, WS, acc, r: tl.constexpr, m0, M, n, nmask, stride_y, ws_row,
             SPLIT_K: tl.constexpr, N):
    """Row m0 + r's step sums: y directly (one split) or its partial in WS."""
    if SPLIT_K == 1:
        tl.store(Y + (m0 + r) * stride_y + n, tl.sum(acc, 1).to(Y.dtype.element_ty),
                 mask=nmask & ((n * 0 + m0 + r) < M))
    else:
        tl.store(WS + (ws_row + r) * N + n, tl.sum(acc, 1), mask=nmask)


@triton.jit
def gemv_rows(X, XD, XS, W, SO, Y, WS, CNT, M, N, GROUPS, stride_x, stride_y, stride_w,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
              SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN: tl.constexpr,
              Q8: tl.constexpr, SYM: tl.constexpr, ASM: tl.constexpr):
    """y[m, n] = Σ_k x[m, k] · w[n, k] for BLOCK_M ∈ {2, 4, 8} rows a program.

    ``stride_w`` = K / 8 words a weight row; ``Q8``: X int8 codes as int32 words (``stride_x``
    words a row), XD / XS the per-group scales and rounded sums, else X the float rows.
    WS: float32 [SPLIT_K · row blocks · BLOCK_M, N]; CNT: int32 zeros, one a (tile, row
    block). EVEN: the groups split into SPLIT_K equal runs of whole BLOCK_G steps (else the
    last steps are masked). Rows past M read row M − 1 and are not stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
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
    r0 = tl.minimum(m0, M - 1)
    r1 = tl.minimum(m0 + 1, M - 1)
    r2 = tl.minimum(m0 + 2, M - 1)
    r3 = tl.minimum(m0 + 3, M - 1)
    r4 = tl.minimum(m0 + 4, M - 1)
    r5 = tl.minimum(m0 + 5, M - 1)
    r6 = tl.minimum(m0 + 6, M - 1)
    r7 = tl.minimum(m0 + 7, M - 1)
    acc0 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc4 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc5 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc6 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc7 = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
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
        acc1 += _row(X, XD, XS, w, s, o, r1, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                     EVEN, Q8, ASM)
        if BLOCK_M > 2:
            acc2 += _row(X, XD, XS, w, s, o, r2, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                         EVEN, Q8, ASM)
            acc3 += _row(X, XD, XS, w, s, o, r3, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                         EVEN, Q8, ASM)
        if BLOCK_M > 4:
            acc4 += _row(X, XD, XS, w, s, o, r4, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                         EVEN, Q8, ASM)
            acc5 += _row(X, XD, XS, w, s, o, r5, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                         EVEN, Q8, ASM)
            acc6 += _row(X, XD, XS, w, s, o, r6, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                         EVEN, Q8, ASM)
            acc7 += _row(X, XD, XS, w, s, o, r7, g, gmask, stride_x, GROUPS, BLOCK_N, BLOCK_G,
                         EVEN, Q8, ASM)
        w_ptrs += BLOCK_G * 4
        so_ptrs += BLOCK_G
    rows = tl.num_programs(0) * BLOCK_M
    ws_row = pid_k * rows + m0
    _partial(Y, WS, acc0, 0, m0, M, n, nmask, stride_y, ws_row, SPLIT_K, N)
    _partial(Y, WS, acc1, 1, m0, M, n, nmask, stride_y, ws_row, SPLIT_K, N)
    if BLOCK_M > 2:
        _partial(Y, WS, acc2, 2, m0, M, n, nmask, stride_y, ws_row, SPLIT_K, N)
        _partial(Y, WS, acc3, 3, m0, M, n, nmask, stride_y, ws_row, SPLIT_K, N)
    if BLOCK_M > 4:
        _partial(Y, WS, acc4, 4, m0, M, n, nmask, stride_y, ws_row, SPLIT_K, N)
        _partial(Y, WS, acc5, 5, m0, M, n, nmask, stride_y, ws_row, SPLIT_K, N)
        _partial(Y, WS, acc6, 6, m0, M, n, nmask, stride_y, ws_row, SPLIT_K, N)
        _partial(Y, WS, acc7, 7, m0, M, n, nmask, stride_y, ws_row, SPLIT_K, N)
    if SPLIT_K > 1:
        tl.debug_barrier()  # this program's partials stored before the release below
        cnt = CNT + pid_n * tl.num_programs(0) + pid_m
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
def _q8_batched(XQ, XD, XS, W, SO, acc, n_safe, m_safe, mmask, g_start, g_per, GROUPS, stride_q,
                stride_w, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                SYM: tl.constexpr):
    """``skinny_q8``'s loop with a step's groups in one load and one batched dot."""
    g = g_start + tl.arange(0, BLOCK_G)
    i = tl.arange(0, 16)
    kk = tl.arange(0, 32)
    w_ptrs = W + n_safe[None, :, None] * stride_w + g[:, None, None] * 16 + i[None, None, :]
    x_ptrs = XQ + m_safe[None, None, :] * stride_q + g[:, None, None] * 32 + kk[None, :, None]
    so_ptrs = SO + n_safe[None, :] * GROUPS + g[:, None]
    d_off = m_safe[None, :] * GROUPS + g[:, None]
    for _ in range(0, g_per, BLOCK_G):
        b = tl.load(w_ptrs)  # [BLOCK_G, BLOCK_N, 16]
        lo = (b & 15).to(tl.int8)
        hi = (b >> 4).to(tl.int8)
        codes = tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), [BLOCK_G, BLOCK_N, 32])
        xq = tl.load(x_ptrs, mask=mmask[None, None, :], other=0)  # [BLOCK_G, 32, BLOCK_M]
        d = tl.dot(codes, xq, out_dtype=tl.int32)
        s, o = _scale_offset(tl.load(so_ptrs), SYM)  # [BLOCK_G, BLOCK_N]
        dx = tl.load(XD + d_off, mask=mmask[None, :], other=0.0)  # [BLOCK_G, BLOCK_M]
        xs = tl.load(XS + d_off, mask=mmask[None, :], other=0.0)
        acc += tl.sum(d.to(tl.float32) * (s[:, :, None] * dx[:, None, :])
                      + o[:, :, None] * xs[:, None, :], 0)
        w_ptrs += BLOCK_G * 16
        x_ptrs += BLOCK_G * 32
        so_ptrs += BLOCK_G
        d_off += BLOCK_G
    return acc


@triton.jit
def skinny_q8(XQ, XD, XS, W, SO, Y, WS, CNT, M, N, GROUPS, stride_q, stride_y, stride_w,
              BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr,
              SYM: tl.constexpr, BLOCK_M: tl.constexpr = 16, BATCHED: tl.constexpr = False):
    """y = x @ w.T for up to 16 rows on the int8 tensor cores: x rounded to int8 per 32 once
    (``quantize_q8``: XQ codes, XD scales, XS rounded sums), the weight's codes as int8 with
    one AND or shift a byte (no float dequantisation), one ``tl.dot`` of K = 32 a group (the
    weight as the left operand, [BLOCK_N, 32] × [32, BLOCK_M] → int32), then
    ``s·dx·Σ c·q + o·Σ x`` per group in float32 — the scale leaves the per-weight work.

    Grid (cdiv(N, BLOCK_N), SPLIT_K): program (n, s) reads groups [s·G/SPLIT_K, (s+1)·G/SPLIT_K),
    BLOCK_G a step (the number of groups a multiple of BLOCK_G · SPLIT_K). SPLIT_K > 1: partials
    to WS [SPLIT_K · BLOCK_M, N] and a counter a tile, as ``cuda_int4_kernels.skinny``.
    BATCHED: a step's BLOCK_G groups loaded as one [BLOCK_G, BLOCK_N, 16] tile and multiplied
    in one batched ``tl.dot`` ([BLOCK_G, BLOCK_N, 32] × [BLOCK_G, 32, BLOCK_M]), else one
    load and one dot a group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0)
    i = tl.arange(0, 16)
    kk = tl.arange(0, 32)
    g_per = GROUPS // SPLIT_K
    g_start = pid_k * g_per
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    if BATCHED:
        acc = _q8_batched(XQ, XD, XS, W, SO, acc, n_safe, m_safe, mmask, g_start, g_per,
                          GROUPS, stride_q, stride_w, BLOCK_N, BLOCK_G, BLOCK_M, SYM)
    else:
        w_rows = W + n_safe[:, None] * stride_w + i[None, :]
        x_cols = XQ + m_safe[None, :] * stride_q + kk[:, None]
        for g0 in range(g_start, g_start + g_per, BLOCK_G):
            for j in tl.static_range(BLOCK_G):
                g = g0 + j
                b = tl.load(w_rows + g * 16)
                lo = (b & 15).to(tl.int8)
                hi = (b >> 4).to(tl.int8)
                codes = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), [BLOCK_N, 32])
                xq = tl.load(x_cols + g * 32, mask=mmask[None, :], other=0)
                d = tl.dot(codes, xq, out_dtype=tl.int32)
                s, o = _scale_offset(tl.load(SO + n_safe * GROUPS + g), SYM)
                dx = tl.load(XD + m_safe * GROUPS + g, mask=mmask, other=0.0)
                xs = tl.load(XS + m_safe * GROUPS + g, mask=mmask, other=0.0)
                acc += d.to(tl.float32) * (s[:, None] * dx[None, :]) + o[:, None] * xs[None, :]
    out = Y + m_safe[None, :] * stride_y + n_safe[:, None]
    omask = nmask[:, None] & mmask[None, :]
    finish(acc, Y, out, omask, WS + m[None, :] * N + n_safe[:, None], BLOCK_M * N, CNT, pid_n,
           pid_k, SPLIT_K)
