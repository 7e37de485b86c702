"""Q6_K weights on CUDA as 6-bit codes: 210 bytes a 256 weights, the file's own size.

A GGUF Q6_K block is ``w = d · sc · (q − 32)``: 6-bit codes ``q``, an int8 sub-scale ``sc`` per 16
weights and a float16 ``d`` per 256. ``CudaQ6KLinear`` keeps exactly those numbers, repacked once
at load (``pack_six``) so that a kernel reads a group of 32 weights as 16 contiguous bytes of low
nibbles (the int4 layers' order) and 8 of high bit pairs:

* ``lo`` uint8 [N, K/2] and ``hi`` uint8 [N, K/4] — ``pack_six``'s two buffers (shared with the
  MoE experts' 6-bit layout, ``cuda_moe``);
* ``sc`` int8 [N, K/16] and ``d`` int16 [N, K/256] (float16 bits, so ``model.to(dtype)`` leaves
  them alone).

That is 128 + 64 + 16 + 2 bytes a block, as in the file, against 288 for the int8 codes with a
float16 scale per 16 (``cuda_int8``) the layer had before; and ``d · sc`` is formed in float32 in
the kernel, exactly (the int8 layout rounds it to float16).

Kernels (``cuda_q6k_kernels.py``) by the rows of x, one ``Plan`` entry per row bucket
(``BUCKETS``), each checked and timed per weight shape at start (``cuda_q6k_tune.prepare``):
``gemv`` for 1-2 rows (float32 FMAs); ``split`` for 1-16 (``cuda_q6k_split``: split-K FMA
GEMV, the weight tile dequantised once for all rows; tuner candidates only); ``rows`` for 1-16
(``cuda_q6k_rows``: swap-AB tensor cores on the code words; tuner candidates only); ``skinny2``
for 4-16 (``cuda_q6k_skinny2``: the int4 skinny2's mma.sync product, the codes made operands
in PTX; tuner candidates only); ``skinny``
for 2-32 (the weight unpacked once for all rows as the tensor cores' left operand, 16 or 32-row
tiles, split-K in one launch through a workspace per N); the dequantising tensor-core ``gemm``; ``dequant`` from 32 rows (the weight
dequantised into a temporary for the call + cuBLAS, a vocabulary-sized weight a block of rows
at a time: nothing is kept). No dense copy is ever kept. Fused
parts (a Q4_K_M layer's Q4_K q/k beside a Q6_K v) go through ``cuda_int8.cuda_codes_linear``,
which builds ``CudaMixedLinear`` over runs of one layout each. Fixed grids for fixed shapes and
no host sync: CUDA graphs capture every launch. Importing this module needs neither a GPU nor
Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends import cuda_splitk as splitk
from pensieve.backends.cuda_int4 import CodesLinear, block_g, pack_codes, triton_cdiv, unpack_codes
from pensieve.loaders.int4_codes import Int8Groups, Q6KGroups

if TYPE_CHECKING:
    from pensieve.backends.cuda_q6k_rows import Rows  # noqa: F401  (the Choice alias)
    from pensieve.backends.cuda_q6k_skinny2 import Skinny2  # noqa: F401
    from pensieve.backends.cuda_q6k_split import Split  # noqa: F401

BLOCK = 256  # values a Q6_K block; K must be a multiple
BUCKETS = (1, 2, 4, 8, 16, 32, 256, 2048)  # rows up to which a plan entry serves (past: the last)
SPLIT_MAX = 8  # the most programs a skinny launch splits K over
SPLIT_MAX_N = 32768  # weights with as many outputs have tiles enough: no split-K, no workspace
DEQUANT_CHUNK = 1 << 26  # weights one dequantised temporary holds (128 MiB in bf16)


@dataclass(frozen=True)
class Tiles:
    """One launch's tiles: BLOCK_M rows of x (gemm), BLOCK_N outputs, BLOCK_G groups of 32
    columns a step (cut to a divisor of K/32)."""

    block_m: int
    block_n: int
    block_g: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    prefetch: bool = False  # gemv: the next step's code bytes loaded before this step's products


@dataclass(frozen=True)
class Skinny:
    """One launch of ``skinny``: up to BLOCK_M (16 or 32) rows of x, BLOCK_N outputs a program,
    BLOCK_G groups of 32 columns a step, K split over SPLIT_K programs (one launch)."""

    block_m: int
    block_n: int
    block_g: int
    split_k: int
    num_warps: int
    num_stages: int


# The untimed defaults (cuda_q6k_tune times them against other candidates per weight shape at
# start): tiles that ptxas builds for sm_90 without a register spill (bf16; Triton 3.9's AOT
# compile here).
GEMV = Tiles(1, 8, 8, 4, 2)
GEMM16 = Tiles(16, 32, 4, 4, 3)  # the dequantising gemm's 16-row tile (3-16 rows until session 9)
GEMM_SMALL = Tiles(64, 64, 2, 4, 3)  # up to 256 rows
GEMM = Tiles(128, 128, 2, 8, 3)
SKINNY16 = Skinny(16, 64, 4, 4, 4, 3)
SKINNY32 = Skinny(32, 64, 4, 4, 4, 3)
DEQUANT = Tiles(1, 16, 8, 4, 1)  # the weight into a temporary (block_n rows × block_g groups)

# kernel, its tiles (Split: cuda_q6k_split; Rows: cuda_q6k_rows; Skinny2: cuda_q6k_skinny2)
Choice = tuple[str, "Tiles | Skinny | Split | Rows | Skinny2 | None"]
Plan = dict[int, Choice]  # bucket → choice
KERNELS = ("gemv", "split", "rows", "skinny2", "skinny", "gemm", "dequant", "torch")  # torch: reference dequantise + matmul


def pack_six(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes −32..31 [R, K] → (low 4 bits of ``code + 32`` in the int4 layout [R, K/2],
    high 2 bits four a byte [R, K/4]: byte i of group g holds columns 32g+i, +8, +16, +24)."""
    r, k = codes.shape
    u = (codes + 32).view(torch.uint8)  # −32..31 + 32 stays within int8
    hi = (u >> 4).view(r, k // 32, 4, 8)
    packed_hi = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return pack_codes(u & 15), packed_hi.reshape(r, k // 4).contiguous()


def six_of(p: Int8Groups) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_six(p.codes)``: a loaded Q6_K (``Q6KGroups``) packs straight from the file's
    bytes, without deriving its int8 codes (8 bits a weight) on the way."""
    return p.six_packed() if isinstance(p, Q6KGroups) else pack_six(p.codes)


def unpack_six(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """int8 codes [R, K] back from ``pack_six``."""
    r, k = lo.shape[0], lo.shape[1] * 2
    h = hi.view(r, k // 32, 1, 8)
    high = torch.cat([(h >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(r, k)
    return ((unpack_codes(lo) | (high << 4)).to(torch.int16) - 32).to(torch.int8)


def takes(p: object) -> bool:
    """A Q6_K weight with the file's own scale factors (``Int8Groups.k_scales``), K % 256 == 0."""
    return (isinstance(p, Int8Groups) and p.ggml_type == "Q6_K" and p.k_scales is not None
            and p.group_size == 16 and p.offsets is None and p.shape[1] % BLOCK == 0)


def layout_bytes(n: int, k: int) -> int:
    """Bytes ``CudaQ6KLinear`` holds for an [n, k] weight (the file's 210 a 256)."""
    return n * k // BLOCK * 210


def dequantize(lo: torch.Tensor, hi: torch.Tensor, sc: torch.Tensor, d: torch.Tensor
               ) -> torch.Tensor:
    """The float32 weight [R, K] (reference; CPU forward; embedding rows)."""
    r, k = lo.shape[0], lo.shape[1] * 2
    codes = unpack_six(lo, hi).float().view(r, k // BLOCK, BLOCK // 16, 16)
    steps = d.view(torch.float16).float()[:, :, None] * sc.float().view(r, k // BLOCK, BLOCK // 16)
    return (codes * steps[..., None]).view(r, k)


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_q6k_kernels

    return cuda_q6k_kernels


Buffers = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # lo, hi, sc, d


def gemv(x: torch.Tensor, w: Buffers, y: torch.Tensor, t: Tiles = GEMV) -> torch.Tensor:
    """y[:, :n] = x @ w.T by ``gemv`` (y may be a column slice of a wider output)."""
    m, k = x.shape
    n, groups = w[0].shape[0], k // 32
    _kernels().gemv[(triton_cdiv(n, t.block_n), m)](
        x, *w, y, n, groups, x.stride(0), y.stride(0), BLOCK_N=t.block_n,
        BLOCK_G=block_g(groups, t.block_g), PREFETCH=t.prefetch, num_warps=t.num_warps,
        num_stages=t.num_stages)
    return y


def gemm(x: torch.Tensor, w: Buffers, y: torch.Tensor, t: Tiles | None = None) -> torch.Tensor:
    """y = x @ w.T by the dequantising ``gemm`` (tiles by the rows of x unless given)."""
    m, k = x.shape
    t = t or (GEMM16 if m <= 16 else GEMM_SMALL if m <= 256 else GEMM)
    n, groups = w[0].shape[0], k // 32
    bg = max(2, block_g(groups, t.block_g))
    grid = (triton_cdiv(m, t.block_m) * triton_cdiv(n, t.block_n),)
    _kernels().gemm[grid](x, *w, y, m, n, groups, x.stride(0), y.stride(0), BLOCK_M=t.block_m,
                          BLOCK_N=t.block_n, BLOCK_G=bg, GROUP_M=t.group_m,
                          num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def skinny_workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials (float32 [SPLIT_MAX, 32, N]; one element where N ≥ SPLIT_MAX_N, which
    never splits) and per-column-tile counters (int32, zero between calls: the kernel resets
    them), one pair per (device, N) shared by the layers of that N (their launches are serial
    on one stream). Made at ``cuda_q6k_tune.prepare``, before any graph capture."""
    partials = SPLIT_MAX * 32 * n if n < SPLIT_MAX_N else 1
    return splitk.workspace("q6k_skinny", device, n, partials, 16)


def skinny_fits(t: Skinny, n: int) -> bool:
    """Whether ``t`` may run a weight with ``n`` outputs (split-K only below SPLIT_MAX_N)."""
    return t.split_k == 1 or (n < SPLIT_MAX_N and t.split_k <= SPLIT_MAX)


def skinny(x: torch.Tensor, w: Buffers, y: torch.Tensor, t: Skinny = SKINNY16) -> torch.Tensor:
    """y = x @ w.T (x: up to ``t.block_m`` rows) by the tensor-core ``skinny`` kernel."""
    m, k = x.shape
    n, groups = w[0].shape[0], k // 32
    if m > t.block_m or t.block_m not in (16, 32) or t.block_n < 16 or not skinny_fits(t, n):
        raise ValueError(f"skinny: {m} rows, N={n} with {t}")
    g_per = triton_cdiv(triton_cdiv(groups, t.split_k), t.block_g) * t.block_g
    ws, cnt = skinny_workspace(x.device, n)
    _kernels().skinny[(triton_cdiv(n, t.block_n), t.split_k)](
        x, *w, y, ws, cnt, m, n, groups, g_per, x.stride(0), y.stride(0), BLOCK_M=t.block_m,
        BLOCK_N=t.block_n, BLOCK_G=t.block_g, SPLIT_K=t.split_k,
        EVEN=g_per * t.split_k == groups, num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def dequant_weight(w: Buffers, dtype: torch.dtype, t: Tiles = DEQUANT) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` by the ``dequant`` kernel (one rounding from float32)."""
    n, groups = w[0].shape[0], w[0].shape[1] // 16
    out = torch.empty(n, groups * 32, device=w[0].device, dtype=dtype)
    bg = block_g(groups, t.block_g)
    _kernels().dequant[(triton_cdiv(n, t.block_n), groups // bg)](
        *w, out, n, groups, BLOCK_N=t.block_n, BLOCK_G=bg, num_warps=t.num_warps,
        num_stages=t.num_stages)
    return out


def dequant_linear(x: torch.Tensor, w: Buffers, t: Tiles = DEQUANT,
                   chunk: int = DEQUANT_CHUNK) -> torch.Tensor:
    """x @ w.T with the weight dequantised into a temporary (nothing kept) + cuBLAS; a weight
    of more than ``chunk`` values (a vocabulary-sized head) a block of rows at a time."""
    n, k = w[0].shape[0], x.shape[1]
    rows = max(1, chunk // k)
    if rows >= n:
        return F.linear(x, dequant_weight(w, x.dtype, t))
    y = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    for n0 in range(0, n, rows):
        part = tuple(b[n0:n0 + rows] for b in w)
        y[:, n0:n0 + rows] = F.linear(x, dequant_weight(part, x.dtype, t))
    return y


def bucket(rows: int) -> int:
    """The plan entry a call of ``rows`` rows of x takes: the first bucket ≥ rows, else the
    last."""
    return next((b for b in BUCKETS if rows <= b), BUCKETS[-1])


def default_plan(n: int) -> Plan:
    """The untimed plan for a weight with ``n`` outputs (tests; a layer ``prepare`` missed)."""
    def fit(t: Skinny) -> Skinny:
        return t if skinny_fits(t, n) else Skinny(t.block_m, t.block_n, t.block_g, 1,
                                                  t.num_warps, t.num_stages)
    plan: Plan = {1: ("gemv", GEMV), 2: ("gemv", GEMV), 32: ("skinny", fit(SKINNY32)),
                  256: ("gemm", GEMM_SMALL), 2048: ("dequant", DEQUANT)}
    plan.update({b: ("skinny", fit(SKINNY16)) for b in (4, 8, 16)})
    return plan


def launch(choice: Choice, x: torch.Tensor, w: Buffers) -> torch.Tensor:
    """x @ w.T by ``choice``'s kernel and tiles."""
    name, t = choice
    if x.shape[0] == 0:  # no rows (a step where no chunk completes): nothing to launch
        return x.new_empty(0, w[0].shape[0])
    if name == "dequant":
        return dequant_linear(x, w, t or DEQUANT)
    if name == "torch" or t is None:
        return F.linear(x, dequantize(*w).to(x.dtype))
    y = torch.empty(x.shape[0], w[0].shape[0], device=x.device, dtype=x.dtype)
    if name == "gemv":
        return gemv(x, w, y, t)
    if name == "split":  # the split-K FMA GEMV for 1-16 rows (its own module: candidates only)
        from pensieve.backends.cuda_q6k_split import gemv_split

        return gemv_split(x, w, y, t)  # type: ignore[arg-type]
    if name == "rows":  # swap-AB tensor cores on the code words, 1-16 rows (candidates only)
        from pensieve.backends.cuda_q6k_rows import gemm_rows

        return gemm_rows(x, w, y, t)  # type: ignore[arg-type]
    if name == "skinny2":  # the codes made mma operands in PTX, 1-16 rows (candidates only)
        from pensieve.backends.cuda_q6k_skinny2 import gemm_skinny2

        return gemm_skinny2(x, w, y, t)  # type: ignore[arg-type]
    if name == "skinny" and isinstance(t, Skinny) and x.shape[0] <= t.block_m:
        return skinny(x, w, y, t)
    return gemm(x, w, y, t if isinstance(t, Tiles) else None)


def q6k_linear(x: torch.Tensor, w: Buffers, plan: Plan | None = None) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ w.T on the kernels (CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1``) by ``plan``'s choice for M's bucket (``cuda_q6k_tune``; else the
    defaults)."""
    return launch((plan or default_plan(w[0].shape[0]))[bucket(x.shape[0])], x, w)


class CudaQ6KLinear(CodesLinear):
    """y = x @ W.T (+ b) with W as Q6_K's 6-bit codes, sub-scales and super-scales; built from
    one Q6_K ``Int8Groups`` (``takes``) or the parts of a fused weight, stacked by rows."""

    def __init__(self, parts: Int8Groups | Sequence[Int8Groups],
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        parts = [parts] if isinstance(parts, Int8Groups) else list(parts)
        if not all(takes(p) for p in parts) or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("CudaQ6KLinear: Q6_K weights with their k_scales, one K, K % 256 == 0")
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)
        lo, hi = zip(*(six_of(p) for p in parts))
        self.register_buffer("lo", torch.cat(lo))
        self.register_buffer("hi", torch.cat(hi))
        self.register_buffer("sc", torch.cat([p.k_scales[0] for p in parts]).contiguous())
        self.register_buffer("d", torch.cat(
            [p.k_scales[1].to(torch.float16) for p in parts]).contiguous().view(torch.int16))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.plan: Plan | None = None  # cuda_q6k_tune.prepare's, per weight shape; not saved

    def weight_buffers(self) -> Buffers:
        return self.lo, self.hi, self.sc, self.d

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (reference; the CPU forward)."""
        return dequantize(*self.weight_buffers())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows ``ids`` of the weight, dequantised alone (an embedding lookup)."""
        return dequantize(self.lo[ids], self.hi[ids], self.sc[ids], self.d[ids])

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        return q6k_linear(x2, self.weight_buffers(), self.plan)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q6_K 6-bit"
