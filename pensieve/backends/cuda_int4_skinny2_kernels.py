"""``skinny2``: the int4 product for 4-16 rows on the tensor cores, one K = 32 group a pair of
``tl.dot`` (``cuda_int4.py`` layout; the launcher and its tiles in ``cuda_int4_skinny2.py``).

``cuda_int4_kernels.skinny`` dequantises a [BLOCK_N, 16·BLOCK_G] tile to ``code·scale + offset``
in float16 (bytes widened to 16 bits one by one, a subtraction and an FMA a weight, x converted
to float16) and accumulates every group in one chain: ~11 instructions a code byte in its sm_90
loop. Here the per-weight work is only what makes a tensor-core operand of a code:

* with ``ASM``, four bytes at a time in PTX: two byte permutes spread them into 16-bit lanes,
  one AND+OR (a LOP3) a pair of low nibbles, a shift + LOP3 a pair of high ones — ``M + code``
  (M = 128 in bfloat16, 1024 in float16, OR-ed into the mantissa) — and for Q4_0 one packed
  subtraction a pair (``code − 8``, exact); no scale;
* x stays in its own dtype (bfloat16 x → bfloat16 products: no conversion, no 65504 limit);
  float16 x → float16; float32 x (tests) is rounded to float16; rows past M read row 0 (no
  masks; their sums are never stored);
* a group's two K = 16 dots (low nibbles against x[32g : 32g+16], high against the rest) give
  its exact sum in float32, then ``acc += s·Σ(c − 8)·x`` (Q4_0) or, for the (scale, offset)
  pair, ``acc += s·(Σ(M + c)·x − M·Σx) + o·Σx`` with the group's ``M·Σx`` from the same x
  tiles against a tile of M on the tensor cores (no cross-thread reduction; the M tile is made
  from the codes' own bytes so that Triton gives it their operand layout — a constant tile of
  ones took another, and x then lost its pipelined copy).

Loop: BLOCK_G groups a step, the codes and x through Triton's pipelined copies NUM_STAGES deep;
the scales feed no dot operand, so Triton leaves them a plain load, and they are loaded by hand
one step ahead (two steps, two loop-carried tiles, and Triton 3.9 pipelines nothing). Or
``PREFETCH``: one group a step, its codes and x loaded two steps ahead and its scales three,
all by hand into registers (then Triton changes the unpacked codes' layout for the dot through
shared memory: twice the instructions).

Rows are padded to BLOCK_M (8 — m16n8k16's own N — or 16). Grid (cdiv(N, BLOCK_N), SPLIT_K):
program (n, s) reads groups [s·G/SPLIT_K, (s+1)·G/SPLIT_K) of its rows (the number of groups a
multiple of BLOCK_G · SPLIT_K). SPLIT_K > 1: float32 partials to WS and a counter a tile; the
last program sums them in a fixed order, writes y and resets the counter (``skinny``'s
one-launch reduction, CUDA-graph capturable). ``ASM=False`` (the interpreter) does the same
arithmetic in Triton ops.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pensieve.backends.cuda_splitk_kernels import finish

# 4 bytes (one .b32) → their low nibbles and high nibbles as M + code in 16-bit lanes (two
# .b32 each, element order kept: byte j → lane j). prmt 0x4140 / 0x4342: bytes (0, 1) / (2, 3)
# into the low byte of each 16-bit half, zeros above; then & 0x000F000F | magic for the low
# nibbles, >> 4 first for the high ones. MAGIC: 0x43004300 (bfloat16 128) or 0x64006400
# (float16 1024). The Q4_0 form then subtracts M + 8 from each pair (BIAS; exact: code − 8).
_UNPACK = """{
.reg .b32 t0, t1, u0, u1;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
and.b32 $0, t0, 0x000F000F;
or.b32 $0, $0, MAGIC;
and.b32 $1, t1, 0x000F000F;
or.b32 $1, $1, MAGIC;
shr.u32 u0, t0, 4;
shr.u32 u1, t1, 4;
and.b32 $2, u0, 0x000F000F;
or.b32 $2, $2, MAGIC;
and.b32 $3, u1, 0x000F000F;
or.b32 $3, $3, MAGIC;
}"""
_BIAS = """{
.reg .b32 k;
mov.b32 k, BIAS;
SUB $0, $0, k;
SUB $1, $1, k;
SUB $2, $2, k;
SUB $3, $3, k;
}"""
ASM_BF16 = tl.constexpr(_UNPACK.replace("MAGIC", "0x43004300"))
ASM_FP16 = tl.constexpr(_UNPACK.replace("MAGIC", "0x64006400"))
ASM_BF16_SYM = tl.constexpr(ASM_BF16.value + _BIAS.replace("BIAS", "0x43084308")
                            .replace("SUB", "sub.rn.bf16x2"))  # 136
ASM_FP16_SYM = tl.constexpr(ASM_FP16.value + _BIAS.replace("BIAS", "0x64086408")
                            .replace("SUB", "sub.rn.f16x2"))  # 1032


@triton.jit
def _codes(b, DT: tl.constexpr, SYM: tl.constexpr, ASM: tl.constexpr):
    """uint8 [BLOCK_N, 16] → (low, high) nibbles in DT: ``code − 8`` (SYM) or ``M + code`` (M =
    128 for bfloat16, 1024 for float16)."""
    if DT == tl.bfloat16:
        magic_bits: tl.constexpr = 0x4300
        bias: tl.constexpr = 136.0
    else:
        magic_bits: tl.constexpr = 0x6400
        bias: tl.constexpr = 1032.0
    if ASM:
        if DT == tl.bfloat16:
            if SYM:
                lo, hi = tl.inline_asm_elementwise(
                    ASM_BF16_SYM, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16),
                    is_pure=True, pack=4)
            else:
                lo, hi = tl.inline_asm_elementwise(
                    ASM_BF16, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16),
                    is_pure=True, pack=4)
        else:
            if SYM:
                lo, hi = tl.inline_asm_elementwise(
                    ASM_FP16_SYM, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                    is_pure=True, pack=4)
            else:
                lo, hi = tl.inline_asm_elementwise(
                    ASM_FP16, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                    is_pure=True, pack=4)
    else:
        w = b.to(tl.int16)
        lo = ((w & 15) | magic_bits).to(DT, bitcast=True)
        hi = ((w >> 4) | magic_bits).to(DT, bitcast=True)
        if SYM:
            lo = (lo.to(tl.float32) - bias).to(DT)  # exact: small integers
            hi = (hi.to(tl.float32) - bias).to(DT)
    return lo, hi


@triton.jit
def _columns(t, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """The BLOCK_G (1, 2 or 4) columns of a [BLOCK_N, BLOCK_G] tile (unused ones: column 0)."""
    if BLOCK_G == 1:
        c0 = tl.reshape(t, [BLOCK_N])
        return c0, c0, c0, c0
    elif BLOCK_G == 2:
        c0, c1 = tl.split(t)
        return c0, c1, c0, c1
    else:
        even, odd = tl.split(tl.reshape(t, [BLOCK_N, 2, 2]))  # columns (0, 2) and (1, 3)
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        return c0, c1, c2, c3


@triton.jit
def _group(acc, b, xlo, xhi, so, DT: tl.constexpr, MAGIC: tl.constexpr,
           SYM: tl.constexpr, ASM: tl.constexpr):
    """One group's products added to acc: Q4_0 ``s·Σ(c − 8)·x``, the pair ``s·(Σ(M + c)·x −
    M·Σx) + o·Σx``."""
    lo, hi = _codes(b, DT, SYM, ASM)
    d = tl.dot(lo, xlo)
    d = tl.dot(hi, xhi, d)
    if SYM:
        s = so.to(tl.float16, bitcast=True).to(tl.float32)
        acc += d * s[:, None]
    else:
        # M·Σx: the same x tiles against M (a zero code's operand, made from the codes' own
        # bytes so that it shares their operand layout and x's pipelined copy)
        mtile, _ = _codes((b >> 4) >> 4, DT, False, ASM)
        e = tl.dot(mtile, xlo)
        e = tl.dot(mtile, xhi, e)
        s = (so & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        o = (so >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        acc += (d - e) * s[:, None] + e * (o * (1.0 / MAGIC))[:, None]
    return acc


@triton.jit
def skinny2(X, W, SO, Y, WS, CNT, M, N, GROUPS, stride_x, stride_y, stride_w,
            BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr,
            NUM_STAGES: tl.constexpr, SYM: tl.constexpr, ASM: tl.constexpr,
            BLOCK_M: tl.constexpr = 16, PREFETCH: tl.constexpr = False):
    """y = x @ w.T for up to BLOCK_M rows (see the module docstring). ``stride_w`` = K / 2
    bytes a weight row (an argument so that Triton knows it divides by 16)."""
    if X.dtype.element_ty == tl.bfloat16:
        DT: tl.constexpr = tl.bfloat16
        MAGIC: tl.constexpr = 128.0
    else:
        DT: tl.constexpr = tl.float16
        MAGIC: tl.constexpr = 1024.0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n_safe = tl.where(nmask, n, 0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    m_safe = tl.where(mmask, m, 0)
    i = tl.arange(0, 16)
    g_per = GROUPS // SPLIT_K
    g_start = pid_k * g_per
    w_rows = W + n_safe[:, None] * stride_w + i[None, :]  # [BLOCK_N, 16] bytes of group 0
    # [16, BLOCK_M] columns of group 0; rows past M read row 0 (finite; their sums are never
    # stored), so the loads need no mask
    x_cols = X + m_safe[None, :] * stride_x + i[:, None]
    so_rows = SO + n_safe * GROUPS
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    if PREFETCH:
        # one group a step, everything it reads loaded ahead into registers by hand — codes
        # and x two steps ahead, scales three — instead of Triton's pipelined copies (which
        # cover the codes only: x from L2 and the scales from DRAM would stall every step)
        g_last = g_start + g_per - 1
        g_ = tl.minimum(g_start + 1, g_last)
        b1 = tl.load(w_rows + g_start * 16)
        b2 = tl.load(w_rows + g_ * 16)
        x1 = tl.load(x_cols + g_start * 32).to(DT)
        x1h = tl.load(x_cols + g_start * 32 + 16).to(DT)
        x2 = tl.load(x_cols + g_ * 32).to(DT)
        x2h = tl.load(x_cols + g_ * 32 + 16).to(DT)
        s1 = tl.load(so_rows + g_start)
        s2 = tl.load(so_rows + g_)
        s3 = tl.load(so_rows + tl.minimum(g_start + 2, g_last))
        for g in range(g_start, g_start + g_per):
            g2 = tl.minimum(g + 2, g_last)
            b3 = tl.load(w_rows + g2 * 16)
            x3 = tl.load(x_cols + g2 * 32).to(DT)
            x3h = tl.load(x_cols + g2 * 32 + 16).to(DT)
            s4 = tl.load(so_rows + tl.minimum(g + 3, g_last))
            acc = _group(acc, b1, x1, x1h, s1, DT, MAGIC, SYM, ASM)
            b1, b2 = b2, b3
            x1, x1h, x2, x2h = x2, x2h, x3, x3h
            s1, s2, s3 = s2, s3, s4
    else:
        # the codes and x through Triton's pipelined copies; the scales (a plain load: they
        # feed no dot operand) for the next step, loaded by hand (two steps ahead, two
        # loop-carried tiles, and Triton 3.9 pipelines nothing)
        gi = tl.arange(0, BLOCK_G)
        so_tile = so_rows[:, None] + gi[None, :]  # [BLOCK_N, BLOCK_G]
        g_top = g_start + g_per - BLOCK_G
        so_nx = tl.load(so_tile + g_start)
        for g0 in tl.range(g_start, g_start + g_per, BLOCK_G, num_stages=NUM_STAGES):
            so_now = so_nx
            so_nx = tl.load(so_tile + tl.minimum(g0 + BLOCK_G, g_top))
            s0, s1, s2, s3 = _columns(so_now, BLOCK_N, BLOCK_G)
            for j in tl.static_range(BLOCK_G):
                g = g0 + j
                b = tl.load(w_rows + g * 16)
                xlo = tl.load(x_cols + g * 32).to(DT)
                xhi = tl.load(x_cols + g * 32 + 16).to(DT)
                if j == 0:
                    so = s0
                elif j == 1:
                    so = s1
                elif j == 2:
                    so = s2
                else:
                    so = s3
                acc = _group(acc, b, xlo, xhi, so, DT, MAGIC, SYM, ASM)
    out = Y + m_safe[None, :] * stride_y + n_safe[:, None]
    omask = nmask[:, None] & mmask[None, :]
    # split s's partial: rows [s·BLOCK_M, (s+1)·BLOCK_M) of WS (SPLIT_K·BLOCK_M ≤ 128)
    finish(acc, Y, out, omask, WS + m[None, :] * N + n_safe[:, None], BLOCK_M * N, CNT, pid_n,
           pid_k, SPLIT_K)
