"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B, 235B-A22B): Qwen3's attention (per-head q/k
RMSNorm, no biases) with a softmax top-k router over SiLU experts, the top-k renormalised where
``norm_topk_prob`` (llama.cpp's ``qwen3moe`` always renormalises); no shared expert.

The module is ``models/moe.py``'s; this file declares the config, names and fast paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs, MoEArgs
from pensieve.models.config import gguf_args, hf_args, hf_sliding_window
from pensieve.models.family import (
    GLOBAL_NAMES, LLAMA_BLOCK_NAMES, QK_NORM_NAMES, Family, GGUFNames, GGUFSource,
)
from pensieve.models.moe import (
    MOE_GGUF_NAMES, MoEForCausalLM, gguf_moe, hf_int, moe_paths, moe_shapes, qwen_dense_layers,
)
from pensieve.models.qwen2 import window_layers


def hf_moe(config: Mapping[str, Any], **overrides: Any) -> MoEArgs:
    """The Qwen-MoE router and experts from config.json."""
    return MoEArgs(num_experts=hf_int(config, "num_experts", "num_local_experts"),
                   top_k=hf_int(config, "num_experts_per_tok"),
                   expert_size=hf_int(config, "moe_intermediate_size"),
                   norm_topk=bool(config.get("norm_topk_prob", False)),
                   dense_layers=qwen_dense_layers(config), **overrides)


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    window = hf_sliding_window(config)
    return hf_args(config, "qwen3_moe", qk_norm=True, sliding_window=window,
                   layer_types=window_layers(config, window), moe=hf_moe(config))


def _gguf(src: GGUFSource) -> ModelArgs:
    return gguf_args(src, "qwen3_moe", qk_norm=True, moe=gguf_moe(src, norm_topk=True))


FAMILY = Family(
    name="qwen3_moe",
    gguf_architectures=("qwen3moe",),
    hf_model_types=("qwen3_moe",),
    model=MoEForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, {**LLAMA_BLOCK_NAMES, **QK_NORM_NAMES, **MOE_GGUF_NAMES}),
    expected_shapes=moe_shapes,
    fast_paths=moe_paths,
)
