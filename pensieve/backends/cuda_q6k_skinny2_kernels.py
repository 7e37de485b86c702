"""``skinny2`` for Q6_K (``cuda_q6k``'s layout; the launcher and its tiles in
``cuda_q6k_skinny2.py``): the int4 ``skinny2``'s design (``cuda_int4_skinny2_kernels``) on
6-bit codes — the codes made tensor-core operands in PTX, one Q6_K sub-block (16 columns, one
int8 sub-scale) exactly one K = 16 ``tl.dot``.

A group g of 32 columns of a weight row is 16 ``lo`` bytes (byte i: column 32g + i in its low
nibble, 32g + 16 + i in its high one) and 8 ``hi`` bytes (byte t: the high bit pairs of columns
32g + t, +8, +16, +24 in bits 0-1, 2-3, 4-5, 6-7). The codes tile [BLOCK_N, 16] is loaded as
the int4 kernel's; beside it the hi bytes twice as [BLOCK_N, 16] tiles at byte ``i % 8``:
``ha`` holding columns i < 8 (zeros past: a masked copy), ``hb`` columns i ≥ 8 (the same 8
bytes, one DRAM read), so that every element i of the three tiles meets its own code's bits
and the unpacking is elementwise on loaded tiles only — Triton then unpacks in the dot
operand's layout straight from the pipelined copy (a constant tile telling the halves apart,
or a select against one, sends the unpacked 16-bit tiles through shared memory instead). With
``ASM``, four lo bytes at a time in PTX (14 instructions for 8 weights, 6 code bytes: 10 to
make the ``M + q`` lanes, 4 packed subtractions):

* ``r = (ha | hb >> 2) & 0x33333333`` (a shift, a LOP3): each byte of r holds its low-half
  code's high pair in bits 0-1 and its high-half code's in bits 4-5;
* low codes ``(b & 0x0F) | (r << 4 & 0xF0)`` (a shift, a LOP3), high codes ``(b >> 4 & 0x0F) |
  (r & 0xF0)`` (a shift, a LOP3): four 6-bit codes a register each;
* each register's bytes spread into 16-bit lanes with the magic exponent byte in one ``prmt``
  a pair (the magic's byte as prmt's second source): ``M + q`` exactly (M = 128 in bfloat16,
  1024 in float16), then one packed subtraction a pair: ``q − 32`` exactly (−32..31).

So a half's K = 16 dot gives Σ(q − 32)·x in float32 and ``acc += d·sc_lo·dot_lo +
d·sc_hi·dot_hi`` (``d·sc`` formed in float32, exactly) — no Σx terms. x stays in its own dtype
(bfloat16 / float16; float32 x, tests, rounded to float16); rows past M read row 0.

Loop: BLOCK_G groups a step, the codes and x through Triton's pipelined copies NUM_STAGES
deep; the sub-scales (two int8 a group read as one int16) and the super-scale (one a step:
BLOCK_G is 1, 2 or 4 and steps start at multiples of it, so a step's groups share their
block) loaded by hand a step ahead. Grid
(cdiv(N, BLOCK_N), SPLIT_K): program (n, s) reads groups [s·G_PER, (s+1)·G_PER); SPLIT_K > 1:
float32 partials through ``cuda_q6k_rows.rows_workspace`` (16 rows a split), the last program
of a column tile sums them in a fixed order (``cuda_splitk_kernels.finish``: one launch,
CUDA-graph capturable). ``ASM=False`` (the interpreter) does the same arithmetic in Triton
ops.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_int4_skinny2_kernels import _columns
from pensieve.backends.cuda_splitk_kernels import finish

# $4: four lo bytes (element order kept: byte j → lane j), $5 / $6: their four hi bytes (hi
# byte i % 8) where i < 8 / i ≥ 8, else 0. Out: $0, $1 the low-half codes of bytes (0, 1),
# (2, 3) as q − 32 in 16-bit lanes; $2, $3 the high-half ones. LOP3 0xA8: (a | b) & c;
# 0xE4: (a & c) | (b & ~c).
_UNPACK = """{
.reg .b32 t, r, u, v, cl, ch, k;
shr.b32 t, $6, 2;
lop3.b32 r, $5, t, 0x33333333, 0xA8;
shl.b32 u, r, 4;
lop3.b32 cl, $4, u, 0x0F0F0F0F, 0xE4;
shr.b32 v, $4, 4;
lop3.b32 ch, v, r, 0x0F0F0F0F, 0xE4;
prmt.b32 $0, cl, MAGIC, 0x4140;
prmt.b32 $1, cl, MAGIC, 0x4342;
prmt.b32 $2, ch, MAGIC, 0x4140;
prmt.b32 $3, ch, MAGIC, 0x4342;
mov.b32 k, BIAS;
SUB $0, $0, k;
SUB $1, $1, k;
SUB $2, $2, k;
SUB $3, $3, k;
}"""
# bfloat16: lanes 0x43xx = 128 + xx, less 160 (0x4320); float16: 0x64xx = 1024 + xx, less 1056
ASM_BF16 = tl.constexpr(_UNPACK.replace("MAGIC", "0x43434343").replace("BIAS", "0x43204320")
                        .replace("SUB", "sub.rn.bf16x2"))
ASM_FP16 = tl.constexpr(_UNPACK.replace("MAGIC", "0x64646464").replace("BIAS", "0x64206420")
                        .replace("SUB", "sub.rn.f16x2"))


@triton.jit
def _codes(b, ha, hb, DT: tl.constexpr, ASM: tl.constexpr):
    """lo bytes b and their hi bytes (uint8 [BLOCK_N, 16]: ``ha`` at columns 0-7, zeros past;
    ``hb`` at 8-15, zeros before) → the low-half and high-half codes as ``q − 32`` in DT."""
    if ASM:
        if DT == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(
                ASM_BF16, "=r,=r,=r,=r,r,r,r", [b, ha, hb], dtype=(tl.bfloat16, tl.bfloat16),
                is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(
                ASM_FP16, "=r,=r,=r,=r,r,r,r", [b, ha, hb], dtype=(tl.float16, tl.float16),
                is_pure=True, pack=4)
    else:
        w = b.to(tl.int32)
        r = (ha.to(tl.int32) | (hb.to(tl.int32) >> 2)) & 0x33
        qlo = (w & 15) | ((r & 3) << 4)
        qhi = (w >> 4) | ((r >> 4) << 4)
        lo = (qlo - 32).to(tl.float32).to(DT)  # exact: small integers
        hi = (qhi - 32).to(tl.float32).to(DT)
    return lo, hi


@triton.jit
def skinny2(X, LO, HI, SC, D, Y, WS, CNT, M, N, GROUPS, G_PER, stride_x, stride_y,
            BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr,
            NUM_STAGES: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr = 16):
    """y = x @ w.T for up to BLOCK_M rows (see the module docstring). LO uint8 [N, 16·GROUPS],
    HI uint8 [N, 8·GROUPS], SC the sub-scales as int16 pairs [N, GROUPS], D float16 bits
    [N, GROUPS / 8]; G_PER groups a split (a multiple of BLOCK_G)."""
    if X.dtype.element_ty == tl.bfloat16:
        DT: tl.constexpr = tl.bfloat16
    else:
        DT: tl.constexpr = tl.float16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0)
    i = tl.arange(0, 16)
    g_start = pid_k * G_PER
    lo_rows = LO + n_safe[:, None] * (GROUPS * 16) + i[None, :]  # [BLOCK_N, 16] of group 0
    # the hi bytes twice: columns i < 8 of ``ha`` and i ≥ 8 of ``hb`` (zeros elsewhere: masked
    # copies); a constant tile telling the halves apart would take another layout and send
    # the unpacked codes through shared memory
    hi_rows = HI + n_safe[:, None] * (GROUPS * 8) + (i % 8)[None, :]
    first = (i < 8)[None, :]
    second = (i >= 8)[None, :]
    # [16, BLOCK_M] columns of group 0; rows past M read row 0 (their sums are never stored)
    x_cols = X + m_safe[None, :] * stride_x + i[:, None]
    gi = tl.arange(0, BLOCK_G)
    sc_tile = SC + n_safe[:, None] * GROUPS + gi[None, :]  # [BLOCK_N, BLOCK_G] int16 pairs
    d_rows = D + n_safe * (GROUPS // 8)
    g_top = g_start + G_PER - BLOCK_G
    sc_nx = tl.load(sc_tile + g_start)
    d_nx = tl.load(d_rows + g_start // 8)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g0 in tl.range(g_start, g_start + G_PER, BLOCK_G, num_stages=NUM_STAGES):
        sc_now = sc_nx
        d_now = d_nx
        g_nx = tl.minimum(g0 + BLOCK_G, g_top)
        sc_nx = tl.load(sc_tile + g_nx)
        d_nx = tl.load(d_rows + g_nx // 8)
        dd = d_now.to(tl.float16, bitcast=True).to(tl.float32)
        s0, s1, s2, s3 = _columns(sc_now, BLOCK_N, BLOCK_G)
        for j in tl.static_range(BLOCK_G):
            g = g0 + j
            b = tl.load(lo_rows + g * 16)
            ha = tl.load(hi_rows + g * 8, mask=first, other=0)
            hb = tl.load(hi_rows + g * 8, mask=second, other=0)
            xlo = tl.load(x_cols + g * 32).to(DT)
            xhi = tl.load(x_cols + g * 32 + 16).to(DT)
            if j == 0:
                sc = s0
            elif j == 1:
                sc = s1
            elif j == 2:
                sc = s2
            else:
                sc = s3
            clo, chi = _codes(b, ha, hb, DT, ASM)
            dlo = tl.dot(clo, xlo)
            dhi = tl.dot(chi, xhi)
            f_lo = dd * (sc & 0xFF).to(tl.int8).to(tl.float32)
            f_hi = dd * (sc >> 8).to(tl.float32)
            acc += dlo * f_lo[:, None]  # two FMAs an output
            acc += dhi * f_hi[:, None]
    out = Y + m_safe[None, :] * stride_y + n_safe[:, None]
    omask = nmask[:, None] & mmask[None, :]
    # split s's partial: rows [16·s, 16·s + BLOCK_M) of the workspace's 16-row slots
    finish(acc, Y, out, omask, WS + m[None, :] * N + n_safe[:, None], 16 * N, CNT, pid_n,
           pid_k, SPLIT_K)
