"""``gemv_wide``: a 1-2-row int4 GEMV whose x loads are 8 bytes wide (``cuda_int4.py`` layout).

``gemv_words`` gives each thread a group's four 32-bit words of BLOCK_N rows and loads x's 32
values of that group one bfloat16 at a time (32 two-byte loads a group: columns 32g + 4q + j
of word q are 4 elements apart in its load tensor). Here x is read as int32 pairs (two
bfloat16 a word, the launcher's ``x.view(int32)``): a word q of the weight meets columns
32g + 4q .. 32g + 4q + 3 (low nibbles) and 32g + 16 + 4q .. (high nibbles), which are two
contiguous int32 pairs each — one 8-byte load for the low half and one for the high half of a
word, the bfloat16 turned float32 by a shift or a mask (bfloat16 is float32's top half).
The weight's words are loaded one word a thread along q (``WORD_THREADS``: Triton then lays
x's pairs out along the same threads, no shared-memory shuffle between the two) or a group a
thread (``WORD_THREADS=False``, 16-byte weight loads as ``gemv_words``).

Arithmetic as ``gemv_words``: ``Σ (128 + c)·x`` in float32 (exact products), then
``s·Σ(128+c)x + (o − 128·s)·Σx`` a group. bfloat16 x only (the launcher refuses others).
Grid (cdiv(N, BLOCK_N), rows). EVEN: the groups are a multiple of BLOCK_G.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_int4_gemv_kernels import (_row_sums, _selectors, _x_pairs,
                                                      _x_pairs_n)
from pensieve.backends.cuda_int4_kernels import _code128, _scale_offset


@triton.jit
def _bf16_pair(p):
    """int32 holding two bfloat16 (element 2i low, 2i + 1 high) → both as float32."""
    return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _hide(x, ASM: tl.constexpr):
    """x unchanged, its contiguity hidden from Triton (loads through it stay one word a
    thread instead of four: the layout x's pairs take)."""
    if ASM:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                      is_pure=True, pack=1)
    return x


@triton.jit
def _words_times_x(w, so, x0, x1, x2, x3, y0, y1, y2, y3, xsum, SYM: tl.constexpr):
    """One step's [BLOCK_N, BLOCK_G] group sums of words w [BLOCK_N, BLOCK_G, 4] against x's
    columns (x_j: 32g + 4q + j, y_j: + 16; [BLOCK_G, 4] each; xsum: their sum a group)."""
    part = _code128(w, 16) * x0[None, :, :]  # byte j's low nibble meets column 4q + j
    part += _code128(w, 12) * y0[None, :, :]  # its high nibble column 16 + 4q + j
    part += _code128(w, 8) * x1[None, :, :]
    part += _code128(w, 4) * y1[None, :, :]
    part += _code128(w, 0) * x2[None, :, :]
    part += _code128(w, -4) * y2[None, :, :]
    part += _code128(w, -8) * x3[None, :, :]
    part += _code128(w, -12) * y3[None, :, :]
    s, o = _scale_offset(so, SYM)
    return tl.sum(part, 2) * s + (o - 128.0 * s) * xsum[None, :]


@triton.jit
def gemv_wide(X2, W, SO, Y, N, GROUPS, stride_x2, stride_y, stride_w,
              BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr,
              SYM: tl.constexpr = False, WORD_THREADS: tl.constexpr = True,
              ASM: tl.constexpr = True, SWIGLU: tl.constexpr = False,
              PREFETCH: tl.constexpr = False, V2: tl.constexpr = False,
              XN: tl.constexpr = False):
    """y[row, n] = Σ_k x[row, k] · w[n, k]; X2: x's rows as int32 pairs (``stride_x2`` pairs a
    row), W: ``packed`` as int32 words (``stride_w`` = K / 8 a row).

    SWIGLU: W is a fused gate/up weight of 2·N rows and y [rows, N] = SiLU(gate) · up, where
    gate = row n's product and up = row N + n's, each rounded to Y's dtype first and the SiLU
    too — the roundings of the gate/up GEMV's output followed by ``silu_mul``: one launch
    fewer a decode MLP, no recomputation (a program reads both rows of its outputs).

    PREFETCH: the next step's weight words and scales are loaded before this step's products
    (register double-buffering: two steps' weight bytes in flight a thread, masked at the end).

    V2 (module text): x as 16-byte quads in the words' layout, codes by ``prmt``; the weight a
    group a thread whatever WORD_THREADS. XN (V2, tiles with fewer groups a step than
    threads): x loaded as [BLOCK_N, BLOCK_G, 4], a copy a weight row from one address — the
    words' shape, so their layout (ptxas keeps one load a thread)."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n = tl.where(nmask, n, 0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    q = tl.arange(0, 4)
    c = tl.arange(0, 2)
    word = gi[None, :, None] * 4 + q[None, None, :]
    if WORD_THREADS and not V2:
        word = _hide(word, ASM)
    w_ptrs = W + n[:, None, None] * stride_w + word
    if V2:  # the scales a (row, group) a thread, as the words: not vectorised along groups
        so_ptrs = SO + n[:, None] * GROUPS + _hide(gi, ASM)[None, :]
    else:
        so_ptrs = SO + n[:, None] * GROUPS + gi[None, :]
    sels = _selectors(gi, GROUPS)
    XR = X2 + row * stride_x2
    up_w = N * stride_w  # SWIGLU: the up rows, N rows on (int32: under 2**31 words)
    up_so = N * GROUPS
    # pairs 16g + 2q + c (low nibbles' columns 32g + 4q + 2c, + 1) and 8 pairs on (high)
    x_ptrs = X2 + row * stride_x2 + gi[:, None, None] * 16 + q[None, :, None] * 2 + c[None, None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    if PREFETCH:
        gm = gi < GROUPS
        w_nx = tl.load(w_ptrs, mask=gm[None, :, None], other=0)
        so_nx = tl.load(so_ptrs, mask=gm[None, :], other=0)
        if SWIGLU:
            wu_nx = tl.load(w_ptrs + up_w, mask=gm[None, :, None], other=0)
            sou_nx = tl.load(so_ptrs + up_so, mask=gm[None, :], other=0)
    for g0 in range(0, GROUPS, BLOCK_G):
        if PREFETCH:
            w = w_nx
            so = so_nx
            gm = (g0 + BLOCK_G + gi) < GROUPS
            w_nx = tl.load(w_ptrs + BLOCK_G * 4, mask=gm[None, :, None], other=0)
            so_nx = tl.load(so_ptrs + BLOCK_G, mask=gm[None, :], other=0)
            if SWIGLU:
                w_up = wu_nx
                so_up = sou_nx
                wu_nx = tl.load(w_ptrs + BLOCK_G * 4 + up_w, mask=gm[None, :, None], other=0)
                sou_nx = tl.load(so_ptrs + BLOCK_G + up_so, mask=gm[None, :], other=0)
            gmask = (g0 + gi) < GROUPS
            lo = tl.load(x_ptrs, mask=gmask[:, None, None], other=0)
            hi = tl.load(x_ptrs + 8, mask=gmask[:, None, None], other=0)
        elif EVEN:
            w = tl.load(w_ptrs)
            so = tl.load(so_ptrs)
            if SWIGLU:
                w_up = tl.load(w_ptrs + up_w)
                so_up = tl.load(so_ptrs + up_so)
            lo = tl.load(x_ptrs)
            hi = tl.load(x_ptrs + 8)
        else:
            gmask = (g0 + gi) < GROUPS
            w = tl.load(w_ptrs, mask=gmask[None, :, None], other=0)
            so = tl.load(so_ptrs, mask=gmask[None, :], other=0)
            if SWIGLU:
                w_up = tl.load(w_ptrs + up_w, mask=gmask[None, :, None], other=0)
                so_up = tl.load(so_ptrs + up_so, mask=gmask[None, :], other=0)
            lo = tl.load(x_ptrs, mask=gmask[:, None, None], other=0)
            hi = tl.load(x_ptrs + 8, mask=gmask[:, None, None], other=0)
        if V2:
            if XN:
                xw = _x_pairs_n(XR, g0 + gi, (g0 + gi) < GROUPS, BLOCK_N, BLOCK_G,
                                EVEN and not PREFETCH)
            else:
                xw = _x_pairs(XR, g0 + gi, (g0 + gi) < GROUPS, BLOCK_G, EVEN and not PREFETCH)
            acc += _row_sums(w, so, xw, sels, SYM, tl.bfloat16, BLOCK_N, BLOCK_G, ASM, XN)
            if SWIGLU:
                acc_up += _row_sums(w_up, so_up, xw, sels, SYM, tl.bfloat16, BLOCK_N, BLOCK_G,
                                    ASM, XN)
        else:
            l01, l23 = tl.split(lo)  # [BLOCK_G, 4]: columns 4q, 4q+1 | 4q+2, 4q+3 (+ 32g)
            h01, h23 = tl.split(hi)
            x0, x1 = _bf16_pair(l01)
            x2, x3 = _bf16_pair(l23)
            y0, y1 = _bf16_pair(h01)
            y2, y3 = _bf16_pair(h23)
            xsum = tl.sum((x0 + x1) + (x2 + x3) + ((y0 + y1) + (y2 + y3)), 1)
            acc += _words_times_x(w, so, x0, x1, x2, x3, y0, y1, y2, y3, xsum, SYM)
            if SWIGLU:
                acc_up += _words_times_x(w_up, so_up, x0, x1, x2, x3, y0, y1, y2, y3, xsum,
                                         SYM)
        w_ptrs += BLOCK_G * 4
        so_ptrs += BLOCK_G
        x_ptrs += BLOCK_G * 16
    y = tl.sum(acc, 1)
    if SWIGLU:  # as the GEMV's output then silu_mul round: gate, up, SiLU(gate), the product
        gate = y.to(Y.dtype.element_ty).to(tl.float32)
        up = tl.sum(acc_up, 1).to(Y.dtype.element_ty).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(Y.dtype.element_ty).to(tl.float32)
        y = act * up
    tl.store(Y + row * stride_y + n, y.to(Y.dtype.element_ty), mask=nmask)
