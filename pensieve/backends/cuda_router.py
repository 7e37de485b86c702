"""A MoE router's selection after its GEMM as one Triton kernel on CUDA, for ``models/moe.Router``:
softmax gating (Qwen3-MoE, Qwen3.5/3.6 MoE, Qwen3-Next) and sigmoid gating (GLM-4.5/4.7-Flash,
DeepSeek-V3: ``sigmoid_topk``, below).

The torch form after the router's GEMM is five launches (softmax, topk, sum, divide, cast); one
program here takes one token's logits row: the softmax in float32, the top-k by k passes of
max (the lowest index among equals, as ``torch.topk`` orders them on distinct values), the
picked probabilities renormalised (``norm_topk``) and scaled, written in the input's dtype with
the expert ids (int64, best first).

Sigmoid gating's torch form is ~12 launches a layer (sigmoid, + correction bias, the groups'
top-2 sums, their top-k, a scatter and mask, the top-k, a gather, sum, divide, scale); one
program here takes one token's float32 logits: sigmoid, the bias, per group the sum of its two
best biased scores, the ``topk_group`` best groups kept (the lowest index among equal sums),
``top_k`` passes of max over the kept experts' biased scores (the lowest index among equals),
the picked *unbiased* scores renormalised (``+ 1e-20``) and scaled, written float32 (as the
torch form returns them) best first. ``torch.topk(sorted=False)`` orders its picks its own way:
the selection is the same set (and the same set among ties wherever torch takes the lowest
indices). The router's weight is kept float32 (its GEMM ran ``weight.float()``, a cast a step).

gpt-oss's router (``models/gpt_oss.Router``: top-k of the biased logits, then a softmax over
those k) is ``topk_softmax``: ~5 launches (topk's gather and sort, softmax) → one.

The kernels (``cuda_router_kernels``) are one program a token around a selection helper that
takes a block of tokens' rows, which the fused router (``cuda_router_fused``: the GEMM and the
selection in one launch for short batches, ``PENSIEVE_ROUTER_FUSED=0`` keeps two) shares.

Installed on each router at every CUDA runner's start (uniform and hybrid layouts) (``install``: ``kernel`` on softmax
routers, ``sigmoid_kernel`` on sigmoid ones); ``PENSIEVE_ROUTER_KERNEL=0`` leaves the torch forms.
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
    from pensieve.backends import cuda_router_kernels

    return cuda_router_kernels.softmax_topk


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


@functools.cache
def _sigmoid_kernel() -> Any:
    from pensieve.backends import cuda_router_kernels

    return cuda_router_kernels.sigmoid_topk


def sigmoid_topk(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int,
                 topk_group: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits [T, E] (unit-stride rows), the correction bias [E] or None → (weights
    [T, k] float32, ids [T, k] int64), best first; ``n_group`` groups of E / n_group experts,
    the ``topk_group`` best kept (``n_group`` 1: no grouping)."""
    t, e = logits.shape
    assert logits.stride(-1) == 1 and e % n_group == 0
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t:
        s = e // n_group
        kg = min(topk_group, n_group) if n_group > 1 else 1
        _sigmoid_kernel()[(t,)](
            logits, logits if bias is None else bias, weights, ids, logits.stride(0),
            float(scale), G=n_group, G_PAD=_pow2(n_group), S=s, S_PAD=_pow2(s), KG=kg, K=top_k,
            K_PAD=_pow2(top_k), HAS_BIAS=bias is not None, NORM=norm,
            num_warps=4 if e >= 512 else (2 if e >= 128 else 1))
    return weights, ids


@functools.cache
def _topk_softmax_kernel() -> Any:
    from pensieve.backends import cuda_router_kernels

    return cuda_router_kernels.topk_softmax


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's selection: logits [T, E] (unit-stride rows) → (softmax over the top-k logits
    [T, k] in the logits' dtype, ids [T, k] int64), best first."""
    t, e = logits.shape
    assert logits.stride(-1) == 1
    weights = torch.empty(t, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t:
        _topk_softmax_kernel()[(t,)](logits, weights, ids, logits.stride(0), E=e,
                                     E_PAD=_pow2(e), K=top_k, K_PAD=_pow2(top_k),
                                     num_warps=4 if e >= 512 else 1)
    return weights, ids


def sigmoid_router(router: nn.Module) -> Any:
    """``router``'s selection on the kernel: float32 logits → (weights, ids)."""
    moe = router.moe

    def select(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = router.e_score_correction_bias.float() if moe.correction_bias else None
        return sigmoid_topk(logits, bias, moe.top_k, moe.n_group, moe.topk_group,
                            moe.norm_topk, moe.scale)

    return select


def install(model: nn.Module, fused: bool | None = None) -> int:
    """Set ``kernel`` on every softmax ``models.moe.Router`` of ``model`` and on gpt-oss's
    (``topk_softmax``), ``sigmoid_kernel`` on every sigmoid one (its weight and bias kept
    float32: the values its torch form casts to each step); with ``fused`` (default: unless
    ``PENSIEVE_ROUTER_FUSED=0``) each also gets ``fused``, its GEMM + selection in one launch
    for short batches (``cuda_router_fused``: its workspace and counter made here, on the
    router's device); returns how many."""
    from pensieve.backends import cuda_router_fused
    from pensieve.models import gpt_oss
    from pensieve.models.moe import Router

    fuse = cuda_router_fused.enabled() if fused is None else fused
    oss = [m for m in model.modules() if isinstance(m, gpt_oss.Router)]
    for m in oss:
        m.kernel = topk_softmax
        m.fused = cuda_router_fused.FusedRouter(m, "gpt-oss") if fuse else None
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for m in routers:
        if m.moe.gating == "sigmoid":
            with torch.no_grad():
                if m.weight.dtype != torch.float32:
                    m.weight.data = m.weight.data.float()
                if m.moe.correction_bias and m.e_score_correction_bias.dtype != torch.float32:
                    m.e_score_correction_bias = m.e_score_correction_bias.float()
            m.sigmoid_kernel = sigmoid_router(m)
        else:
            m.kernel = softmax_topk
        m.fused = cuda_router_fused.FusedRouter(m, m.moe.gating) if fuse else None
    return len(routers) + len(oss)
