"""The mixture-of-experts MLP on CUDA over expert weights kept as their GGUF codes.

A GGUF's ``ffn_{gate,up,down}_exps`` are 3-D quantised tensors [E, rows, K]; the loader's exact
code forms (``loaders/int4_codes.py``) of their 2-D view [E·rows, K] are held here stacked, in
the dense CUDA layers' two layouts (``cuda_int4``: two 4-bit codes a byte + a float16
scale/offset pair per 32 for Q4_0/Q4_1, 160 bytes a 256; ``cuda_int8``: int8 codes + float16
scales per 16/32 + offsets per 32 for Q8_0/Q5_x/IQ4_x) or, for Q6_K, six bits a code
(``cuda_q6k``'s layout: ``pack_six``'s low four bits in the int4 layout and high two four a
byte, the file's int8 sub-scales and float16 ``d`` per 256: 210 bytes a 256 as in the file, not
int8's 288). Q4_K keeps the file's own factors (``q4k``, the kernels' ``Q4K``): the codes in
the int4 layout and a 16-byte word quad a super-block (``int4_codes.q4_k_super_words``):
the float16 ``d``/``dmin`` as one int32, then the file's 12 bytes of packed 6-bit sub-scales
and sub-mins verbatim — 144 bytes a 256, the file's (the int4 layout's 160), and
``float32(d)·sc·q − float32(dmin)·m`` in float32 is the file's dequantised value exactly (the
int4 layout rounds ``d·sc`` to float16). ``PENSIEVE_MOE_Q4K_SUPER=0`` holds Q4_K in the int4
layout instead.
``CudaMoEExperts`` replaces a model's
``models.moe.Experts`` (same call: x, routing weights, expert ids) and runs a layer's routed
experts in two launches — gate/up fused (with SiLU·up in the epilogue) where gate and up share a
format, then down (each pick's routing weight in the epilogue) — and a sum of each token's picks:

* up to ``GEMV_MAX_PICKS`` picks (tokens × top-k: decode batches up to 32 tokens at top-8):
  ``pick_gemv``, one program per (pick, outputs), no sorting (a GEMV over the pick's expert);
  with ``PENSIEVE_MOE_EXPERT_GEMV=1|auto`` at 2-16 tokens, ``cuda_moe_expert``'s expert-major
  GEMV instead (each picked expert's weights once for all its tokens; opt-in: slower on the H100);
  ``route="rows"`` (``cuda_moe_rows``, a ``cuda_moe_tune`` candidate at 2-16 tokens): the pick
  GEMV's CUDA-core loop expert-major, an expert's weights once a pass of R of its tokens;
* more: the picks sorted by expert on the device (``align``: one Triton program up to
  ``ALIGN_MAX_PICKS``, else a few torch ops), each expert's run padded to blocks of BLOCK_M, and
  ``grouped_gemm``: one program per (block, outputs), the expert's weight tile dequantised in
  registers, on the tensor cores. The grid is sized for the worst case (``max_blocks``) and
  blocks past the last exit at once. Swap-AB tiles (``Tiles.swap``: the weight tile the MMA's
  left operand, for 1-2 tokens an expert) are ``cuda_moe_tune`` candidates only.

gpt-oss's experts (``models.gpt_oss.ClampedSwiGLUExperts``) run on the same launches: a bias
per expert row on gate/up and on down (added in the epilogues, before the activation and before
the routing weight) and the clamped SwiGLU (``glu`` = (alpha, limit)) in place of SiLU·up; its
MXFP4 experts are held as the file's bytes (``fp4``: two E2M1 codes a byte in GGML's order + the
E8M0 byte per 32, 17 bytes a 32 = 4.25 bits a weight; the kernels' ``FP4`` layout) — the
loader's ``mxfp4.Mxfp4Groups`` as they come, int8 codes (``loaders/mxfp4.int8_codes``) converted
back exactly once when the module is built; with ``PENSIEVE_MXFP4_INT8=1`` the loader keeps int8
codes with a float16 power of two per 32 and they stay so (~1.06 bytes a weight). All four
routes take every layout (the expert-major GEMV's ``fp4`` since ``cuda_moe_tune``).

Which of them runs is the start's choice per decode bucket where it was timed
(``cuda_moe_tune.prepare``: a layer shape's ``plan``, {tokens up to: (route, tiles)}, each
candidate checked against the reference and timed over random routings; the pick GEMV's tiles
a ``GemvTiles`` pair, one for each launch: the fused gate/up's K = hidden and the down
projection's K = inner are raced apart); past the plan's last bucket, without a plan, or with
``PENSIEVE_MOE_ROUTE=static``, the constant rule above.

Nothing syncs with the host and every launch's grid is fixed by the number of picks, so the
decode CUDA graphs capture the layer (``cuda_moe_swap.swap_in_experts`` puts it in a model and
turns on ``FastPaths.cuda_graphs`` where the family's paged kernels allow; the hybrid decode
graphs capture it too). Off CUDA the module dequantises (the reference). Importing this module
needs neither a GPU nor Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends import cuda_moe_expert, cuda_moe_rows
from pensieve.backends.cuda_int4 import pack_codes, pack_scale_offset, triton_cdiv, unpack
from pensieve.backends.cuda_int8 import block_key
from pensieve.backends.cuda_q6k import dequantize as q6k_dequantize
from pensieve.backends.cuda_q6k import six_of
from pensieve.backends.cuda_q6k import takes as q6k_takes
from pensieve.loaders.int4_codes import Int8Groups, q4_k_super_words, q4_k_word_factors
from pensieve.loaders.mxfp4 import INT8_ENV, Mxfp4Groups, packed_wanted
from pensieve.models.quant_linear import Int4Groups


Codes = Int4Groups | Int8Groups | Mxfp4Groups
Glu = tuple[float, float] | None  # gpt-oss's clamped SwiGLU (alpha, limit); None: SiLU·up
# up to here pick_gemv (32 tokens × top-8; on an H100 at 30B-A3B's shapes it beat the sorted
# grouped GEMM 2.0x at 8 tokens and 1.2x at 32, though it reads a shared expert once a pick);
# beyond, sorted + grouped (bench/gpu_moe_kernels.py, BENCHMARKS.md)
GEMV_MAX_PICKS = 256
ALIGN_MAX_PICKS = 512  # one-program sort up to here; beyond, torch ops (still on the device)
MXFP4_INT8_ENV = INT8_ENV  # "1": MXFP4 experts as int8 codes (the old layout, 2x the file)
mxfp4_packed = packed_wanted  # whether MXFP4 experts are held packed (4.25 bits a weight)
Q4K_SUPER_ENV = "PENSIEVE_MOE_Q4K_SUPER"  # "0": Q4_K experts in the int4 layout (160 B a 256)


def q4k_super(environ: dict[str, str] | None = None) -> bool:
    """Whether Q4_K experts are held with the file's own factors (``q4k``: 144 bytes a 256)."""
    return (os.environ if environ is None else environ).get(Q4K_SUPER_ENV, "1").strip() != "0"


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap: bool = False  # grouped GEMM only: swap-AB products (the weight tile as the left operand)
    pair: bool = False  # pick GEMV only: an output's gate and up rows in one K loop


# pick_gemv's tiles: BLOCK_N · BLOCK_K / 32 = 128 (row, group) pairs, a thread each at 4 warps
# (its group's codes one 16-byte load); BLOCK_K / 8 < 32 · warps keeps x's words in the
# codes' layout (a larger step exchanges them through shared memory each step)
GEMV_FEW = Tiles(1, 8, 512, 4, 2)  # up to 16 picks (H100 sweep: 1 token 0.032 vs 0.039 ms)
GEMV = Tiles(1, 16, 256, 4, 2)  # more picks (8 tokens: 0.149 vs 0.171 ms; 32: 0.534 vs 0.611)
# packed MXFP4 (half the bytes a step of the same BLOCK_K): the int8 tiles until timed on a GPU
# (bench/gpu_moe_mxfp4.py --sweep prints the best per token count)
GEMV_FEW_FP4 = GEMV_FEW
GEMV_FP4 = GEMV


@dataclass(frozen=True)
class GemvTiles:
    """The pick GEMV's tiles for each of a layer's two launches: the fused gate/up (``pair``
    allowed) and the routed down. Their shapes differ (30B-A3B: K 2048 to 768 outputs, K 768
    to 2048 outputs), so ``cuda_moe_tune`` races a tile for each."""

    gate_up: Tiles
    down: Tiles


GROUPED_SMALL = Tiles(16, 64, 64, 4, 3)  # few picks per expert (decode batches)
GROUPED = Tiles(64, 64, 64, 4, 3)  # prefill
GROUPED_SMALL_MAX_PICKS = 2048
ROUTES = ("gemv", "experts", "grouped", "rows")


@dataclass(frozen=True)
class Stack:
    """One projection of every expert: ``w`` [E·N, K/2] uint8 (int4, and the low 4 bits of
    ``six``) or [E·N, K] int8, ``s`` int32 scale/offset pairs [E·N, K/32] (int4), int8
    sub-scales [E·N, K/16] (``six``) or int16 float16 bits [E·N, K/group], ``mn`` int16 offsets
    [E·N, K/32] (int8 with offsets) or the high-2-bit bytes [E·N, K/4] (``six``) or None,
    ``d`` the float16 bits of ``six``'s super-scales [E·N, K/256]; ``n`` rows per expert;
    ``b`` a bias per row [E·N] (gpt-oss) or None. ``fp4`` (MXFP4): ``w`` [E·N, K/2] uint8, two
    E2M1 codes a byte in the int4 order, ``s`` the E8M0 bytes [E·N, K/32]. ``q4k`` (Q4_K):
    ``w`` as int4's, ``s`` int32 [E·N, K/256 · 4], a word quad a super-block (float16 ``d``
    low half and ``dmin`` high half of word 0, the file's 12 scale bytes in words 1-3:
    ``int4_codes.q4_k_super_words``), ``d`` None."""

    w: torch.Tensor
    s: torch.Tensor
    mn: torch.Tensor | None
    int4: bool
    group: int
    n: int
    k: int
    six: bool = False
    d: torch.Tensor | None = None
    b: torch.Tensor | None = None
    fp4: bool = False
    q4k: bool = False


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_moe_kernels

    return cuda_moe_kernels


def fmt(codes: Codes) -> tuple[str, int, bool] | None:
    """The kernels' format of a projection's codes: ("int4", 32, True), ("q4k", 32, False) for
    Q4_K with the file's factors (unless ``q4k_super()`` is off), ("six", 16, False) for Q6_K,
    ("fp4", 32, False) for MXFP4 (unless ``mxfp4_packed()`` is off), ("int8", group, has
    offsets), or None where they take it not (it is then dequantised)."""
    if isinstance(codes, Int4Groups):
        ok = codes.group_size == 32 and codes.shape[1] % 32 == 0
        if ok and codes.k_scales is not None and q4k_super():
            return ("q4k", 32, False)  # (k_scales: rows of whole super-blocks)
        return ("int4", 32, True) if ok else None
    if isinstance(codes, Mxfp4Groups):  # kept packed by the loader (its choice stands)
        return ("fp4", 32, False) if codes.shape[1] % 32 == 0 else None
    key = block_key(codes)
    if key is None:
        return None
    if q6k_takes(codes):  # codes −32..31: six bits, the file's own scale factors
        return ("six", 16, False)
    if is_mxfp4(codes) and mxfp4_packed():
        return ("fp4", 32, False)
    return ("int8", key[0], key[1])


def gate_up_format(gate: Codes, up: Codes) -> tuple[str, int, bool] | None:
    """The one format gate and up are held in (they fuse), or None: Q4_K beside another
    4-bit type both in the int4 layout."""
    fg, fu = fmt(gate), fmt(up)
    if fg != fu and {fg, fu} == {("int4", 32, True), ("q4k", 32, False)}:
        return ("int4", 32, True)
    return fg if fg == fu and gate.shape == up.shape else None


def is_mxfp4(codes: Codes) -> bool:
    """MXFP4 kept as int8 codes (``loaders/mxfp4.int8_codes``: doubled E2M1 × 2^(e − 128))."""
    return (isinstance(codes, Int8Groups) and codes.ggml_type == "MXFP4"
            and codes.group_size == 32 and codes.offsets is None and codes.shape[1] % 32 == 0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.int16)


Tensors4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def stack_tensors(codes: Codes, kind: tuple[str, int, bool] | None = None) -> Tensors4:
    """(w, s, mn, d) of ``Stack`` for codes of a 2-D view [E·N, K] (in ``kind``; default
    ``fmt``'s)."""
    kind = kind or fmt(codes)
    if isinstance(codes, Mxfp4Groups):  # the file's bytes already
        return codes.packed.contiguous(), codes.exponents.contiguous(), None, None
    if kind == ("fp4", 32, False):  # int8 codes back to the file's bytes, exactly
        from pensieve.loaders.mxfp4 import packed_from_int8

        packed, exps = packed_from_int8(codes.codes, codes.scales)
        return packed, exps, None, None
    if kind == ("six", 16, False):
        lo, hi = six_of(codes)  # (Q6_K as loaded: from the file's bytes)
        sc, d = codes.k_scales
        return lo, sc.contiguous(), hi, _bits(d)
    if kind == ("q4k", 32, False):  # the int4 layout's codes, the file's factors as they are
        words = q4_k_super_words(codes)
        nib = codes.packed_codes  # (not ``nibbles``: its float16 products are not needed)
        nib = nib if nib is not None else pack_codes(codes.codes)
        return nib.contiguous(), words, None, None
    if isinstance(codes, Int4Groups):
        if codes.packed_codes is not None:  # GGUF's own order already: no unpacking
            nib, scales, offsets = codes.nibbles
            return nib.contiguous(), pack_scale_offset(scales, offsets), None, None
        return pack_codes(codes.codes), pack_scale_offset(codes.scales, codes.offsets), None, None
    mn = None if codes.offsets is None else _bits(codes.offsets)
    return codes.codes.to(torch.int8).contiguous(), _bits(codes.scales), mn, None


def _per_expert_cat(a: torch.Tensor, b: torch.Tensor, experts: int) -> torch.Tensor:
    """Rows of expert e of a, then of b, for each e: [E·(Na+Nb), cols]."""
    return torch.cat([a.view(experts, -1, a.shape[1]), b.view(experts, -1, b.shape[1])],
                     dim=1).reshape(-1, a.shape[1])


def _dequantize(st: Stack, experts: int) -> torch.Tensor:
    """The float32 weights [E, N, K] a stack stands for."""
    if st.fp4:
        from pensieve.loaders.mxfp4 import packed_dequantize

        w = packed_dequantize(st.w, st.s)
    elif st.q4k:
        w = _q4k_dequantize(st)
    elif st.int4:
        w = unpack(st.w, st.s)
    elif st.six:
        w = q6k_dequantize(st.w, st.mn, st.s, st.d)
    else:
        rows = st.w.shape[0]
        w = st.w.float().view(rows, -1, st.group) * st.s.view(torch.float16).float()[..., None]
        w = w.view(rows, -1)
        if st.mn is not None:
            w = (w.view(rows, -1, 32) + st.mn.view(torch.float16).float()[..., None]).view(rows, -1)
    return w.view(experts, st.n, st.k)


def _q4k_dequantize(st: Stack) -> torch.Tensor:
    """float32 [rows, K] of a ``q4k`` stack: q·(d·sc) − dmin·m, the file's values exactly (the
    products are exact in float32; one rounding, as ``loaders.quants``' own), the factors
    read from the word quads as the kernels read them (``int4_codes.q4_k_word_factors``)."""
    rows = st.w.shape[0]
    b = st.w.view(rows, -1, 16)
    q = torch.cat((b & 15, b >> 4), dim=2).float()  # [rows, K/32, 32]
    d, dmin, sc, m = q4_k_word_factors(st.s)
    scale = d.repeat_interleave(8, dim=1) * sc.float()
    offset = dmin.repeat_interleave(8, dim=1) * m.float()
    return (q * scale[..., None] - offset[..., None]).view(rows, -1)


def _block_k(k: int, want: int) -> int:
    b = want
    while b > 32 and k % b:
        b //= 2
    return b


def _meta(st: Stack, glu: Glu = None) -> tuple[tuple, dict]:
    alpha, limit = glu or (0.0, 0.0)
    return ((st.w.view(torch.uint8), st.s, st.s if st.mn is None else st.mn,
             st.s if st.d is None else st.d, st.s if st.b is None else st.b),
            {"INT4": st.int4, "SIX": st.six, "GS": st.group,
             "HAS_MIN": st.mn is not None and not st.six, "HAS_BIAS": st.b is not None,
             "SWIGLU": glu is not None, "ALPHA": float(alpha), "LIMIT": float(limit),
             **({"FP4": True} if st.fp4 else {}), **({"Q4K": True} if st.q4k else {})})


def _gemv_block_k(st: Stack, want: int) -> int:
    """``pick_gemv``'s step along K: K's power of two where K ≤ ``want`` (the row whole in one
    masked step: 30B-A3B's down, 768, in one 1024); else the largest power of two ≤ ``want``
    dividing K, except that int8 and fp4 rows whose K only 32 or 64 divides (gpt-oss's 2880:
    45 steps of 64) take ``want`` whole, the last step masked (those paths read groups past K
    as zeros always; the 4-bit ones where ``_gemv_masked``)."""
    if st.k <= want:
        return _pow2(st.k)
    b = _block_k(st.k, want)
    return want if b < min(want, 128) and not (st.int4 or st.six or st.q4k) else b


def _gemv_masked(st: Stack, block_k: int) -> bool:
    """Whether a 4-bit layout's (INT4, Q4K, SIX) GEMV steps need masking past K (``MASK_K``:
    a step that does not divide K); int8 and FP4 steps are masked always."""
    return (st.int4 or st.six or st.q4k) and st.k % block_k != 0


def gemv_tiles(picks: int, fp4: bool = False) -> Tiles:
    """``pick_gemv``'s tiles at ``picks`` (int8/int4/six or packed MXFP4 weights)."""
    if fp4:
        return GEMV_FEW_FP4 if picks <= 16 else GEMV_FP4
    return GEMV_FEW if picks <= 16 else GEMV


def gemv_pair(tiles: Tiles | GemvTiles | None, picks: int, gate_up: Stack,
              down: Stack) -> GemvTiles:
    """The pick GEMV's tiles for each launch: a plan's pair as it is, one ``Tiles`` for both
    (sweeps, tests), or None: the constant rule for each stack (``gemv_tiles``)."""
    if isinstance(tiles, GemvTiles):
        return tiles
    if tiles is not None:
        return GemvTiles(tiles, tiles)
    return GemvTiles(gemv_tiles(picks, gate_up.fp4), gemv_tiles(picks, down.fp4))


# ("gemv", the pick GEMV's tiles a launch; None: the picks' defaults), ("grouped", tiles or
# None) or ("experts", tiles or None)
Route = tuple[str, Tiles | GemvTiles | None]
Plan = dict[int, Route]  # tokens up to which (a decode bucket) → the route timed fastest there


def plan_route(plan: Plan | None, tokens: int) -> Route | None:
    """The route ``plan`` gives ``tokens`` rows: its smallest bucket ≥ ``tokens``; None (the
    constant rule) past its last bucket or without a plan."""
    if not plan:
        return None
    fits = [b for b in plan if b >= tokens]
    return plan[min(fits)] if fits else None


def pick_gemv(x: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, st: Stack, y: torch.Tensor,
              *, topk: int, gather: bool, fuse: bool, routed: bool, t: Tiles | None = None,
              glu: Glu = None) -> torch.Tensor:
    """y [P, N_out] (see ``cuda_moe_kernels.pick_gemv``)."""
    t = t or GEMV
    p = ids.numel()
    bk = _gemv_block_k(st, t.block_k)
    if (x.data_ptr() | x.stride(0) * x.element_size()) % 8 or x.stride(1) != 1:
        x = x.clone(memory_format=torch.contiguous_format)  # its rows are read as int64 words
    n_out = st.n // 2 if fuse else st.n
    args, meta = _meta(st, glu if fuse else None)
    _kernels().pick_gemv[(p, triton_cdiv(n_out, t.block_n))](
        x, ids, rw, *args, y, st.n, st.k, x.stride(0), y.stride(0), TOPK=topk, GATHER=gather,
        FUSE=fuse, ROUTED=routed, **meta, BLOCK_N=t.block_n, BLOCK_K=bk, PAIR=t.pair,
        **({"MASK_K": True} if _gemv_masked(st, bk) else {}),
        num_warps=t.num_warps, num_stages=t.num_stages)
    return y


def max_blocks(picks: int, experts: int, block_m: int) -> int:
    """The most blocks P picks over E experts can fill, each expert's run padded to block_m:
    Σ ceil(c_e / m) ≤ P/m + (experts hit) ≤ cdiv(P, m) + min(E, P)."""
    return triton_cdiv(picks, block_m) + min(experts, picks)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def align(ids: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat expert ids [P] → (sorted picks [max_blocks·block_m] int32, padded with P; each
    block's expert [max_blocks] int32, E past the last), on the device, no host sync."""
    p = ids.numel()
    nb = max_blocks(p, experts, block_m)
    if p <= ALIGN_MAX_PICKS:
        mb = max(16, _pow2(nb))
        sorted_ids = torch.empty(mb * block_m, device=ids.device, dtype=torch.int32)
        bexp = torch.empty(nb, device=ids.device, dtype=torch.int32)
        pb = max(16, _pow2(p))
        _kernels().align[(1,)](ids, sorted_ids, bexp, p, experts, nb, BLOCK_M=block_m, PB=pb,
                               EB=max(16, _pow2(experts)), MB=mb, CH=min(pb, 32),
                               num_warps=8)
        return sorted_ids, bexp
    return align_torch(ids, experts, block_m)


def align_torch(ids: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``align`` by torch ops (any number of picks; no host sync: no bincount, no nonzero)."""
    p, dev = ids.numel(), ids.device
    nb = max_blocks(p, experts, block_m)
    flat = ids.reshape(-1).long()
    counts = torch.zeros(experts, device=dev, dtype=torch.long).scatter_add_(
        0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    ends = blocks.cumsum(0)
    order = torch.sort(flat, stable=True)[1]
    sorted_e = flat[order]
    rank = torch.arange(p, device=dev) - (counts.cumsum(0) - counts)[sorted_e]
    dest = (ends - blocks)[sorted_e] * block_m + rank
    sorted_ids = torch.full((nb * block_m,), p, device=dev, dtype=torch.int32)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    bexp = torch.searchsorted(ends, torch.arange(nb, device=dev), right=True).to(torch.int32)
    return sorted_ids, bexp


def grouped(x: torch.Tensor, sorted_ids: torch.Tensor, bexp: torch.Tensor, rw: torch.Tensor,
            st: Stack, y: torch.Tensor, *, picks: int, experts: int, topk: int, gather: bool,
            fuse: bool, routed: bool, t: Tiles, glu: Glu = None) -> torch.Tensor:
    """y [P, N_out] over the sorted picks (see ``cuda_moe_kernels.grouped_gemm``)."""
    n_out = st.n // 2 if fuse else st.n
    args, meta = _meta(st, glu if fuse else None)
    _kernels().grouped_gemm[(bexp.numel(), triton_cdiv(n_out, t.block_n))](
        x, sorted_ids, bexp, rw, *args, y, picks, experts, st.n, st.k, x.stride(0), y.stride(0),
        TOPK=topk, GATHER=gather, FUSE=fuse, ROUTED=routed, **meta, BLOCK_M=t.block_m,
        BLOCK_N=t.block_n, BLOCK_K=_block_k(st.k, t.block_k), num_warps=t.num_warps,
        num_stages=t.num_stages, **({"SWAP": True} if t.swap else {}))
    return y


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: Stack,
                down: Stack, experts: int, route: str | None = None, glu: Glu = None,
                tiles: Tiles | GemvTiles | None = None, summed: bool = True) -> torch.Tensor:
    """x [T, H], routing weights/ids [T, k] → Σ_picks weight · down(silu(gate)·up), [T, H], on
    the kernels (any device Triton runs on); with the stacks' biases and ``glu`` gpt-oss's
    Σ weight · (down(swiglu(gate + bg, up + bu)) + bd). ``route``: "gemv", "experts"
    (``cuda_moe_expert``), "rows" (``cuda_moe_rows``) or "grouped"; None: by the picks.
    ``tiles``: the route's (None: the defaults for the picks); the gemv's a ``GemvTiles`` (a
    tile a launch) or one ``Tiles`` for both launches, the other routes' one ``Tiles``.
    ``summed`` False: the weighted picks [T, k, H] unsummed (a fused add + norm sums them:
    ``cuda_layers.add_rms_norm``)."""
    t, k = ids.shape
    p = t * k
    x = x.contiguous()
    flat = ids.reshape(-1).contiguous()
    rw = weights.reshape(-1).contiguous()
    h = torch.empty(p, gate_up.n // 2, device=x.device, dtype=x.dtype)
    out = torch.empty(p, down.n, device=x.device, dtype=x.dtype)
    if route is None and p <= GEMV_MAX_PICKS and cuda_moe_expert.wanted(t, experts, k):
        route = "experts"
    route = route or ("gemv" if p <= GEMV_MAX_PICKS else "grouped")
    if isinstance(tiles, GemvTiles) and route != "gemv":
        raise TypeError(f"moe_experts: GemvTiles are the pick GEMV's, not the {route} route's")
    if route == "experts":  # each picked expert's weights once for all its tokens
        common = dict(tokens=t, experts=experts, topk=k, t=tiles)
        cuda_moe_expert.expert_gemv(x, flat, rw, gate_up, h, gather=True, fuse=True,
                                    routed=False, glu=glu, **common)
        cuda_moe_expert.expert_gemv(h, flat, rw, down, out, gather=False, fuse=False,
                                    routed=True, **common)
    elif route == "rows":  # the pick GEMV's loop once a pass of R tokens of an expert
        common = dict(tokens=t, experts=experts, topk=k, t=tiles)
        cuda_moe_rows.rows_gemv(x, flat, rw, gate_up, h, gather=True, fuse=True, routed=False,
                                glu=glu, **common)
        cuda_moe_rows.rows_gemv(h, flat, rw, down, out, gather=False, fuse=False, routed=True,
                                **common)
    elif route == "gemv":
        pair = gemv_pair(tiles, p, gate_up, down)
        pick_gemv(x, flat, rw, gate_up, h, topk=k, gather=True, fuse=True, routed=False,
                  t=pair.gate_up, glu=glu)
        pick_gemv(h, flat, rw, down, out, topk=k, gather=False, fuse=False, routed=True,
                  t=pair.down)
    else:
        tiles = tiles or (GROUPED_SMALL if p <= GROUPED_SMALL_MAX_PICKS else GROUPED)
        sorted_ids, bexp = align(flat, experts, tiles.block_m)
        common = dict(picks=p, experts=experts, topk=k, t=tiles)
        grouped(x, sorted_ids, bexp, rw, gate_up, h, gather=True, fuse=True, routed=False,
                glu=glu, **common)
        grouped(h, sorted_ids, bexp, rw, down, out, gather=False, fuse=False, routed=True,
                **common)
    return out.view(t, k, -1).sum(1) if summed else out.view(t, k, -1)


class CudaMoEExperts(nn.Module):
    """``models.moe.Experts`` over codes: gate/up fused as [E·2I, ·] (gate rows then up rows
    of each expert), down [E·H, ·]; built from the 2-D views [E·rows, K] of the GGUF's
    ``ffn_{gate,up,down}_exps`` codes. SiLU·up, or gpt-oss's ``ClampedSwiGLUExperts``: biases
    ``gate_up_bias`` [E, 2I] (gate then up) and ``down_bias`` [E, H], ``glu`` (alpha, limit)."""

    def __init__(self, gate: Codes, up: Codes, down: Codes, experts: int, *,
                 gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                 glu: Glu = None) -> None:
        super().__init__()
        fg, fd = gate_up_format(gate, up), fmt(down)
        if fg is None or fd is None:
            raise ValueError(f"CudaMoEExperts: gate {fmt(gate)}, up {fmt(up)}, down {fd} (gate "
                             "and up must share a format the kernels take)")
        self.num_experts = experts
        self.hidden = gate.shape[1]
        self.inner = gate.shape[0] // experts
        self.formats = (fg, fd)
        self.kinds = sorted({getattr(c, "ggml_type", "") or "4-bit" for c in (gate, down)})
        gw, gs, gm, gd = stack_tensors(gate, fg)
        uw, us, um, ud = stack_tensors(up, fg)
        self.register_buffer("gate_up_w", _per_expert_cat(gw, uw, experts))
        self.register_buffer("gate_up_s", _per_expert_cat(gs, us, experts))
        self.register_buffer("gate_up_mn", None if gm is None else _per_expert_cat(gm, um, experts))
        self.register_buffer("gate_up_d", None if gd is None else _per_expert_cat(gd, ud, experts))
        dw, ds, dm, dd = stack_tensors(down)
        self.register_buffer("down_w", dw)
        self.register_buffer("down_s", ds)
        self.register_buffer("down_mn", dm)
        self.register_buffer("down_d", dd)
        self.glu = glu
        self.register_buffer("gate_up_b", None if gate_up_bias is None
                             else gate_up_bias.detach().reshape(-1).clone())
        self.register_buffer("down_b", None if down_bias is None
                             else down_bias.detach().reshape(-1).clone())
        self.top_k = 0  # the model's picks a token (swap_in_experts; 0: unknown, never tuned)
        self.plan: Plan | None = None  # cuda_moe_tune.prepare's, per layer shape; not saved

    def stacks(self) -> tuple[Stack, Stack]:
        (gkind, ggroup, _), (dkind, dgroup, _) = self.formats
        gu = Stack(self.gate_up_w, self.gate_up_s, self.gate_up_mn, gkind == "int4", ggroup,
                   2 * self.inner, self.hidden, gkind == "six", self.gate_up_d, self.gate_up_b,
                   gkind == "fp4", gkind == "q4k")
        dn = Stack(self.down_w, self.down_s, self.down_mn, dkind == "int4", dgroup,
                   self.hidden, self.inner, dkind == "six", self.down_d, self.down_b,
                   dkind == "fp4", dkind == "q4k")
        return gu, dn

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (gate_up [E, 2I, H], down [E, H, I]): the reference."""
        gu, dn = self.stacks()
        return _dequantize(gu, self.num_experts), _dequantize(dn, self.num_experts)

    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(gate_up [E, 2I], down [E, H]) or Nones."""
        e = self.num_experts
        return (None if self.gate_up_b is None else self.gate_up_b.view(e, -1),
                None if self.down_b is None else self.down_b.view(e, -1))

    def route(self, tokens: int) -> Route | None:
        """The timed route at ``tokens`` rows (``plan_route``); None: the constant rule."""
        return plan_route(self.plan, tokens)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self.picks(x, weights, ids).sum(1)
        return reference_experts(x, weights, ids, *self.dequantize(), *self.biases(),
                                 glu=self.glu)

    def picks(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weighted picks [T, k, H] on the kernels (``forward`` sums them), any device
        Triton runs on."""
        name, tiles = self.route(ids.shape[0]) or (None, None)
        return moe_experts(x, weights, ids, *self.stacks(), self.num_experts, route=name,
                           glu=self.glu, tiles=tiles, summed=False)

    def extra_repr(self) -> str:
        act = "silu" if self.glu is None else "clamped swiglu (alpha %g, limit %g)" % self.glu
        biased = ", biased" if self.gate_up_b is not None else ""
        return (f"experts={self.num_experts}, hidden={self.hidden}, inner={self.inner}, "
                f"{'+'.join(self.kinds)}, {act}{biased}")


def expert_weights(st: Stack, e: int) -> torch.Tensor:
    """float32 [N, K]: expert ``e``'s rows of a stack, dequantised alone (every buffer of a
    stack is indexed by the row first)."""
    rows = slice(e * st.n, (e + 1) * st.n)
    cut = lambda t: None if t is None else t[rows]  # noqa: E731
    one = replace(st, w=st.w[rows], s=st.s[rows], mn=cut(st.mn), d=cut(st.d), b=cut(st.b))
    return _dequantize(one, 1)[0]


class _Experts:
    """A stack's experts dequantised one at a time on indexing (``reference_experts``' weights
    without a float copy of the whole layer)."""

    def __init__(self, st: Stack) -> None:
        self.st = st

    def __getitem__(self, e: int) -> torch.Tensor:
        return expert_weights(self.st, e)


def reference_layer(layer: CudaMoEExperts, x: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    """float32 [T, H]: ``reference_experts`` of a layer's picked experts only, each dequantised
    in turn on the layer's device (checks at start: no float copy of the layer)."""
    gu, dn = layer.stacks()
    bg, bd = layer.biases()
    return reference_experts(x.float(), weights.float(), ids, _Experts(gu), _Experts(dn),
                             None if bg is None else bg.float(),
                             None if bd is None else bd.float(), glu=layer.glu)


def swiglu(g: torch.Tensor, u: torch.Tensor, glu: Glu) -> torch.Tensor:
    """The fused activation: silu(g)·u, or gpt-oss's clamped SwiGLU at ``glu`` = (alpha, limit)."""
    if glu is None:
        return F.silu(g) * u
    alpha, limit = glu
    g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def reference_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                      gate_up: torch.Tensor, down: torch.Tensor,
                      gate_up_bias: torch.Tensor | None = None,
                      down_bias: torch.Tensor | None = None, glu: Glu = None) -> torch.Tensor:
    """Σ_picks weight · (down(act(gate, up)) + bias) per token, one expert at a time (CPU,
    checks); ``act``: ``swiglu``."""
    out = torch.zeros_like(x)
    cast = lambda b, e: None if b is None else b[e].to(x.dtype)  # noqa: E731
    for e in ids.unique().tolist():
        tok, pick = (ids == e).nonzero(as_tuple=True)
        g, u = F.linear(x[tok], gate_up[e].to(x.dtype), cast(gate_up_bias, e)).chunk(2, dim=-1)
        y = F.linear(swiglu(g, u, glu), down[e].to(x.dtype), cast(down_bias, e))
        out.index_add_(0, tok, y * weights[tok, pick, None])
    return out
