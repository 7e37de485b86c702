"""The split-K int4 GEMV for 1-8 rows (``cuda_int4_gemv_kernels.gemv_split``): its tiles, the
candidates ``cuda_int4_tune`` times per weight shape at start, and the launcher.

Same weight layout as every other int4 kernel (``cuda_int4.py``). ``Split.q8`` candidates round
x to int8 per 32 — first, in one small extra launch (``q8=1``), or in each program for its own
columns (``q8=2``) — and multiply with dp4a, as llama.cpp does; ``PENSIEVE_INT4_Q8=0`` leaves
them out of the timing (the float ones keep exact products).

The V2 loop (``Split.v2``, ``Wide.v2``): the same tiles with the kernel's V2 loop for float x (``q8=0``) and x rounded in the kernel (``q8=2``) — x
read as 16-byte words in the weight words' layout, no shared-memory exchange in the loop, a
code one ``prmt`` (``q8=1`` is the same either way). Untimed and unrun on a GPU so far (its
``prmt`` is inline PTX, which Triton's interpreter — the CPU tests — never executes), so its
tiles are start-time race candidates beside the old ones: ``cuda_int4_tune`` checks each against
the reference and keeps the fastest that agrees. ``PENSIEVE_INT4_GEMV_V2`` (read at each call,
so one process can time both): ``1`` runs every tile on V2, ``0`` none (and races no V2 tile). Its sm_90
build (Triton 3.9): no ``bar.sync`` in the unpipelined loops (was 4-36 a step), SASS loop
808 vs 1200 instructions at 1 row (the 1-warp float tile) and 1862 vs 3047 with no spills at
4 rows (was ~750 bytes). Importing this module needs neither a GPU nor Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from types import ModuleType

import torch

GROUP = 32
MAX_ROWS = 8  # rows of x a call takes (BLOCK_M ≤ 4 rows a program, row blocks beyond)
MAX_SPLIT = 8


@dataclass(frozen=True)
class Split:
    """One ``gemv_split`` launch: BLOCK_N weight rows × BLOCK_G groups of 32 columns a step, the
    groups cut into SPLIT_K runs (one program each), int8 x with dp4a where ``q8``."""

    block_n: int
    block_g: int
    split_k: int
    num_warps: int
    num_stages: int = 1
    q8: int = 0  # x as float (0); rounded to int8 by quantize_q8 first (1), or in-kernel (2)
    v2: bool = False  # the V2 loop (q8 0 and 2)


# timed per weight shape at start (each one Triton compile per dtype and SYM; untimed on a
# GPU so far): float x on a 1-warp split-4 and a 2-warp pipelined split-2 tile; int8 x
# rounded first on those, a 1-warp split-8 of 4 rows and a 4-warp unsplit pipelined tile;
# int8 x rounded in the kernel on taller tiles (the rounding is repeated a tile)
CANDIDATES = (
    Split(8, 32, 4, 1), Split(16, 32, 2, 2, 2),
    Split(8, 32, 4, 1, q8=1), Split(16, 32, 2, 2, 2, q8=1), Split(4, 32, 8, 1, q8=1),
    Split(32, 64, 1, 4, 3, q8=1), Split(16, 32, 4, 1, q8=2), Split(16, 64, 2, 2, 1, q8=2),
)
# the V2 loop on the tiles it changes (q8 0 and 2): raced beside them
V2_CANDIDATES = tuple(replace(c, v2=True) for c in CANDIDATES if c.q8 != 1)
# bench/gpu_int4_gemv.py --sweep (never timed at start): 216 tiles, pipelined where several
# warps share a program
SWEEP = tuple(Split(bn, bg, sk, nw, 1 if nw == 1 else 3, q8) for q8 in (0, 1, 2)
              for bn in (8, 16, 32) for bg in (32, 64) for sk in (1, 2, 4, 8) for nw in (1, 2, 4))


def candidates() -> tuple[Split, ...]:
    """``CANDIDATES`` and ``V2_CANDIDATES`` (not where ``PENSIEVE_INT4_GEMV_V2`` is set: every
    tile then runs one loop), without the int8-x ones where ``PENSIEVE_INT4_Q8=0``."""
    cands = CANDIDATES + (V2_CANDIDATES if v2_forced() is None else ())
    if os.environ.get("PENSIEVE_INT4_Q8", "1") == "0":
        return tuple(c for c in cands if not c.q8)
    return cands


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_int4_gemv_kernels

    return cuda_int4_gemv_kernels


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def v2_forced() -> bool | None:
    """``PENSIEVE_INT4_GEMV_V2``: True ("1": every tile on V2), False ("0": none), None (unset:
    each tile's own ``v2``)."""
    mode = os.environ.get("PENSIEVE_INT4_GEMV_V2", "").strip()
    return None if mode not in ("0", "1") else mode == "1"


def v2(tile_v2: bool) -> bool:
    """Whether a launch of a tile whose ``v2`` is ``tile_v2`` runs the V2 loop."""
    forced = v2_forced()
    return tile_v2 if forced is None else forced


def _word_rows(x: torch.Tensor) -> torch.Tensor:
    """x whose 16-bit rows V2 may read as int32 words: 4-byte aligned rows (a copy if not)."""
    if x.element_size() == 2 and (x.data_ptr() % 4 or x.stride(0) % 2 or x.stride(1) != 1):
        return x.clone(memory_format=torch.contiguous_format)
    return x


_ws: dict[tuple[str, int, int], torch.Tensor] = {}


def workspace(device: torch.device, n: int, slots: int) -> torch.Tensor:
    """float32 [slots · n] partials for weights with N = n outputs (SPLIT_K × padded rows
    slots; at least 32: every split of up to 4 rows shares one, 128 bytes an output), kept: a
    graph captured with it keeps using it."""
    slots = max(slots, MAX_SPLIT * 4)
    key = (str(device), n, slots)
    if key not in _ws:
        _ws[key] = torch.empty(slots * n, device=device, dtype=torch.float32)
    return _ws[key]


def counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros, one a (row block, tile): 2 · N covers 8 rows at any BLOCK_N (the kernel
    puts each back to 0)."""
    key = (str(device), n, 0)
    if key not in _ws:
        _ws[key] = torch.zeros(2 * n, device=device, dtype=torch.int32)
    return _ws[key]


def _row_blocks(m: int) -> tuple[int, int]:
    """(BLOCK_M, padded rows) for m rows."""
    bm = 1 if m == 1 else 2 if m == 2 else 4
    return bm, -(-m // bm) * bm


def fits(cfg: Split, m: int) -> bool:
    return 1 <= m <= MAX_ROWS and 1 <= cfg.split_k <= MAX_SPLIT


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] → (int8 codes [M, K], float32 scales [M, K/32], float32 sums [M, K/32])."""
    m, k = x.shape
    groups = k // GROUP
    xq = torch.empty(m, k, device=x.device, dtype=torch.int8)
    xd = torch.empty(m, groups, device=x.device, dtype=torch.float32)
    xs = torch.empty(m, groups, device=x.device, dtype=torch.float32)
    block = 16
    _kernels().quantize_q8[(-(-groups // block), m)](x, xq, xd, xs, groups, x.stride(0), k,
                                                      BLOCK_G=block, num_warps=4)
    return xq, xd, xs


def gemv_split(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor,
               cfg: Split) -> torch.Tensor:
    """x [M ≤ 8, K] (contiguous rows) @ w.T by ``gemv_split`` with ``cfg``."""
    m, k = x.shape
    n = packed.shape[0]
    groups = k // GROUP
    if not fits(cfg, m):
        raise ValueError(f"gemv_split: {m} rows with {cfg}")
    bm, rows = _row_blocks(m)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    cnt = counters(x.device, n)
    ws = workspace(x.device, n, cfg.split_k * rows) if cfg.split_k > 1 else cnt
    new = v2(cfg.v2)
    if cfg.q8 == 1:
        xq, xd, xs = quantize_q8(x)
        args = (xq.view(torch.int32), xd, xs, k // 4)
    else:
        if new:
            x = _word_rows(x)
        args = (x, x, x, x.stride(0))
    even = groups % (cfg.block_g * cfg.split_k) == 0
    grid = (-(-n // cfg.block_n), cfg.split_k, rows // bm)
    _kernels().gemv_split[grid](
        *args[:3], packed.view(torch.int32), so, y, ws, cnt, m, n, groups, args[3], y.stride(0),
        k // 8, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_G=cfg.block_g, SPLIT_K=cfg.split_k,
        NUM_STAGES=cfg.num_stages, EVEN=even, Q8=int(cfg.q8), SYM=so.dtype == torch.int16,
        ASM=not _interpreted(), V2=new and cfg.q8 != 1, num_warps=cfg.num_warps,
        num_stages=1)  # the loop: NUM_STAGES
    return y
