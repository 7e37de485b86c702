"""A softmax MoE router's selection (softmax → top-k → renormalise → scale → dtype) as one Triton
kernel on CUDA, for ``models/moe.Router`` with ``gating == "softmax"`` (Qwen3-MoE, Qwen3.5/3.6
MoE, Qwen3-Next).

The torch form after the router's GEMM is five launches (softmax, topk, sum, divide, cast); one
program here takes one token's logits row: the softmax in float32, the top-k by k passes of
max (the lowest index among equals, as ``torch.topk`` orders them on distinct values), the
picked probabilities renormalised (``norm_topk``) and scaled, written in the input's dtype with
the expert ids (int64, best first). Installed on each such router as ``kernel`` at a CUDA
runner's start (``install``); ``PENSIEVE_ROUTER_KERNEL=0`` leaves the torch form.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

ENV_SWITCH = "PENSIEVE_ROUTER_KERNEL"


def enabled(environ: dict[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(ENV_SWITCH, "1") != "0"


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_topk(LOGITS, WEIGHTS, IDS, s_row, scale, E: tl.constexpr, E_PAD: tl.constexpr,
                     K: tl.constexpr, K_PAD: tl.constexpr, NORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, E_PAD)
        valid = e < E
        x = tl.load(LOGITS + t * s_row + e, mask=valid, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, axis=0))
        p = p / tl.sum(p, axis=0)
        p = tl.where(valid, p, -1.0)
        slot = tl.arange(0, K_PAD)
        top = tl.zeros([K_PAD], tl.float32)
        ids = tl.zeros([K_PAD], tl.int64)
        for i in tl.static_range(K):
            best = tl.max(p, axis=0)
            # a NaN row (a padding row's garbage) matches nothing: expert E-1, never out of range
            pick = tl.minimum(tl.min(tl.where(p == best, e, E_PAD), axis=0), E - 1)
            top = tl.where(slot == i, best, top)
            ids = tl.where(slot == i, pick.to(tl.int64), ids)
            p = tl.where(e == pick, -2.0, p)
        if NORM:
            top = top / tl.sum(top, axis=0)
        keep = slot < K
        tl.store(WEIGHTS + t * K + slot, (top * scale).to(WEIGHTS.dtype.element_ty), mask=keep)
        tl.store(IDS + t * K + slot, ids, mask=keep)

    return softmax_topk


def softmax_topk(logits: torch.Tensor, top_k: int, norm: bool, scale: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (unit-stride rows) → (weights [T, k] in ``dtype``, ids [T, k] int64)."""
    t, e = logits.shape
    assert logits.stride(-1) == 1
    weights = torch.empty(t, top_k, dtype=dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t:
        e_pad = _pow2(e)
        _kernel()[(t,)](logits, weights, ids, logits.stride(0), float(scale), E=e, E_PAD=e_pad,
                        K=top_k, K_PAD=_pow2(top_k), NORM=norm,
                        num_warps=4 if e_pad >= 512 else 1)
    return weights, ids


def install(model: nn.Module) -> int:
    """Set ``kernel`` on every softmax ``models.moe.Router`` of ``model``; returns how many."""
    from pensieve.models.moe import Router

    routers = [m for m in model.modules() if isinstance(m, Router) and m.moe.gating != "sigmoid"]
    for m in routers:
        m.kernel = softmax_topk
    return len(routers)
