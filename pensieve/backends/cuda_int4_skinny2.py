"""The ``skinny2`` route for 2-16 rows of x (decode with several streams): the int4 tensor-core
product that makes operands of the codes with ~1 instruction a weight and applies each group's
scale to the K = 32 dot's sums (``cuda_int4_skinny2_kernels.py`` says how and why), its tiles,
the candidates ``cuda_int4_tune`` races per weight shape and row bucket at start, and the
launcher. Same weight layout as every int4 kernel (``cuda_int4.py``), the same split-K
workspace as ``skinny``.

A candidate is routed only for a bucket where the tuner found it right (against the dequantised
weight) and faster than ``skinny`` and the others on the GPU at hand. Tiles: sm_90 builds here
(Triton 3.9) take ``mma.sync`` at 1-2 warps — at 4 warps Triton picks wgmma, whose per-group
waits and operand shuffles cost ~16-20 instructions a code byte — and ~5-7 instructions a code
byte in the loop (``skinny``: ~11), 96-250 registers, no spills; BLOCK_N 32, or 64 at 2 warps,
take a layout change through shared memory (~17). Rows up to 8 pad to an 8-row dot
(m16n8k16's native N), more to 16. Importing this module needs neither a GPU nor Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch

GROUP = 32
MAX_ROWS = 16
MAX_SPLIT = 8  # skinny's workspace: 8 × 16 rows of partials


@dataclass(frozen=True)
class Skinny2:
    """One ``skinny2`` launch: BLOCK_N weight rows a program, BLOCK_G groups of 32 columns a
    loop step, the groups cut into SPLIT_K runs, the codes' loads NUM_STAGES deep (Triton's
    pipelined copies; x and the scales loaded in the step); ``prefetch``: one group a step
    (BLOCK_G 1) with its codes, x and scales loaded steps ahead into registers by hand."""

    block_n: int
    block_g: int
    split_k: int
    num_warps: int = 2
    num_stages: int = 3
    prefetch: int = 0

    def fits(self, k: int) -> bool:
        return ((k // GROUP) % (self.block_g * self.split_k) == 0 and self.split_k <= MAX_SPLIT
                and (not self.prefetch or self.block_g == 1))


# raced per weight shape and row bucket at start (each distinct tile one Triton compile per
# dtype, scale form and row padding: 4 tiles, ~16 compiles a scale form); the sm_90 loop's
# instructions a code byte at 8 rows (Q4_0 / the pair; ``skinny``: ~11) in the comments, from
# Triton 3.9's ptxas here — codes and x in pipelined copies, 96-250 registers, no spills at
# either padding. None timed on a GPU yet.
CANDIDATES = (
    Skinny2(128, 4, 4, 2, 3),  # 5.6 / 6.5
    Skinny2(128, 2, 8, 2, 4),  # 6.0 / 6.7; twice the programs
    Skinny2(64, 2, 8, 1, 4),  # 5.7 / 6.9; one warp, four times the programs
    Skinny2(64, 4, 4, 1, 3),  # 5.5 / 6.6
)
# bench/gpu_int4_gemv.py --sweep (never timed at start): wider tiles (BLOCK_N 256: 5.4, spills
# at 16 rows in the pair form), a group a step, and the by-hand prefetching form (12.2: it pays
# a layout change of the unpacked codes through shared memory)
SWEEP = tuple(Skinny2(bn, bg, sk, nw, st) for bn, nw in ((64, 1), (128, 2), (256, 2))
              for bg in (1, 2, 4) for sk in (2, 4, 8) for st in (3, 4)) + tuple(
    Skinny2(bn, 1, sk, 2, 1, prefetch=1) for bn in (64, 128, 256) for sk in (4, 8))

ENV = "PENSIEVE_INT4_SKINNY2"  # "0": left out of the race


def candidates() -> tuple[Skinny2, ...]:
    return () if os.environ.get(ENV, "1") == "0" else CANDIDATES


def block_m(rows: int) -> int:
    """The dot's padded rows: 8 (m16n8k16's own N) up to 8 rows, else 16."""
    return 8 if rows <= 8 else 16


def fits(cfg: Skinny2, m: int, k: int) -> bool:
    return 1 <= m <= MAX_ROWS and cfg.fits(k) and cfg.block_n >= 16


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_int4_skinny2_kernels

    return cuda_int4_skinny2_kernels


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def skinny2(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor,
            cfg: Skinny2) -> torch.Tensor:
    """x [M ≤ 16, K] (contiguous rows) @ w.T by ``skinny2`` with ``cfg``."""
    from pensieve.backends.cuda_int4 import skinny_workspace, symmetric

    m, k = x.shape
    n = packed.shape[0]
    if not fits(cfg, m, k):
        raise ValueError(f"skinny2: {m} rows, K={k} with {cfg}")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    ws, cnt = skinny_workspace(x.device, n)
    grid = (-(-n // cfg.block_n), cfg.split_k)
    _kernels().skinny2[grid](
        x, packed, so, y, ws, cnt, m, n, k // GROUP, x.stride(0), y.stride(0), packed.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_G=cfg.block_g, SPLIT_K=cfg.split_k,
        NUM_STAGES=cfg.num_stages, SYM=symmetric(so), ASM=not _interpreted(),
        BLOCK_M=block_m(m), PREFETCH=bool(cfg.prefetch), num_warps=cfg.num_warps,
        num_stages=1)  # the loop's: NUM_STAGES
    return y
