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

Kernels (``cuda_q6k_kernels.py``) by the rows of x: ``gemv`` for 1-2 (decode at batch 1-2),
``gemm`` with 16-row tiles for 3-16 (decode batches, on the tensor cores), ``gemm`` with larger
tiles beyond (prefill), the weight dequantised in the kernel; no dense copy is ever made. Each
route's tiles are checked and timed per weight shape at start (``cuda_q6k_tune.prepare``). Fused
parts (a Q4_K_M layer's Q4_K q/k beside a Q6_K v) go through ``cuda_int8.cuda_codes_linear``,
which builds ``CudaMixedLinear`` over runs of one layout each. Fixed grids for fixed shapes and
no host sync: CUDA graphs capture every launch. Importing this module needs neither a GPU nor
Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends.cuda_int4 import CodesLinear, block_g, pack_codes, triton_cdiv, unpack_codes
from pensieve.loaders.int4_codes import Int8Groups

BLOCK = 256  # values a Q6_K block; K must be a multiple
GEMV_MAX_ROWS = 2
SKINNY_MAX_ROWS = 16


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


# The untimed defaults (no GPU run since they were written; cuda_q6k_tune times them against
# other candidates per weight shape at start): tiles that ptxas builds for sm_90 without a
# register spill (bf16; Triton 3.9's AOT compile here: 72, 162, 168 and 222 registers).
GEMV = Tiles(1, 8, 8, 4, 2)
SKINNY = Tiles(16, 32, 4, 4, 3)  # 3-16 rows
GEMM_SMALL = Tiles(64, 64, 2, 4, 3)  # up to 256 rows
GEMM = Tiles(128, 128, 2, 8, 3)


def pack_six(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes −32..31 [R, K] → (low 4 bits of ``code + 32`` in the int4 layout [R, K/2],
    high 2 bits four a byte [R, K/4]: byte i of group g holds columns 32g+i, +8, +16, +24)."""
    r, k = codes.shape
    u = (codes + 32).view(torch.uint8)  # −32..31 + 32 stays within int8
    hi = (u >> 4).view(r, k // 32, 4, 8)
    packed_hi = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return pack_codes(u & 15), packed_hi.reshape(r, k // 4).contiguous()


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
        BLOCK_G=block_g(groups, t.block_g), num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def gemm(x: torch.Tensor, w: Buffers, y: torch.Tensor, t: Tiles | None = None) -> torch.Tensor:
    """y = x @ w.T by the dequantising ``gemm`` (tiles by the rows of x unless given)."""
    m, k = x.shape
    t = t or (SKINNY if m <= SKINNY_MAX_ROWS else GEMM_SMALL if m <= 256 else GEMM)
    n, groups = w[0].shape[0], k // 32
    bg = max(2, block_g(groups, t.block_g))
    grid = (triton_cdiv(m, t.block_m) * triton_cdiv(n, t.block_n),)
    _kernels().gemm[grid](x, *w, y, m, n, groups, x.stride(0), y.stride(0), BLOCK_M=t.block_m,
                          BLOCK_N=t.block_n, BLOCK_G=bg, GROUP_M=t.group_m,
                          num_warps=t.num_warps, num_stages=t.num_stages)
    return y


ROUTES = ("gemv", "skinny", "gemm_small", "gemm")
Plan = dict[str, Tiles | None]  # route → its tiles, None: dequantise + cuBLAS (none built here)
DEFAULT_PLAN: Plan = {"gemv": GEMV, "skinny": SKINNY, "gemm_small": GEMM_SMALL, "gemm": GEMM}


def route(rows: int) -> str:
    """The route a call of ``rows`` rows of x takes."""
    if rows <= GEMV_MAX_ROWS:
        return "gemv"
    return "skinny" if rows <= SKINNY_MAX_ROWS else "gemm_small" if rows <= 256 else "gemm"


def launch(name: str, x: torch.Tensor, w: Buffers, t: Tiles) -> torch.Tensor:
    """x @ w.T by the kernel of route ``name`` with tiles ``t``."""
    y = torch.empty(x.shape[0], w[0].shape[0], device=x.device, dtype=x.dtype)
    return gemv(x, w, y, t) if name == "gemv" else gemm(x, w, y, t)


def q6k_linear(x: torch.Tensor, w: Buffers, plan: Plan | None = None) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ w.T on the kernels (CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1``) with ``plan``'s tiles (``cuda_q6k_tune``; else the defaults)."""
    name = route(x.shape[0])
    t = (plan or DEFAULT_PLAN)[name]
    if t is None:  # no tile of this route built and gave the right product on this GPU
        return F.linear(x, dequantize(*w).to(x.dtype))
    return launch(name, x, w, t)


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
        lo, hi = zip(*(pack_six(p.codes) for p in parts))
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
