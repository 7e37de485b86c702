"""The int4 kernels for 2-16 rows (route ``rows``): ``gemv_rows``, a GEMV that reads each
weight word once for up to 8 rows, and ``skinny_q8``, int8 x against the int8 codes on the
tensor cores, 16 rows padded (``Rows.mma``; both in ``cuda_int4_rows_kernels.py``): their
tiles, the candidates ``cuda_int4_tune`` times per weight shape and row bucket at start, and
the launcher.

Same weight layout as every other int4 kernel (``cuda_int4.py``). A candidate is used only for
a bucket where the tuner found it right (against the dequantised weight) and fastest on the
GPU at hand, so it can only win over ``skinny`` / ``gemv_split``, never replace them blindly.
``Rows.q8`` candidates round x to int8 per 32 once per call (``cuda_int4_gemv.quantize_q8``)
and multiply with dp4a (llama.cpp's mmvq for few columns); ``PENSIEVE_INT4_Q8=0`` leaves them
out; ``PENSIEVE_INT4_ROWS=0`` leaves the route out of the race. (It was opt-in for a while:
its CUDA test "failed at N = 45" on the H100, 2026-12-07 — the test itself ran the int8-MMA
tile at K = 448, whose 14 groups are no multiple of its 16, and ``gemv_rows`` refused it with a
ValueError, as the tuner would have skipped it; every other case of that test is exact in the
interpreter. The test now skips tiles that do not fit.) ``gemv_rows`` is
``cuda_int4_gemv_kernels.gemv_split`` widened from 4 rows to 8 — fold the two into one kernel.
Importing this module needs neither a GPU nor Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch

from pensieve.backends.cuda_int4_gemv import counters, quantize_q8, workspace

GROUP = 32
MAX_ROWS = 16  # 8 rows a program, two row blocks past 8
MAX_SLOTS = 64  # SPLIT_K × padded rows of partials: one workspace for every candidate
MAX_TILES = 65535  # CUDA's limit on grid dimension y (the weight tiles)


@dataclass(frozen=True)
class Rows:
    """One ``gemv_rows`` launch: BLOCK_N weight rows × BLOCK_G groups of 32 columns a step, the
    groups cut into SPLIT_K runs, ``block_m`` rows of x a program; int8 x with dp4a where
    ``q8``."""

    block_m: int
    block_n: int
    block_g: int
    split_k: int
    num_warps: int
    num_stages: int = 1
    q8: int = 0  # x as float (0) or rounded to int8 once per call (1)
    mma: int = 0  # ``skinny_q8``: int8 tensor cores, 16 rows padded (q8=1); 2: batched dot


# int8 tensor cores (``skinny_q8``, rows padded to 16): sm_90 builds here take wgmma
# m64n16k32 at BLOCK_N ≥ 64 (mma.sync at 32), 80-105 registers, no spills; the batched-dot
# form (a step's groups in one load) mma.sync, ~130 registers
MMA = (Rows(16, 64, 4, 4, 4, 3, q8=1, mma=1), Rows(16, 64, 2, 4, 4, 3, q8=1, mma=1),
       Rows(16, 128, 2, 2, 4, 3, q8=1, mma=1), Rows(16, 64, 4, 4, 4, 3, q8=1, mma=2))
# per route bucket (rows ≤ bucket), each one Triton compile per dtype and SYM; untimed on a
# GPU so far. Registers (sm_90 builds here with the launch's 16-divisible strides, 8 rows a
# program, int8 x): BLOCK_N 2 ~80, 4 ~145, 8 ~245, no spills; 3 stages (cp.async) ~160 at
# BLOCK_N 4 (split 2: several steps a program to pipeline; a K of 4096 is 4 steps of 32
# groups, so split 8 leaves half the programs empty there — the long-K down projection's).
# Float x loads x two bytes at a time and spills at 8 rows: 2-4 rows only.
CANDIDATES = {
    2: (Rows(2, 8, 32, 4, 1, q8=1), Rows(2, 4, 32, 8, 1, q8=1), Rows(2, 2, 32, 4, 1)),
    4: (Rows(4, 4, 32, 8, 1, q8=1), Rows(4, 8, 32, 8, 1, q8=1), Rows(4, 8, 32, 4, 1, q8=1),
        Rows(4, 2, 32, 4, 1)),
    8: (Rows(8, 2, 32, 8, 1, q8=1), Rows(8, 4, 32, 8, 1, q8=1), Rows(8, 4, 32, 4, 1, q8=1),
        Rows(8, 8, 32, 4, 1, q8=1), Rows(8, 4, 32, 2, 1, 3, q8=1), Rows(8, 2, 64, 4, 2, 2, q8=1))
    + MMA,
    16: (Rows(8, 4, 32, 4, 1, q8=1), Rows(8, 2, 32, 4, 1, q8=1), Rows(8, 8, 32, 2, 1, q8=1),
         Rows(8, 4, 32, 2, 1, 3, q8=1))  # two row blocks: at most 4 splits (the workspace)
    + MMA,
}
# bench/gpu_int4_gemv.py --sweep at 8 rows (never timed at start)
SWEEP = tuple(Rows(8, bn, bg, sk, nw, 1 if nw == 1 else 2, 1)
              for bn in (2, 4, 8) for bg in (32, 64) for sk in (2, 4, 8) for nw in (1, 2)) + tuple(
    Rows(16, bn, bg, sk, nw, st, q8=1, mma=mma) for mma in (1, 2) for bn in (64, 128)
    for bg in (2, 4, 8)
    for sk in (2, 4) for nw in (4, 8) for st in (3, 4))


ENV_ROWS = "PENSIEVE_INT4_ROWS"  # "0": gemv_rows and skinny_q8 left out of the tuner's race


def candidates(bucket: int) -> tuple[Rows, ...]:
    """``CANDIDATES[bucket]``, without the int8-x ones where ``PENSIEVE_INT4_Q8=0`` (none left
    at 8 and 16 rows: ``skinny`` serves those); none where ``PENSIEVE_INT4_ROWS=0``."""
    if os.environ.get(ENV_ROWS, "1") == "0":
        return ()
    cands = CANDIDATES[bucket]
    if os.environ.get("PENSIEVE_INT4_Q8", "1") == "0":
        return tuple(c for c in cands if not c.q8)
    return cands


def fits(cfg: Rows, m: int, n: int, k: int | None = None) -> bool:
    """At most ``MAX_ROWS`` rows, the workspace holds the partials, the grid fits (``mma``:
    16-row tiles, BLOCK_N ≥ 16 for the counters, K's groups a multiple of BLOCK_G · SPLIT_K)."""
    if cfg.mma:
        return (1 <= m <= 16 and cfg.block_m == 16 and cfg.q8 == 1 and cfg.block_n >= 16
                and 1 <= cfg.split_k and cfg.split_k * 16 <= MAX_SLOTS
                and (k is None or (k // GROUP) % (cfg.block_g * cfg.split_k) == 0))
    padded = -(-m // cfg.block_m) * cfg.block_m
    return (1 <= m <= MAX_ROWS and cfg.block_m in (2, 4, 8) and cfg.split_k >= 1
            and (cfg.split_k == 1 or cfg.split_k * padded <= MAX_SLOTS)
            and -(-n // cfg.block_n) <= MAX_TILES
            and -(-n // cfg.block_n) * -(-m // cfg.block_m) <= 2 * n)  # the counters


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_int4_rows_kernels

    return cuda_int4_rows_kernels


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gemv_rows(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor,
              cfg: Rows) -> torch.Tensor:
    """x [M ≤ 16, K] (contiguous rows) @ w.T by ``gemv_rows`` with ``cfg``."""
    m, k = x.shape
    n = packed.shape[0]
    groups = k // GROUP
    if not fits(cfg, m, n, k):
        raise ValueError(f"gemv_rows: {m} rows, N={n}, K={k} with {cfg}")
    if cfg.mma:
        return _skinny_q8(x, packed, so, cfg)
    blocks = -(-m // cfg.block_m)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    cnt = counters(x.device, n)  # 2·N: covers (tiles × ≤ 8 row blocks) at BLOCK_N ≥ 4
    ws = workspace(x.device, n, MAX_SLOTS) if cfg.split_k > 1 else cnt
    if cfg.q8:
        xq, xd, xs = quantize_q8(x)
        args = (xq.view(torch.int32), xd, xs, k // 4)
    else:
        args = (x, x, x, x.stride(0))
    even = groups % (cfg.block_g * cfg.split_k) == 0
    grid = (blocks, -(-n // cfg.block_n), cfg.split_k)
    _kernels().gemv_rows[grid](
        *args[:3], packed.view(torch.int32), so, y, ws, cnt, m, n, groups, args[3], y.stride(0),
        k // 8, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_G=cfg.block_g,
        SPLIT_K=cfg.split_k, NUM_STAGES=cfg.num_stages, EVEN=even, Q8=int(cfg.q8),
        SYM=so.dtype == torch.int16, ASM=not _interpreted(), num_warps=cfg.num_warps,
        num_stages=1)  # the loop's stages: NUM_STAGES
    return y


def _skinny_q8(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor,
               cfg: Rows) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    cnt = counters(x.device, n)  # one a BLOCK_N ≥ 16 tile
    ws = workspace(x.device, n, MAX_SLOTS) if cfg.split_k > 1 else cnt
    xq, xd, xs = quantize_q8(x)
    _kernels().skinny_q8[(-(-n // cfg.block_n), cfg.split_k)](
        xq, xd, xs, packed, so, y, ws, cnt, m, n, k // GROUP, k, y.stride(0), k // 2,
        BLOCK_N=cfg.block_n, BLOCK_G=cfg.block_g, SPLIT_K=cfg.split_k,
        SYM=so.dtype == torch.int16, BATCHED=cfg.mma == 2, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return y
