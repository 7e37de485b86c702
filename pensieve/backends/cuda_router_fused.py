"""A MoE router's GEMM and its selection in ONE launch for decode-sized batches (host side of
``cuda_router_kernels``' ``fused_*``): ``models/moe.Router`` (softmax and sigmoid gating) and
``models/gpt_oss.Router`` (biased logits).

Today's form is the GEMM on cuBLAS (~5 µs at Qwen3-30B-A3B's [1, 2048] × [128, 2048]ᵀ: launch
and latency, the weight is 512 KB), then the selection kernel (~2 µs); sigmoid gating adds
``x.float()``. Here the GEMV is spread over a grid of (expert blocks × column splits) programs
that store float32 partials in this router's workspace; the last program to finish (an atomic
counter) sums them in a fixed order, rounds to the torch form's logits dtype (x's for softmax
and gpt-oss, float32 for sigmoid) and runs the same selection code as the standalone kernels.
The grid is fixed by the shapes and nothing is read on the host: CUDA graphs capture it.

Each router gets its own workspace and counter (made at install, on its device): two launches
in flight at once on different streams would corrupt a shared counter. The counter starts at 0
and every launch leaves it at 0.

The grid (``plan``): BLOCK_E = 16 experts a program (the MMA's narrowest side); each program
reads about ``weight bytes / 128`` — ~one program an SM on the H100/H200's 132, one wave —
but at least 16 KB (a small weight in fewer, larger programs: their partials stay few for the
last program to sum) and at most 64 KB. E.g. Qwen3-30B-A3B (128 × 2048 bf16, 512 KB): 8 × 4
programs of 16 KB; GLM-4.7-Flash (64 × 2048 float32): 4 × 8 of 16 KB; Qwen3-Next (512 × 2048
bf16): 32 × 4; DeepSeek-V3 (256 × 7168 float32, 7.3 MB): 16 × 7 of 64 KB; gpt-oss-20b
(32 × 2880): 2 × 6. On an H100 (2026-12-07, graphed, ``bench/router_fused.py --sweep``) 4 KB or
8 KB programs were no faster at 1 and 8 tokens (Qwen3-30B-A3B at 1 token 6.9 / 6.7 µs vs 5.9)
and 32 KB ones slower (6.2 µs; 7.0 vs 6.1 at 8 tokens).

Up to ``max_tokens``: the last program selects for every token alone, so the launch's time grows
with tokens × experts (H100, µs, two launches → fused: Qwen3-30B-A3B 6.8 → 5.9 at 1 token,
7.1 → 6.1 at 8, 7.2 → 9.7 at 16; Qwen3-Next 9.4 → 7.0 at 1, 9.3 → 8.8 at 2, 9.4 → 10.4 at 4;
GLM-4.7-Flash 8.0 → 4.7 at 1, 12.6 → 11.2 at 16, 12.9 → 22.4 at 32; DeepSeek-V3 12.9 → 9.4
at 1, 25.3 → 16.0 at 8, 25.5 → 37.9 at 16; gpt-oss-20b 7.0 → 3.8 at 1, 7.4 → 5.1 at 32):
tokens × padded experts ≤ 1024 (8 tokens at 128 experts, 2 at 512, 32 at 32) kept where every
shape measured won; longer batches take the GEMM + selection kernel, a program a token.
``PENSIEVE_ROUTER_FUSED=0`` keeps the two launches.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pensieve.backends.cuda_int4 import triton_cdiv as _cdiv
from pensieve.backends.cuda_router import _pow2

ENV_SWITCH = "PENSIEVE_ROUTER_FUSED"
MAX_TOKENS = 64
BLOCK_E = 16
PROGRAMS = 128
MIN_BYTES, MAX_BYTES = 16 << 10, 64 << 10
SPAN_UNIT = 256  # a split's columns: a multiple of every column step ``tiles`` takes
DOT_FROM = 2  # tokens from which a bfloat16 weight's partials take ``tl.dot``
SELECT_ELEMENTS = 2048  # a selection pass's tokens × padded experts (≥ SELECT_LIMIT: one pass)
SELECT_LIMIT = 1024  # tokens × padded experts the last program selects for
NUM_WARPS = 4


def enabled(environ: dict[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(ENV_SWITCH, "1") != "0"


@dataclass(frozen=True)
class Plan:
    """The grid of one router's fused launch: ``blocks`` × ``split`` programs, program (i, j)
    over experts [16i, 16i + 16) and columns [j·span, (j+1)·span)."""

    blocks: int
    split: int
    span: int


def plan(experts: int, hidden: int, element_size: int) -> Plan:
    total = experts * hidden * element_size
    target = min(MAX_BYTES, max(MIN_BYTES, total // PROGRAMS))
    per_block = min(BLOCK_E, experts) * hidden * element_size
    span = _cdiv(_cdiv(hidden, max(1, round(per_block / target))), SPAN_UNIT) * SPAN_UNIT
    return Plan(blocks=_cdiv(experts, BLOCK_E), split=_cdiv(hidden, span), span=span)


def tiles(tokens: int, f32: bool) -> tuple[int, bool, int]:
    """(BT, DOT, BH) of ``_partial`` for ``tokens``: ``tl.dot`` from DOT_FROM tokens (a bfloat16
    weight: the MMA pads to 16 rows; on the H100 ``tl.dot`` from 16 instead took Qwen3-30B-A3B's
    8 tokens from 6.1 to 8.6 µs, and from 1 its 1 token from 5.9 to 6.3) or from 16 (a float32
    weight: the IEEE dot is FMAs, padding rows cost); below, the products [BT, 16, BH] held in
    registers, BT · 16 · BH ≤ 4096 (32 a thread at 4 warps)."""
    bt = _pow2(tokens)
    if bt >= (16 if f32 else DOT_FROM):
        return max(16, bt), True, 32 if f32 else 64
    return bt, False, max(32, min(256, 4096 // (bt * BLOCK_E)))


def max_tokens(padded_experts: int) -> int:
    return max(1, min(MAX_TOKENS, SELECT_LIMIT // padded_experts))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels() -> Any:
    from pensieve.backends import cuda_router_kernels

    return cuda_router_kernels


class FusedRouter:
    """``router``'s x [T, H] → (weights [T, k], ids [T, k] int64) in one launch, or None where
    T is past ``max_tokens`` (the caller's GEMM + selection then). ``gating``: "softmax",
    "sigmoid" (the weight and bias float32: ``cuda_router.install`` keeps them so) or
    "gpt-oss". The weight is read from the router at each call, as its torch form reads it."""

    def __init__(self, router: nn.Module, gating: str, tokens: int | None = None) -> None:
        experts, hidden = router.weight.shape
        self.router, self.gating = router, gating
        self.top_k: int = router.top_k if gating == "gpt-oss" else router.moe.top_k
        if gating == "sigmoid":
            groups = router.moe.n_group
            self.padded = _pow2(groups) * _pow2(experts // groups)
        else:
            self.padded = _pow2(experts)
        # ``tokens``: a bench's limit past the measured one (``bench/router_fused.py``)
        self.max_tokens = max_tokens(self.padded) if tokens is None else tokens
        self.plan = plan(experts, hidden, router.weight.element_size())
        device = router.weight.device
        self.partials = torch.empty(self.plan.split * self.max_tokens * experts,
                                    dtype=torch.float32, device=device)
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        self._constexprs: dict[int, dict[str, Any]] = {}

    def constexprs(self, tokens: int) -> dict[str, Any]:
        """The kernel's constexprs for ``tokens`` tokens (a compile each set, cached here)."""
        if tokens in self._constexprs:
            return self._constexprs[tokens]
        router, p = self.router, self.plan
        experts, hidden = router.weight.shape
        f32 = router.weight.dtype == torch.float32
        bt, dot, bh = tiles(tokens, f32)
        # Triton's interpreter multiplies bfloat16 dots as their raw bits: float32 there (the
        # same exact products of bfloat16 values)
        f32 = f32 or _interpreting()
        out: dict[str, Any] = dict(
            H=hidden, HS=p.span, SPLIT=p.split, BE=BLOCK_E, BH=bh, BT=bt, DOT=dot,
            R=min(_pow2(tokens), SELECT_ELEMENTS // self.padded), K=self.top_k,
            K_PAD=_pow2(self.top_k))
        if self.gating == "sigmoid":
            moe = router.moe
            s = experts // moe.n_group
            out.update(G=moe.n_group, G_PAD=_pow2(moe.n_group), S=s, S_PAD=_pow2(s),
                       KG=min(moe.topk_group, moe.n_group) if moe.n_group > 1 else 1,
                       HAS_BIAS=moe.correction_bias, NORM=moe.norm_topk)
        else:
            out.update(E=experts, E_PAD=self.padded, F32=f32)
            if self.gating == "softmax":
                out["NORM"] = router.moe.norm_topk
        self._constexprs[tokens] = out
        return out

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if x.dim() != 2 or x.shape[0] > self.max_tokens:
            return None
        if x.stride(-1) != 1:
            x = x.contiguous()
        router, t = self.router, x.shape[0]
        weight = router.weight
        dtype = torch.float32 if self.gating == "sigmoid" else x.dtype
        weights = torch.empty(t, self.top_k, dtype=dtype, device=x.device)
        ids = torch.empty(t, self.top_k, dtype=torch.int64, device=x.device)
        if t == 0:
            return weights, ids
        grid = (self.plan.blocks, self.plan.split)
        ker, consts = _kernels(), self.constexprs(t)
        head = (x, weight)
        tail = (self.partials, self.counter, weights, ids, t, x.stride(0))
        if self.gating == "softmax":
            ker.fused_softmax[grid](*head, *tail, float(router.moe.scale), num_warps=NUM_WARPS,
                                    **consts)
        elif self.gating == "sigmoid":
            moe = router.moe
            bias = router.e_score_correction_bias if moe.correction_bias else weight
            ker.fused_sigmoid[grid](*head, bias, *tail, float(moe.scale), num_warps=NUM_WARPS,
                                    **consts)
        else:
            ker.fused_topk_softmax[grid](*head, router.bias, *tail, num_warps=NUM_WARPS, **consts)
        return weights, ids
