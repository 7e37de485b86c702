"""The wide-x-load int4 GEMV for 1-2 rows (``cuda_int4_gemv_wide_kernels.gemv_wide``): its tiles,
the candidates ``cuda_int4_tune`` times per weight shape at start (bfloat16 models), the launcher.

Same weight layout as every other int4 kernel (``cuda_int4.py``). Against ``gemv_words`` it
loads x 8 bytes at a time (8 loads a group instead of 32) and turns bfloat16 into float32 with a
shift instead of a conversion; whether that is faster on a given GPU is the tuner's to say.
``Wide.v2`` tiles (race candidates beside the others; ``PENSIEVE_INT4_GEMV_V2``, ``cuda_int4_gemv``'s
switch, 1/0 forces it on every tile / off) run the kernel's V2 loop: x as 16-byte quads in the weight words' layout (no shared-memory exchange in
the loop: the old one paid 2-26 ``bar.sync`` a step on sm_90), codes by ``prmt``, the weight a
group a thread even on ``word_threads`` tiles; ``0``: the loop before it.
Importing this module needs neither a GPU nor Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch

from pensieve.backends import cuda_int4_gemv

GROUP = 32
MAX_ROWS = 2  # each row reads the weight again: meant for decode at batch 1 (and 2)


@dataclass(frozen=True)
class Wide:
    """One ``gemv_wide`` launch: BLOCK_N weight rows a program, BLOCK_G groups a step; the
    weight a 16-byte piece (a group) a thread, or a word a thread (``word_threads``)."""

    block_n: int
    block_g: int
    num_warps: int
    num_stages: int = 2
    word_threads: bool = False
    prefetch: bool = False  # the next step's weight loaded before this step's products
    v2: bool = False  # the V2 loop (``cuda_int4_gemv``'s docstring); word_threads then unused


# timed per weight shape at start where the model runs in bfloat16 (one Triton compile each);
# untimed on a GPU so far. gemv_words' best-known tiles, then word-a-thread forms and a
# taller tile (more bytes in flight a thread on the short k/v and o shapes), then tiles that
# load the next step's weight before this step's products (two steps in flight); the last two
# at ~80-100 registers (sm_90 build here) for more programs an SM: the older ``gemv``, the
# 1-row winner of session 8, runs at 48 where gemv_words' 8-row tiles take ~170
CANDIDATES = (
    Wide(8, 32, 1), Wide(4, 64, 2), Wide(2, 128, 4), Wide(16, 32, 2), Wide(8, 64, 4, 3),
    Wide(8, 32, 1, word_threads=True), Wide(4, 64, 2, word_threads=True),
    Wide(4, 32, 4, word_threads=True),
    Wide(8, 32, 1, prefetch=True), Wide(4, 64, 2, prefetch=True), Wide(4, 32, 2, prefetch=True),
    Wide(2, 32, 1, prefetch=True), Wide(4, 64, 4, prefetch=True),
)
# the V2 loop, raced beside them (unrun on a GPU so far): the plain tiles' shapes and a
# prefetching one
V2_CANDIDATES = (Wide(8, 32, 1, v2=True), Wide(4, 64, 2, v2=True), Wide(16, 32, 2, v2=True),
                 Wide(4, 64, 2, prefetch=True, v2=True))


def candidates() -> tuple[Wide, ...]:
    """``CANDIDATES`` and ``V2_CANDIDATES`` (not where ``PENSIEVE_INT4_GEMV_V2`` is set)."""
    return CANDIDATES + (V2_CANDIDATES if cuda_int4_gemv.v2_forced() is None else ())


def fits(x: torch.Tensor, k: int) -> bool:
    """bfloat16 x (the shift that makes its floats), whole groups, at most ``MAX_ROWS`` rows."""
    return x.dtype == torch.bfloat16 and k % GROUP == 0 and 1 <= x.shape[0] <= MAX_ROWS


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_int4_gemv_wide_kernels

    return cuda_int4_gemv_wide_kernels


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _x_per_row(t: Wide) -> bool:
    """V2's x loaded a copy a weight row (``_x_pairs_n``): tiles with fewer groups a step than
    threads, whose x quads would otherwise be loaded 8 bytes a thread and exchanged."""
    return t.block_g < 32 * t.num_warps


def gemv_wide(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, t: Wide,
              swiglu: bool = False) -> torch.Tensor:
    """x [M ≤ 2, K] bfloat16 (contiguous rows) @ w.T by ``gemv_wide`` with tiles ``t``;
    ``swiglu``: w is a fused gate/up weight [2I, K] and the result SiLU(gate) · up [M, I], as
    the GEMV then ``cuda_layers.silu_mul`` would round it, in one launch."""
    m, k = x.shape
    n = packed.shape[0] // 2 if swiglu else packed.shape[0]
    if not fits(x, k) or (swiglu and packed.shape[0] % 2):
        raise ValueError(f"gemv_wide: {m} rows of {x.dtype} (bfloat16, ≤ {MAX_ROWS} rows)")
    groups = k // GROUP
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    x2 = x.contiguous().view(torch.int32)  # two bfloat16 a word
    _kernels().gemv_wide[(-(-n // t.block_n), m)](
        x2, packed.view(torch.int32), so, y, n, groups, x2.stride(0), y.stride(0), k // 8,
        BLOCK_N=t.block_n, BLOCK_G=t.block_g, EVEN=groups % t.block_g == 0,
        SYM=so.dtype == torch.int16, WORD_THREADS=t.word_threads, ASM=not _interpreted(),
        SWIGLU=swiglu, PREFETCH=t.prefetch, V2=cuda_int4_gemv.v2(t.v2), XN=_x_per_row(t),
        num_warps=t.num_warps, num_stages=t.num_stages)
    return y
