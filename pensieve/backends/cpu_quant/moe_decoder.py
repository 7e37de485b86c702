"""Which MoE layers the one-call decoder runs, and their C ``MoeWeights`` (moe_layer_source.py).

A layer's MLP qualifies when it is ``models.moe.MoE`` with a softmax router (no correction
bias, no backend kernel), no shared expert, and ``SlicedExperts`` with SiLU on the CPU: what
``moe_route`` + ``moe_rows`` compute. The family declares the path (``FastPaths.
cpu_moe_decoder``); ``PENSIEVE_CPU_MOE_DECODER=0`` keeps the module path (A/B benches).
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from pensieve.backends.cpu_quant.expert_linear import SlicedExperts
from pensieve.models.moe import MoE


class MoeWeights(ctypes.Structure):
    """Mirror of the C ``MoeWeights``."""

    _fields_ = [("router", ctypes.c_void_p), ("gu", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("E", ctypes.c_int64), ("k", ctypes.c_int64), ("norm_topk", ctypes.c_int64),
                ("scale", ctypes.c_float)]


def enabled() -> bool:
    return os.environ.get("PENSIEVE_CPU_MOE_DECODER", "1") != "0"


def fits(mlp: nn.Module) -> bool:
    """Whether ``mlp`` is an MoE block the C router and experts compute exactly as modules."""
    if type(mlp) is not MoE or mlp.has_shared or mlp.shared_gated:
        return False
    router, experts, moe = mlp.gate, mlp.experts, mlp.gate.moe
    return (moe.gating == "softmax" and not moe.correction_bias and router.kernel is None
            and router.weight.dtype == torch.float32 and router.weight.is_contiguous()
            and router.weight.device.type == "cpu" and isinstance(experts, SlicedExperts)
            and experts.silu and experts._on_cpu and 0 < moe.top_k <= experts.num_experts)


def moe_weights(mlp: MoE) -> MoeWeights:
    """The C struct of a fitting block (it points into the module's tensors and tables)."""
    experts, moe = mlp.experts, mlp.gate.moe
    return MoeWeights(mlp.gate.weight.data_ptr(), ctypes.addressof(experts._gu_table),
                      ctypes.addressof(experts._down_table), experts.num_experts, moe.top_k,
                      int(moe.norm_topk), moe.scale)


def max_rows(mlp: MoE) -> int:
    """Rows a step may have for the decoder to take it: each row reads its own k experts, so
    past E / k rows the module path's grouping (each expert once for all its rows) reads less."""
    return max(1, mlp.experts.num_experts // mlp.gate.moe.top_k)
