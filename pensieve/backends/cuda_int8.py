"""Weight-only linear layers on CUDA from GGUF's int8-coded types (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K,
IQ4_NL, IQ4_XS), kept as their codes instead of dequantised.

The loader gives those types as ``Int8Groups`` (``loaders/int4_codes.py``): int8 codes [N, K],
a float16 scale per 32 columns (per 16 for Q6_K) and, for Q5_1/Q5_K, a float16 offset per 32.
``CudaInt8Linear`` keeps exactly that: the codes as int8, the scales and offsets as their float16
*bits* in int16 buffers (so ``model.to(dtype=...)`` leaves them alone), and runs the Triton
kernels of ``cuda_int8_kernels.py`` on them:

* 1 row (decode at batch 1): ``gemv``, float32 sums with exact float16 scales;
* 2-16 rows: ``skinny``, the weight tile dequantised in registers, on the tensor cores;
  (on a GPU ``cuda_int8_tune`` races the routes' tiles per weight shape and row bucket at
  start: ``CudaInt8Linear.plan``; a third route there, ``gemv2`` of
  ``cuda_int8_gemv2_kernels.py``, is ``gemv`` with 16-byte code and x loads in one layout,
  no shared-memory exchange, any K step — gpt-oss's K = 2880 is 90 groups, no power of two
  — and up to 4 rows a program; only a plan picks it;)
* up to ``MATMUL_MAX_ROWS``: ``matmul``, a GEMM tile dequantising the weight in the kernel;
* beyond (long prefill, compute-bound): the weight dequantised into a temporary for the call,
  then cuBLAS. No dense copy is kept anywhere.

A fused projection (q/k/v, gate/up) whose parts differ in format is held as row blocks, one per
run of parts sharing (group, offsets), each launched into its slice of one output. Where int4
parts (Q4_0/Q4_1/Q4_K, ``cuda_int4.CudaInt4Linear``) and int8 parts mix — a Q4_K_M file's Q4_K q/k
with a Q6_K v — ``cuda_codes_linear`` builds ``CudaMixedLinear``: one child per run, outputs
concatenated.

Every launch has a fixed grid for fixed shapes and nothing syncs with the host, so CUDA graphs
capture them. Importing this module needs neither a GPU nor Triton (kernels load on first use).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends import cuda_q6k
from pensieve.backends.cuda_int4 import CodesLinear, CudaInt4Linear, triton_cdiv
from pensieve.backends.cuda_q6k import CudaQ6KLinear
from pensieve.loaders.int4_codes import Int8Groups
from pensieve.models.quant_linear import Int4Groups

GROUP = 32
MATMUL_MAX_ROWS = 256  # beyond: dequantise into a temporary + cuBLAS


@dataclass(frozen=True)
class Tiles:
    """One launch's tile sizes; ``block_k`` columns a step (cut to a divisor of K)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


GEMV = Tiles(1, 4, 512, 4, 3)
# gemv2: up to block_m (≤ 4) rows a program, block_k columns a step (any multiple of 16)
GEMV2 = Tiles(4, 4, 1024, 4, 1)
SKINNY = Tiles(16, 32, 128, 4, 3)
# the row buckets a timed plan covers (``cuda_int8_tune``): a route and its tiles per bucket
ROUTE_BUCKETS = (1, 2, 4, 8, 16)
Plan = dict[int, tuple[str, Tiles]]
MATMUL = Tiles(64, 64, 64, 4, 3)
MATMUL_SMALL = Tiles(32, 64, 64, 4, 3)  # up to 32 rows
DEQUANT = Tiles(1, 16, 256, 4, 1)


@dataclass(frozen=True)
class Block:
    """Row block of one format: codes int8 [n, K], scales int16 (float16 bits) [n, K/group],
    mins int16 [n, K/32] or None."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    group: int


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_int8_kernels

    return cuda_int8_kernels


def _gemv2_kernels() -> ModuleType:
    from pensieve.backends import cuda_int8_gemv2_kernels

    return cuda_int8_gemv2_kernels


def _block_k(k: int, want: int) -> int:
    """The largest 32 · 2^j ≤ want whose multiples tile K (K a multiple of 32)."""
    b = want
    while b > GROUP and k % b:
        b //= 2
    return b


def _args(b: Block) -> tuple:
    return (b.codes.view(torch.uint8), b.scales, b.scales if b.mins is None else b.mins)


def _meta(b: Block) -> dict:
    return {"GS": b.group, "HAS_MIN": b.mins is not None}


def gemv(x: torch.Tensor, b: Block, y: torch.Tensor, t: Tiles = GEMV) -> torch.Tensor:
    """y[:, :n] = x @ w.T (y may be a column slice of a wider output)."""
    m, k = x.shape
    n = b.codes.shape[0]
    bk = _block_k(k, t.block_k)
    _kernels().gemv[(m, triton_cdiv(n, t.block_n))](
        x, *_args(b), y, n, k, x.stride(0), y.stride(0), **_meta(b), BLOCK_N=t.block_n,
        BLOCK_S=bk // b.group, num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def gemv2_rows(m: int, most: int) -> int:
    """x rows a ``gemv2`` program takes: the power of two ≥ min(m, most) (1, 2 or 4 — one
    compiled kernel per bucket, none new for an odd m at run time)."""
    r = 1
    while r < min(m, most, 4):
        r *= 2
    return r


def gemv2(x: torch.Tensor, b: Block, y: torch.Tensor, t: Tiles = GEMV2) -> torch.Tensor:
    """y[:, :n] = x @ w.T on ``gemv2`` (16-byte loads in one layout; ``t.block_k`` columns a
    step, any multiple of 16 — K's tail step masked; up to ``t.block_m`` ≤ 4 rows a program).
    x is read as int32 words: rows not 16-byte aligned are copied first; codes not 16-byte
    aligned raise (the race then leaves gemv2 out) rather than read misaligned words."""
    m, k = x.shape
    n = b.codes.shape[0]
    if b.codes.data_ptr() % 16 or not b.codes.is_contiguous():
        raise ValueError("gemv2: codes must start 16-byte aligned, rows contiguous")
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)
    rows = gemv2_rows(m, t.block_m)
    bh = t.block_k // 16
    _gemv2_kernels().gemv2[(triton_cdiv(m, rows), triton_cdiv(n, t.block_n))](
        x, *_args(b), y, m, n, k, x.stride(0), y.stride(0), **_meta(b), ROWS=rows,
        BLOCK_N=t.block_n, BLOCK_H=bh, EVEN=(k // 16) % bh == 0, num_warps=t.num_warps,
        num_stages=t.num_stages)
    return y


def skinny(x: torch.Tensor, b: Block, y: torch.Tensor, t: Tiles = SKINNY) -> torch.Tensor:
    m, k = x.shape
    if m > 16:
        raise ValueError(f"skinny: {m} rows (at most 16)")
    n = b.codes.shape[0]
    _kernels().skinny[(triton_cdiv(n, t.block_n),)](
        x, *_args(b), y, m, n, k, x.stride(0), y.stride(0), **_meta(b), BLOCK_N=t.block_n,
        BLOCK_K=_block_k(k, t.block_k), num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def matmul(x: torch.Tensor, b: Block, y: torch.Tensor, t: Tiles | None = None) -> torch.Tensor:
    m, k = x.shape
    t = t or (MATMUL_SMALL if m <= 32 else MATMUL)
    n = b.codes.shape[0]
    grid = (triton_cdiv(n, t.block_n), triton_cdiv(m, t.block_m))
    _kernels().matmul[grid](
        x, *_args(b), y, m, n, k, x.stride(0), y.stride(0), **_meta(b), BLOCK_M=t.block_m,
        BLOCK_N=t.block_n, BLOCK_K=_block_k(k, t.block_k), num_warps=t.num_warps,
        num_stages=t.num_stages)
    return y


def dequantize(b: Block, out: torch.Tensor, t: Tiles = DEQUANT) -> torch.Tensor:
    """out[:n] = the block's weight in out's dtype (out may be a row slice of a taller one)."""
    n, k = b.codes.shape
    bk = _block_k(k, t.block_k)
    _kernels().dequantize[(triton_cdiv(n, t.block_n), k // bk)](
        *_args(b), out, n, k, out.stride(0), **_meta(b), BLOCK_N=t.block_n, BLOCK_K=bk,
        num_warps=t.num_warps, num_stages=t.num_stages)
    return out


def bucket(m: int) -> int:
    """The plan entry that serves m ≤ 16 rows: the smallest bucket that holds them."""
    return next(b for b in ROUTE_BUCKETS if m <= b)


def run_route(x: torch.Tensor, blocks: Sequence[Block], n: int, route: str,
              t: Tiles | None = None) -> torch.Tensor:
    """x @ w.T for w the row blocks stacked, each block into its columns of one output, on one
    route (``gemv``: a program a row and BLOCK_N outputs, each row reading the weight — from
    L2 where it fits; ``skinny``: up to 16 rows; ``matmul``) with tiles ``t`` (None: the
    route's own)."""
    launch = {"gemv": gemv, "gemv2": gemv2, "skinny": skinny, "matmul": matmul}[route]
    y = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    row = 0
    for b in blocks:
        rows = b.codes.shape[0]
        out = y[:, row:row + rows]
        launch(x, b, out) if t is None else launch(x, b, out, t)
        row += rows
    return y


def int8_linear(x: torch.Tensor, blocks: Sequence[Block], n: int,
                plan: Plan | None = None) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ w.T for w the row blocks stacked, on the kernels (any device
    Triton runs on: CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); up to 16 rows by
    ``plan``'s route for their bucket where the layer has a timed one."""
    m, k = x.shape
    if plan is not None and 1 <= m <= ROUTE_BUCKETS[-1]:
        return run_route(x, blocks, n, *plan[bucket(m)])
    if m > MATMUL_MAX_ROWS:
        w = torch.empty(n, k, device=x.device, dtype=x.dtype)
        row = 0
        for b in blocks:
            dequantize(b, w[row:row + b.codes.shape[0]])
            row += b.codes.shape[0]
        return F.linear(x, w)
    return run_route(x, blocks, n, "gemv" if m == 1 else "skinny" if m <= 16 else "matmul")


def block_key(p: Int8Groups) -> tuple[int, bool] | None:
    """(group, has offsets) of a weight the kernels take, else None: groups of 16 or 32 along
    a K that is a multiple of 32, offsets only per 32."""
    has_min = p.offsets is not None
    if p.shape[1] % GROUP or p.group_size not in (16, 32) or (has_min and p.group_size != GROUP):
        return None
    return p.group_size, has_min


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.int16)


class CudaInt8Linear(CodesLinear):
    """y = x @ W.T (+ b) with W as int8 codes in row blocks (one per run of parts sharing a
    format), built from one ``Int8Groups`` or the parts of a fused weight, in order."""

    def __init__(self, parts: Int8Groups | Sequence[Int8Groups],
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        parts = [parts] if isinstance(parts, Int8Groups) else list(parts)
        keys = [block_key(p) for p in parts]
        if not all(keys) or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("CudaInt8Linear: groups of 16/32 (offsets per 32), one K, K % 32 == 0")
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)
        self.groups: list[int] = []
        self.kinds = sorted({p.ggml_type or "int8" for p in parts})
        start = 0
        for i in range(1, len(parts) + 1):
            if i < len(parts) and keys[i] == keys[start]:
                continue
            run = parts[start:i]
            j = len(self.groups)
            self.groups.append(keys[start][0])
            self.register_buffer(f"codes{j}", torch.cat([p.codes for p in run]).to(torch.int8))
            self.register_buffer(f"scales{j}", torch.cat([_bits(p.scales) for p in run]))
            self.register_buffer(f"mins{j}", torch.cat([_bits(p.offsets) for p in run])
                                 if keys[start][1] else None)
            start = i
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # the route and tiles per row bucket timed at start (``cuda_int8_tune``); None: the
        # fixed rule (gemv at 1 row, skinny at 2-16)
        self.plan: Plan | None = None

    def blocks(self) -> list[Block]:
        return [Block(getattr(self, f"codes{j}"), getattr(self, f"scales{j}"),
                      getattr(self, f"mins{j}"), g) for j, g in enumerate(self.groups)]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (reference; the CPU forward)."""
        out = []
        for b in self.blocks():
            n, k = b.codes.shape
            w = b.codes.float().view(n, k // b.group, b.group) * b.scales.view(
                torch.float16).float()[..., None]
            if b.mins is not None:
                w = w + b.mins.view(torch.float16).float()[..., None]
            out.append(w.view(n, k))
        return torch.cat(out)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows ``ids`` of a one-block weight, dequantised alone (an embedding lookup)."""
        (b,) = self.blocks()
        w = b.codes[ids].float().view(len(ids), -1, b.group) * b.scales[ids].view(
            torch.float16).float()[..., None]
        if b.mins is not None:
            w = w.view(len(ids), -1, 32) + b.mins[ids].view(torch.float16).float()[..., None]
        return w.view(len(ids), self.in_features)

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        return int8_linear(x2, self.blocks(), self.out_features, self.plan)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{'+'.join(self.kinds)} int8 g{self.groups}")


ENV_MIXED_STREAMS = "PENSIEVE_MIXED_STREAMS"  # "0": a mixed layer's parts one after the other
_side_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


class CudaMixedLinear(nn.Module):
    """A fused projection whose parts run on different layers (int4 and int8 codes): each
    run of parts its own child, the outputs side by side, then the bias.

    While a CUDA graph is captured, the parts after the first run on a side stream forked
    from and joined back into the capturing one, so the graph holds them as parallel
    branches: a Q4_K_M layer's small Q6_K v projection (1024 outputs: too few programs to
    fill an H100 alone) runs beside its Q4_K q/k instead of after it. Only where the parts'
    output widths differ (the split-K workspaces are kept per width and layout family); off
    with ``PENSIEVE_MIXED_STREAMS=0``."""

    def __init__(self, layers: Sequence[nn.Module], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.parts = nn.ModuleList(layers)
        self.in_features = layers[0].in_features
        self.out_features = sum(m.out_features for m in layers)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        widths = [m.out_features for m in layers]
        self.concurrent = (len(set(widths)) == len(widths)
                           and os.environ.get(ENV_MIXED_STREAMS, "1") != "0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.concurrent and x.is_cuda and torch.cuda.is_current_stream_capturing():
            main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                rest = [m(x) for m in self.parts[1:]]
            outs = [self.parts[0](x), *rest]
            main.wait_stream(side)
        else:
            if self.concurrent and x.is_cuda:
                _side_stream(x.device)  # made before a capture needs it
            outs = [m(x) for m in self.parts]
        y = torch.cat(outs, dim=-1)
        return y if self.bias is None else y + self.bias


def code_layout(p: Int4Groups | Int8Groups) -> str | None:
    """The CUDA layout a weight's codes take: "int4" (Q4_0/Q4_1/Q4_K), "q6k" (Q6_K's 6-bit
    codes, ``cuda_q6k``), "int8" (the other int8-code types), or None (dequantised)."""
    if isinstance(p, Int4Groups):
        return "int4" if p.group_size == GROUP and p.shape[1] % GROUP == 0 else None
    if cuda_q6k.takes(p):
        return "q6k"
    return "int8" if block_key(p) is not None else None


def cuda_codes_linear(parts: Sequence[Int4Groups | Int8Groups],
                      bias: torch.Tensor | None = None) -> nn.Module | None:
    """The CUDA layer for a weight (or fused weight's parts) kept as codes: ``CudaInt4Linear``
    where all are 4-bit, ``CudaQ6KLinear`` where all are Q6_K, ``CudaInt8Linear`` where all are
    other int8 codes, ``CudaMixedLinear`` over runs of each otherwise; None where a part fits
    none (it is then dequantised)."""
    kinds = [code_layout(p) for p in parts]
    if not all(kinds) or len({p.shape[1] for p in parts}) != 1:
        return None
    make = {"int4": CudaInt4Linear, "int8": CudaInt8Linear, "q6k": CudaQ6KLinear}
    runs: list[list] = []
    for p, kd in zip(parts, kinds):
        if runs and runs[-1][0] == kd:
            runs[-1][1].append(p)
        else:
            runs.append([kd, [p]])
    if len(runs) == 1:
        return make[runs[0][0]](runs[0][1], bias)
    return CudaMixedLinear([make[kd](ps) for kd, ps in runs], bias)
