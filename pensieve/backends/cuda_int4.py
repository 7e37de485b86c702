"""Weight-only int4 linear layers on CUDA, from exact GGUF 4-bit codes (Q4_0/Q4_1/Q4_K).

Decode at small batch is memory-bound: a bf16 8B model reads 14.8 GB a token, its 4-bit form
~4 GB. ``CudaInt4Linear`` keeps the codes packed two to a byte in GGUF's in-group order and
one (float16 scale, float16 offset) pair per 32 weights, packed into an int32 — so
``model.to(dtype=...)`` leaves them alone and a kernel reads both with one load. The codes
are the file's own; the pair is exact for Q4_0 and Q4_1 (float16 in the file) and rounded to
float16 for Q4_K (``d · sc`` needs up to 17 bits).

Which kernel runs depends on the rows of x. ``prepare_for_cuda`` (after the move to the GPU)
adds a copy of the codes in the layout of PyTorch's int4 matmul ("tinygemm", ``tinygemm.py``)
and, where GPU memory allows, dense copies; then, per weight shape, it picks the fastest tile
of the ``skinny`` kernel and times the kernels that apply for 1, 2, 4, 8 and 16 rows and routes
each bucket to the fastest (``route``): our Triton ``gemv`` (1 row, exact float16 scales,
``cuda_int4_kernels.py``), ``skinny`` (2-16 rows on the tensor cores, split-K in one launch;
it casts x to float16, so activations must stay below 65504), tinygemm (bfloat16 scales) or
cuBLAS on the dense copy. On an H100 at the 8B shapes: tinygemm for 1-4 rows, skinny for 8
and 16 (BENCHMARKS.md).

Beyond 16 rows (larger batches, prefill) cuBLAS on the dense copy wins (the product turns
compute-bound); without one, Triton ``matmul`` up to ``MATMUL_MAX_ROWS``, then the weight
dequantised into a temporary for the call (11-20% over cuBLAS alone at 2048 rows;
bench/gpu_int4.py).

All of them take fixed grids for fixed shapes, so CUDA graphs capture them. Importing this
module needs neither a GPU nor Triton; the kernels are imported on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends import tinygemm
from pensieve.backends.tinygemm import TinyGemm
from pensieve.models.quant_linear import Int4Groups

log = logging.getLogger(__name__)

GROUP = 32


@dataclass(frozen=True)
class Tiles:
    """One kernel launch's tile sizes (``BLOCK_G`` groups of 32 input columns per step)."""

    block_m: int
    block_n: int
    block_g: int
    num_warps: int
    num_stages: int


# From bench/gpu_int4.py's sweep on an H100 at the 8B shapes (BENCHMARKS.md).
GEMV = Tiles(1, 2, 32, 2, 3)
MATMUL = Tiles(16, 32, 2, 4, 3)
DEQUANT = Tiles(1, 16, 8, 4, 1)
ROUTE_BUCKETS = (1, 2, 4, 8, 16)  # row counts up to which prepare_for_cuda times a choice
SKINNY_MAX_ROWS = 16  # the skinny kernel pads x to 16 rows
MATMUL_MAX_ROWS = 64  # without dense copies: Triton matmul up to here, then dequantise


@dataclass(frozen=True)
class Skinny:
    """One launch of the ``skinny`` kernel (2-16 rows on the tensor cores): BLOCK_N weight rows
    and BLOCK_G groups of 32 columns a step, the columns split over SPLIT_K programs."""

    block_n: int
    block_g: int
    split_k: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # a register cap per thread (more programs per SM), or none

    def fits(self, k: int) -> bool:
        return (k // GROUP) % (self.block_g * self.split_k) == 0


# prepare_for_cuda times these per weight shape and keeps the fastest (bench/gpu_skinny.py
# sweeps a larger set; these were the best there at the 8B shapes on an H100).
SKINNY_CANDIDATES = (
    Skinny(64, 4, 4, 4, 3), Skinny(64, 4, 8, 4, 3), Skinny(64, 2, 4, 4, 3),
    Skinny(64, 4, 2, 4, 3), Skinny(64, 2, 8, 4, 3), Skinny(128, 4, 1, 4, 3),
)
SKINNY_SWEEP = tuple(
    Skinny(bn, bg, sk, nw, ns) for bn in (64, 128) for bg in (2, 4, 8) for sk in (1, 2, 4, 8)
    for nw in (4, 8) for ns in (3, 4))

_skinny_ws: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def skinny_workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials (float32 [8, 16, N]) and per-tile counters (int32, zero between
    calls: the kernel resets them) for weights with N outputs; one pair per (device, N),
    shared by the layers of that shape (their launches are serial on one stream). Made before
    graph capture (``prepare_for_cuda``) so that graphs keep using the same memory."""
    key = (str(device), n)
    if key not in _skinny_ws:
        _skinny_ws[key] = (torch.empty(8, 16, n, device=device, dtype=torch.float32),
                           torch.zeros(triton_cdiv(n, 16), device=device, dtype=torch.int32))
    return _skinny_ws[key]


def skinny(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, cfg: Skinny) -> torch.Tensor:
    """x [M ≤ 16, K] @ w.T by the tensor-core ``skinny`` kernel."""
    m, k = x.shape
    n = packed.shape[0]
    if m > SKINNY_MAX_ROWS or not cfg.fits(k) or cfg.split_k > 8:
        raise ValueError(f"skinny: {m} rows, K={k} with {cfg}")
    if cfg.block_n < 16:
        raise ValueError("skinny: BLOCK_N of at least 16 (the MMA and the counters)")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    ws, cnt = skinny_workspace(x.device, n)
    grid = (triton_cdiv(n, cfg.block_n), cfg.split_k)
    _kernels().skinny[grid](x, packed, so, y, ws, cnt, m, n, k, k // GROUP, x.stride(0),
                            y.stride(0), packed.stride(0), BLOCK_N=cfg.block_n, BLOCK_G=cfg.block_g,
                            SPLIT_K=cfg.split_k, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return y


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) → uint8 [N, K/2]: byte i of group g holds column 32g+i in
    its low nibble and 32g+16+i in its high nibble."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // GROUP, 2, GROUP // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def pack_scale_offset(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float scales/offsets [N, K/32] → int32 [N, K/32]: float16 scale low, offset high."""
    pair = torch.stack([scales.to(torch.float16), offsets.to(torch.float16)], dim=-1)
    return pair.contiguous().view(torch.int32).squeeze(-1)


def unpack(packed: torch.Tensor, scale_offset: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that a packed pair stands for (reference and fallback)."""
    n, half = packed.shape
    b = packed.view(n, half // 16, 1, 16)
    codes = torch.cat([b & 15, b >> 4], dim=2).reshape(n, half // 16, GROUP).float()
    pair = scale_offset.unsqueeze(-1).view(torch.float16).float()  # [N, G, 2]
    return (codes * pair[..., :1] + pair[..., 1:]).reshape(n, half * 2)


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_int4_kernels

    return cuda_int4_kernels


def _block_g(groups: int, want: int) -> int:
    """The largest power of two ≤ want that divides the number of groups."""
    g = want
    while groups % g:
        g //= 2
    return g


def gemv(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, t: Tiles = GEMV) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (m, triton_cdiv(n, t.block_n))
    _kernels().gemv[grid](x, packed, so, y, n, k, k // GROUP, x.stride(0), y.stride(0),
                          BLOCK_N=t.block_n, BLOCK_G=_block_g(k // GROUP, t.block_g),
                          num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def matmul(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, t: Tiles) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton_cdiv(n, t.block_n), triton_cdiv(m, t.block_m))
    _kernels().matmul[grid](x, packed, so, y, m, n, k, k // GROUP, x.stride(0), y.stride(0),
                            BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                            BLOCK_G=_block_g(k // GROUP, t.block_g),
                            num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def dequantize(packed: torch.Tensor, so: torch.Tensor, dtype: torch.dtype,
               t: Tiles = DEQUANT) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, device=packed.device, dtype=dtype)
    bg = _block_g(k // GROUP, t.block_g)
    grid = (triton_cdiv(n, t.block_n), k // GROUP // bg)
    _kernels().dequantize[grid](packed, so, out, n, k, k // GROUP, BLOCK_N=t.block_n, BLOCK_G=bg,
                                num_warps=t.num_warps, num_stages=t.num_stages)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_route(dense: torch.Tensor | None, tiny: TinyGemm | None) -> dict[int, str]:
    """Kernel for each row bucket before ``prepare_for_cuda`` has timed any."""
    few = "tinygemm" if tiny is not None else "dense" if dense is not None else "matmul"
    return {1: "gemv", 2: few, 4: few, 8: few, 16: "dense"}


def int4_linear(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor,
                dense: torch.Tensor | None = None, tiny: TinyGemm | None = None,
                route: Mapping[int, str] | None = None,
                skinny_cfg: Skinny | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, contiguous rows) @ w.T by the kernel ``route`` names for the
    first bucket (1, 2, 4, 8, 16 rows) that holds M; beyond: dense, Triton matmul,
    dequantise."""
    m = x.shape[0]
    route = route or default_route(dense, tiny)
    kind = next((route.get(b, "dense") for b in ROUTE_BUCKETS if m <= b), "dense")
    if kind == "gemv":
        return gemv(x, packed, so)
    if kind == "skinny" and skinny_cfg is not None:
        return skinny(x, packed, so, skinny_cfg)
    if kind == "tinygemm" and tiny is not None:
        return tiny(x)
    if kind == "dense" and dense is not None:
        return F.linear(x, dense)
    if m <= MATMUL_MAX_ROWS:
        return matmul(x, packed, so, MATMUL)
    return F.linear(x, dequantize(packed, so, x.dtype))


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] back from ``pack_codes``' layout."""
    n, half = packed.shape
    b = packed.view(n, half // 16, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(n, half * 2)


def prepare_for_cuda(model: nn.Module, dtype: torch.dtype, max_fraction: float = 0.4) -> None:
    """After the model is on the GPU: tinygemm copies of the codes (2–8 rows, bfloat16 only,
    where the op is there and passes ``tinygemm.works``), and dense copies for more rows if
    all of them fit in ``max_fraction`` of the GPU memory still free (the KV cache is sized
    after this)."""
    layers = [m for m in model.modules() if isinstance(m, CudaInt4Linear)]
    if not layers:
        return
    device = layers[0].packed.device
    if dtype == torch.bfloat16 and tinygemm.works(str(device)):
        for m in layers:
            if tinygemm.supported(m.in_features):
                pair = m.scale_offset.unsqueeze(-1).view(torch.float16)
                m.tiny = tinygemm.pack(unpack_codes(m.packed), pair[..., 0], pair[..., 1])
    need = sum(m.in_features * m.out_features for m in layers) * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    dense = need <= max_fraction * free
    if dense:
        for m in layers:
            m.dense = dequantize(m.packed, m.scale_offset, dtype)
    for m in layers:
        skinny_workspace(device, m.out_features)
    routes = _choose_routes(layers, dtype)
    log.info("int4 layers: %s; beyond 16 rows: %s (dense copies: %.1f GB, %.1f GB free before)",
             routes, "cuBLAS on dense copies" if dense else
             f"Triton matmul to {MATMUL_MAX_ROWS}, then dequantise + cuBLAS",
             need / 1e9 if dense else 0.0, free / 1e9)


def _gpu_us(run, layers: list[CudaInt4Linear], reps: int) -> float:
    """Median GPU µs of ``run(layer)`` cycling through ``layers``, launches queued behind a
    sleeping kernel so that Python's launch cost (a Triton launch costs more than an aten
    one) stays out, as it does in a CUDA graph."""
    for m in layers:  # compile, warm up
        run(m)
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(3_000_000)  # ~1.5 ms: the launches below queue up meanwhile
        start.record()
        for m in layers:
            run(m)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(layers))
    return sorted(samples)[reps // 2] * 1e3


def _choose_routes(layers: list[CudaInt4Linear], dtype: torch.dtype, reps: int = 20) -> str:
    """Per weight shape and row bucket (1, 2, 4, 8, 16), the fastest of the kernels that
    apply, timed here on up to 8 layers of the shape (as a decode step runs them back to back).
    On an H100 at the 8B shapes: tinygemm for 1 row (4-18% ahead of our gemv) and 2-4 rows,
    skinny for 8 and 16 (3-22% ahead of cuBLAS on the dense copy)."""
    by_shape: dict[tuple[int, int], list[CudaInt4Linear]] = {}
    for m in layers:
        by_shape.setdefault((m.out_features, m.in_features), []).append(m)
    notes = []
    for (n, k), group in by_shape.items():
        sample, first = group[:8], group[0]
        route = default_route(first.dense, first.tiny)
        cfg = _choose_skinny(sample, dtype, reps)
        for m in group:
            m.skinny_cfg = cfg
        if cfg is not None:
            notes.append(f"{n}x{k} skinny {cfg}")
        for rows in ROUTE_BUCKETS:
            x = torch.randn(rows, k, device=first.packed.device, dtype=dtype)
            runs = {}
            if rows == 1:
                runs["gemv"] = lambda m, x=x: gemv(x, m.packed, m.scale_offset)
            if first.tiny is not None:
                runs["tinygemm"] = lambda m, x=x: m.tiny(x)
            if first.dense is not None and rows > 1:
                runs["dense"] = lambda m, x=x: F.linear(x, m.dense)
            if cfg is not None and rows > 1:
                runs["skinny"] = lambda m, x=x: skinny(x, m.packed, m.scale_offset, cfg)
            if len(runs) < 2:
                continue
            times = {name: _gpu_us(run, sample, reps) for name, run in runs.items()}
            route[rows] = min(times, key=times.get)
            notes.append(f"{n}x{k} ×{rows}: " + ", ".join(
                f"{name} {t:.1f}" for name, t in sorted(times.items(), key=lambda kv: kv[1])))
        for m in group:
            m.route = route
    return "µs per call, fastest first: " + ("; ".join(notes) or "not timed")


def _choose_skinny(sample: list[CudaInt4Linear], dtype: torch.dtype,
                   reps: int) -> Skinny | None:
    """The fastest of ``SKINNY_CANDIDATES`` that fit K, timed at 8 rows (the kernel pads to 16,
    so its time hardly depends on the rows); None where none fits or the kernel fails."""
    first = sample[0]
    x = torch.randn(8, first.in_features, device=first.packed.device, dtype=dtype)
    times = {}
    for cfg in SKINNY_CANDIDATES:
        if not cfg.fits(first.in_features):
            continue
        try:
            times[cfg] = _gpu_us(lambda m, c=cfg: skinny(x, m.packed, m.scale_offset, c),
                                 sample, reps)
        except Exception as e:  # a Triton that cannot build it: leave it out
            log.warning("skinny %s failed: %s", cfg, e)
    return min(times, key=times.get) if times else None


def cuda_int4_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class CudaInt4Linear(nn.Module):
    """y = x @ W.T (+ b) with W as packed 4-bit codes; built from one ``Int4Groups`` or the
    row blocks of a fused weight (q, k, v / gate, up), in order."""

    def __init__(self, parts: Sequence[Int4Groups], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if any(p.group_size != GROUP for p in parts):
            raise ValueError(f"CudaInt4Linear needs groups of {GROUP}")
        self.in_features = parts[0].codes.shape[1]
        self.out_features = sum(p.codes.shape[0] for p in parts)
        self.register_buffer("packed", torch.cat([pack_codes(p.codes) for p in parts]))
        self.register_buffer("scale_offset", torch.cat(
            [pack_scale_offset(p.scales, p.offsets) for p in parts]))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # prepare_for_cuda's extra copies; plain attributes: never saved or cast
        self.dense: torch.Tensor | None = None
        self.tiny: TinyGemm | None = None
        self.route: dict[int, str] | None = None  # prepare_for_cuda's timed choice
        self.skinny_cfg: Skinny | None = None  # its tile choice for the skinny kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            y = int4_linear(x2.contiguous(), self.packed, self.scale_offset, self.dense,
                            self.tiny, self.route, self.skinny_cfg)
        else:  # CPU (tests, a model not yet moved): the reference dequantisation
            y = F.linear(x2, unpack(self.packed, self.scale_offset).to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{GROUP}"
