"""Weight-only int4 linear layers on CUDA, from exact GGUF 4-bit codes (Q4_0/Q4_1/Q4_K).

Decode at small batch is memory-bound: a bf16 8B model reads 14.8 GB a token, its 4-bit form
~4 GB. ``CudaInt4Linear`` keeps the codes packed two to a byte in GGUF's in-group order and
one (float16 scale, float16 offset) pair per 32 weights, packed into an int32 — so
``model.to(dtype=...)`` leaves them alone and a kernel reads both with one load — or, where
every offset is −8 · scale (Q4_0), the float16 scales alone (int16 bits; ``symmetric``). The
codes are the file's own; the pair is exact for Q4_0 and Q4_1 (float16 in the file) and rounded
to float16 for Q4_K (``d · sc`` needs up to 17 bits). That is the weight's one layout on the
GPU: 4.5 bits a weight for Q4_0 (the file's own size), 5 for Q4_1/Q4_K, no other copy
(``--keep-dense-weights`` adds the old extra copies below).

Which kernel runs depends on the rows of x (``Plan``, timed per weight shape at start by
``cuda_int4_tune.prepare``; kernels in ``cuda_int4_kernels.py``):

* 1-2 rows: ``gemv_words`` (codes read as 128-bit words, ``128 + code`` floats made with one
  shift and one AND-OR a weight), the older ``gemv`` or, for bfloat16 x, ``gemv_wide``
  (``cuda_int4_gemv_wide.py``: x read 8 bytes at a time);
* 1-4 rows: ``gemv_split`` (``cuda_int4_gemv.py``: split-K programs, float products or int8 x
  with dp4a), where timing says it is faster;
* 2-16 rows: ``gemv_rows`` (``cuda_int4_rows.py``: up to 8 rows a program, each weight word
  read once for them, float or int8 x), where timing says it is faster;
* 2-16 rows: ``skinny`` (tensor cores, split-K in one launch; it casts x to float16, so
  activations must stay below 65504);
* 2-16 rows: ``skinny2`` (``cuda_int4_skinny2.py``: tensor cores, codes made operands with
  ~1 instruction a weight, each group's scale applied to its dot's sums), where timing says it
  is faster;
* more rows (prefill, large batches): ``gemm``, a tensor-core GEMM that dequantises each
  weight tile in the kernel, several tile sizes timed per shape; or, where timing says it is
  faster for the largest bucket, the weight dequantised into a temporary for the call + cuBLAS
  (nothing is kept).

Opt-in (``prepare(keep_dense=True)``, ``--keep-dense-weights``): a second copy of the codes in
the layout of PyTorch's int4 matmul ("tinygemm", ``tinygemm.py``) and dense copies where GPU
memory allows, timed against the above as before.

All of them take fixed grids for fixed shapes, so CUDA graphs capture them. Importing this
module needs neither a GPU nor Triton; the kernels are imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends import cuda_splitk as splitk
from pensieve.backends.cuda_int4_gemv import MAX_ROWS as SPLIT_MAX_ROWS
from pensieve.backends.cuda_int4_gemv import Split, gemv_split
from pensieve.backends.cuda_int4_gemv_wide import Wide, gemv_wide
from pensieve.backends.cuda_int4_gemv_wide import fits as wide_fits
from pensieve.backends.cuda_int4_rows import Rows, gemv_rows
from pensieve.backends.cuda_int4_rows import fits as rows_fits
from pensieve.backends.cuda_int4_skinny2 import Skinny2, skinny2
from pensieve.backends.cuda_int4_skinny2 import fits as skinny2_fits
from pensieve.backends.tinygemm import TinyGemm
from pensieve.models.quant_linear import Int4Groups

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
ROUTE_BUCKETS = (1, 2, 4, 8, 16)  # row counts up to which prepare times a small-row kernel
GEMM_BUCKETS = (32, 256, 2048)  # past 16 rows: timed at these (the last for any more rows)
SKINNY_MAX_ROWS = 32  # the skinny kernel pads x to 16 rows (to 32 past 16)


@dataclass(frozen=True)
class Words:
    """One launch of ``gemv_words``: BLOCK_N weight rows a program, BLOCK_G groups a step."""

    block_n: int
    block_g: int
    num_warps: int
    num_stages: int = 2


@dataclass(frozen=True)
class Gemm:
    """One launch of the dequantising ``gemm``: BLOCK_M rows of x × BLOCK_N outputs a program,
    BLOCK_G groups of 32 columns a step (cut to a divisor of the groups)."""

    block_m: int
    block_n: int
    block_g: int
    num_warps: int
    num_stages: int
    group_m: int = 8


WORDS = Words(8, 32, 1)
# the candidates prepare times per weight shape (each distinct one is one Triton compile)
# (threads run along the groups, 16 bytes of each of BLOCK_N rows a thread: a weight with N
# rows has N·16·BLOCK_G bytes in flight a step, so short-N shapes want a wide BLOCK_G)
WORDS_CANDIDATES = (Words(8, 32, 1), Words(4, 32, 1), Words(16, 32, 1), Words(4, 64, 2),
                    Words(8, 64, 2), Words(2, 128, 4), Words(4, 128, 4), Words(8, 128, 4))
GEMM_CANDIDATES = {  # per GEMM_BUCKETS entry, the first the untimed default
    32: (Gemm(32, 64, 2, 4, 3), Gemm(32, 128, 2, 4, 3), Gemm(16, 64, 4, 4, 3)),
    256: (Gemm(64, 128, 2, 4, 3), Gemm(128, 128, 2, 8, 3), Gemm(64, 64, 4, 4, 3)),
    2048: (Gemm(128, 128, 2, 8, 3), Gemm(128, 256, 2, 8, 3), Gemm(128, 128, 4, 8, 3)),
}


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
    # untimed on a GPU so far: narrower tiles (twice the programs) and deeper pipelines
    Skinny(32, 4, 8, 4, 3), Skinny(32, 4, 4, 4, 4), Skinny(64, 4, 4, 4, 4),
)
SKINNY_SWEEP = tuple(
    Skinny(bn, bg, sk, nw, ns) for bn in (64, 128) for bg in (2, 4, 8) for sk in (1, 2, 4, 8)
    for nw in (4, 8) for ns in (3, 4))


def skinny_workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials (float32 [8, 16, N]) and per-tile counters (int32, zero between
    calls: the kernel resets them) for weights with N outputs; one pair per (device, N),
    shared by the layers of that shape (their launches are serial on one stream). Made before
    graph capture (``prepare_for_cuda``) so that graphs keep using the same memory."""
    return splitk.workspace("int4_skinny", device, n, 8 * 16 * n, 16)


def skinny(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, cfg: Skinny) -> torch.Tensor:
    """x [M ≤ 32, K] @ w.T by the tensor-core ``skinny`` kernel: rows padded to 16, or to 32
    past 16 (then at most 4 K-splits: the split-K workspace holds 128 rows of partials)."""
    m, k = x.shape
    n = packed.shape[0]
    if m > SKINNY_MAX_ROWS or not cfg.fits(k) or cfg.split_k > 8:
        raise ValueError(f"skinny: {m} rows, K={k} with {cfg}")
    block_m = 16 if m <= 16 else 32
    split = min(cfg.split_k, 128 // block_m)  # a power of two: still divides K's groups
    if cfg.block_n < 16:
        raise ValueError("skinny: BLOCK_N of at least 16 (the MMA and the counters)")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    ws, cnt = skinny_workspace(x.device, n)
    grid = (triton_cdiv(n, cfg.block_n), split)
    _kernels().skinny[grid](x, packed, so, y, ws, cnt, m, n, k, k // GROUP, x.stride(0),
                            y.stride(0), packed.stride(0), BLOCK_N=cfg.block_n, BLOCK_G=cfg.block_g,
                            SPLIT_K=split, SYM=symmetric(so), BLOCK_M=block_m,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """float scales [N, K/32] → int16 [N, K/32], their float16 bits (the symmetric form:
    every offset is −8 · scale)."""
    return scales.to(torch.float16).contiguous().view(torch.int16)


def symmetric(scale_offset: torch.Tensor) -> bool:
    """Whether a weight's ``scale_offset`` holds scales alone (int16; offsets −8 · scale)."""
    return scale_offset.dtype == torch.int16


def is_symmetric(scales: torch.Tensor, offsets: torch.Tensor) -> bool:
    """Every offset is −8 · scale once both are float16 (Q4_0), so the scales suffice."""
    s = scales.to(torch.float16).float()
    return bool(torch.equal(offsets.to(torch.float16).float(), -8.0 * s))


def scales_offsets(scale_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (scales, offsets) [N, K/32] of either form."""
    if symmetric(scale_offset):
        s = scale_offset.view(torch.float16).float()
        return s, -8.0 * s
    pair = scale_offset.unsqueeze(-1).view(torch.float16).float()  # [N, G, 2]
    return pair[..., 0], pair[..., 1]


def unpack(packed: torch.Tensor, scale_offset: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that packed codes stand for (reference and fallback)."""
    n, half = packed.shape
    b = packed.view(n, half // 16, 1, 16)
    codes = torch.cat([b & 15, b >> 4], dim=2).reshape(n, half // 16, GROUP).float()
    s, o = scales_offsets(scale_offset)
    return (codes * s[..., None] + o[..., None]).reshape(n, half * 2)


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_int4_kernels

    return cuda_int4_kernels


def block_g(groups: int, want: int) -> int:
    """The largest power of two ≤ want that divides the number of groups."""
    g = want
    while groups % g:
        g //= 2
    return g


def gemv(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, t: Tiles = GEMV,
         prefetch: bool = False) -> torch.Tensor:
    """x [M, K] @ w.T by the older ``gemv``; ``prefetch``: the next step's codes loaded
    before this step's products (route ``gemv_pf``)."""
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (m, triton_cdiv(n, t.block_n))
    _kernels().gemv[grid](x, packed, so, y, n, k, k // GROUP, x.stride(0), y.stride(0),
                          BLOCK_N=t.block_n, BLOCK_G=block_g(k // GROUP, t.block_g),
                          SYM=symmetric(so), PREFETCH=prefetch, num_warps=t.num_warps,
                          num_stages=t.num_stages)
    return y


def matmul(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, t: Tiles) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton_cdiv(n, t.block_n), triton_cdiv(m, t.block_m))
    _kernels().matmul[grid](x, packed, so, y, m, n, k, k // GROUP, x.stride(0), y.stride(0),
                            BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                            BLOCK_G=block_g(k // GROUP, t.block_g), SYM=symmetric(so),
                            num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def dequantize(packed: torch.Tensor, so: torch.Tensor, dtype: torch.dtype,
               t: Tiles = DEQUANT) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, device=packed.device, dtype=dtype)
    bg = block_g(k // GROUP, t.block_g)
    grid = (triton_cdiv(n, t.block_n), k // GROUP // bg)
    _kernels().dequantize[grid](packed, so, out, n, k, k // GROUP, BLOCK_N=t.block_n, BLOCK_G=bg,
                                SYM=symmetric(so), num_warps=t.num_warps, num_stages=t.num_stages)
    return out


def gemv_words(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor,
               t: Words = WORDS) -> torch.Tensor:
    """x [M, K] @ w.T by ``gemv_words`` (meant for 1-2 rows: each row reads the weight)."""
    m, k = x.shape
    n = packed.shape[0]
    groups = k // GROUP
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton_cdiv(n, t.block_n), m)
    _kernels().gemv_words[grid](x, packed.view(torch.int32), so, y, n, groups, x.stride(0),
                                y.stride(0), k // 8, BLOCK_N=t.block_n, BLOCK_G=t.block_g,
                                EVEN=groups % t.block_g == 0, SYM=symmetric(so),
                                num_warps=t.num_warps,
                                num_stages=t.num_stages)
    return y


def gemm(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, t: Gemm) -> torch.Tensor:
    """x [M, K] @ w.T by the dequantising tensor-core ``gemm``."""
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton_cdiv(m, t.block_m) * triton_cdiv(n, t.block_n),)
    _kernels().gemm[grid](x, packed, so, y, m, n, k // GROUP, x.stride(0), y.stride(0), k // 2,
                          BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                          BLOCK_G=block_g(k // GROUP, t.block_g), GROUP_M=t.group_m,
                          SYM=symmetric(so),
                          num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Plan:
    """Which kernel runs a weight for each row bucket (``ROUTE_BUCKETS`` then ``GEMM_BUCKETS``:
    the first bucket ≥ the rows; past the last, the last), with its tiles. Kernels: ``words``,
    ``gemv``, ``gemv_pf``, ``wide``, ``split``, ``rows``, ``skinny``, ``skinny2``, ``tinygemm``,
    ``dense``, ``gemm``, ``dequant``."""

    route: dict[int, str]
    words: Words = WORDS
    skinny: Skinny | None = None
    gemm: dict[int, Gemm] = field(default_factory=dict)
    split: Split | None = None
    wide: Wide | None = None
    rows: dict[int, Rows] = field(default_factory=dict)  # per ROUTE_BUCKETS entry, 2-16 rows
    skinny2: dict[int, Skinny2] = field(default_factory=dict)  # per ROUTE_BUCKETS entry, 2-16

    def kernel(self, rows: int) -> tuple[str, int]:
        bucket = next((b for b in ROUTE_BUCKETS + GEMM_BUCKETS if rows <= b), GEMM_BUCKETS[-1])
        return self.route.get(bucket, "gemm"), bucket


def default_plan(k: int, dense: torch.Tensor | None = None,
                 tiny: TinyGemm | None = None) -> Plan:
    """The plan before ``cuda_int4_tune.prepare`` has timed any: gemv_words for 1-2 rows, the
    first skinny candidate that fits K (else gemm) to 16, gemm beyond."""
    cfg = next((c for c in SKINNY_CANDIDATES if c.fits(k)), None)
    few = "skinny" if cfg is not None else "gemm"
    route = {1: "words", 2: "words", 4: few, 8: few, 16: few}
    if tiny is not None:
        route.update({2: "tinygemm", 4: "tinygemm"})
    route.update({b: "dense" if dense is not None else "gemm" for b in GEMM_BUCKETS})
    return Plan(route, WORDS, cfg, {b: c[0] for b, c in GEMM_CANDIDATES.items()})


def int4_linear(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor,
                dense: torch.Tensor | None = None, tiny: TinyGemm | None = None,
                plan: Plan | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, contiguous rows) @ w.T by the kernel ``plan`` names for M's
    bucket (a kernel whose copy or tiles are missing falls back to ``gemm``)."""
    m, k = x.shape
    plan = plan or default_plan(k, dense, tiny)
    kind, bucket = plan.kernel(m)
    if kind == "words":
        return gemv_words(x, packed, so, plan.words)
    if kind in ("gemv", "gemv_pf"):
        return gemv(x, packed, so, prefetch=kind == "gemv_pf")
    if kind == "wide" and plan.wide is not None and wide_fits(x, k):
        return gemv_wide(x, packed, so, plan.wide)
    if kind == "wide" and m <= 2:  # its tiles missing or x not bfloat16
        return gemv_words(x, packed, so, plan.words)
    if kind == "split" and plan.split is not None and m <= SPLIT_MAX_ROWS:
        return gemv_split(x, packed, so, plan.split)
    if kind == "split" and m <= 2:  # its tiles missing (a plan from elsewhere)
        return gemv_words(x, packed, so, plan.words)
    tiles = plan.rows.get(bucket)
    if kind == "rows" and tiles is not None and rows_fits(tiles, m, packed.shape[0]):
        return gemv_rows(x, packed, so, tiles)
    tiles2 = plan.skinny2.get(bucket)
    if kind == "skinny2" and tiles2 is not None and skinny2_fits(tiles2, m, k):
        return skinny2(x, packed, so, tiles2)
    if kind in ("skinny", "skinny2") and plan.skinny is not None and m <= SKINNY_MAX_ROWS:
        return skinny(x, packed, so, plan.skinny)
    if kind == "tinygemm" and tiny is not None:
        return tiny(x)
    if kind == "dense" and dense is not None:
        return F.linear(x, dense)
    if kind == "dequant":
        return F.linear(x, dequantize(packed, so, x.dtype))
    cfg = plan.gemm.get(bucket) or GEMM_CANDIDATES[GEMM_BUCKETS[-1]][0]
    return gemm(x, packed, so, cfg)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] back from ``pack_codes``' layout."""
    n, half = packed.shape
    b = packed.view(n, half // 16, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(n, half * 2)


def _packed_codes(p: Int4Groups) -> torch.Tensor:
    """``pack_codes(p.codes)``: a GGUF tensor's nibbles (``Int4Groups.from_nibbles``) are that
    layout already, so they are taken as they are — no unpacking to a byte a code and back."""
    return p.packed_codes.contiguous() if p.packed_codes is not None else pack_codes(p.codes)


def _scales_offsets(p: Int4Groups) -> tuple[torch.Tensor, torch.Tensor]:
    """The float scales and offsets the layout rounds to float16: a GGUF tensor's own float16
    ones where it has them (Q4_K's are its exact products rounded once: the same values;
    ``Q4KGroups`` derives them on each call, so this asks once)."""
    return p.half_params() if p.packed_codes is not None else (p.scales, p.offsets)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def prepare_for_cuda(model: nn.Module, dtype: torch.dtype, keep_dense: bool = False) -> None:
    """After the model is on the GPU: time each weight shape's kernels and tiles and route
    every ``CudaInt4Linear`` (``cuda_int4_tune.prepare``); ``keep_dense``: also the tinygemm
    and dense copies of before."""
    from pensieve.backends.cuda_int4_tune import prepare

    prepare(model, dtype, keep_dense=keep_dense)


def cuda_int4_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class CodesLinear(nn.Module):
    """What the CUDA code layers share: ``y = x @ W.T (+ b)`` over ``[..., in_features]``, on
    CUDA through the layer's kernels (``_cuda``), elsewhere (tests, a model not yet moved)
    through its reference ``dequantize``."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] (reference; the CPU forward)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:  # e.g. the head on a step where no chunk completes: no launch
            y = x2.new_empty(0, self.out_features)
        elif x2.is_cuda:
            y = self._cuda(x2.contiguous())
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class CudaInt4Linear(CodesLinear):
    """y = x @ W.T (+ b) with W as packed 4-bit codes; built from one ``Int4Groups`` or the
    row blocks of a fused weight (q, k, v / gate, up), in order."""

    def __init__(self, parts: Sequence[Int4Groups], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if any(p.group_size != GROUP for p in parts):
            raise ValueError(f"CudaInt4Linear needs groups of {GROUP}")
        self.in_features = parts[0].codes.shape[1]
        self.out_features = sum(p.codes.shape[0] for p in parts)
        self.register_buffer("packed", _cat([_packed_codes(p) for p in parts]))
        # Q4_0 (every offset −8 · scale): the scales alone, as in the file; else the pairs
        pairs = [_scales_offsets(p) for p in parts]
        sym = all(is_symmetric(s, o) for s, o in pairs)
        self.register_buffer("scale_offset", _cat(
            [pack_scales(s) if sym else pack_scale_offset(s, o) for s, o in pairs]))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # prepare_for_cuda's timed plan and (opt-in) extra copies; plain attributes: never
        # saved or cast
        self.plan: Plan | None = None
        self.dense: torch.Tensor | None = None
        self.tiny: TinyGemm | None = None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows ``ids`` of the weight, dequantised alone (an embedding lookup)."""
        return unpack(self.packed[ids], self.scale_offset[ids])

    def dequantize(self) -> torch.Tensor:
        return unpack(self.packed, self.scale_offset)

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        if self.plan is None:  # not prepared (a family without the fused CUDA layers)
            self.plan = default_plan(self.in_features, self.dense, self.tiny)
        return int4_linear(x2, self.packed, self.scale_offset, self.dense, self.tiny, self.plan)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{GROUP}"
