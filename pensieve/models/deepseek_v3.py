"""DeepSeek-V3 (``deepseek_v3``): multi-head latent attention, the first
``first_k_dense_replace`` layers dense, the rest sigmoid-routed MoE (group-limited top-k with
correction bias) with shared experts; YaRN RoPE whose ``mscale_all_dim`` also scales the
softmax. The same block as GLM-4.7-Flash (``models/deepseek_mla.py``); llama.cpp's
``deepseek2`` GGUFs load through ``glm4_moe_lite``'s family (same module, same names). The
multi-token-prediction layer (``model.layers.{num_hidden_layers}``) is dropped on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs
from pensieve.models.deepseek_mla import (
    DEEPSEEK2_NAMES, MLAForCausalLM, from_gguf_weight, gguf_mla_args, hf_mla_args,
    latent_layout, mla_paths, mla_shapes,
)
from pensieve.models.family import GLOBAL_NAMES, Family, GGUFNames, GGUFSource


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    dense = int(config.get("first_k_dense_replace") or 0)
    return hf_mla_args(config, "deepseek_v3", frozenset(range(dense)))


def _gguf(src: GGUFSource) -> ModelArgs:
    return gguf_mla_args(src, "deepseek_v3")


FAMILY = Family(
    name="deepseek_v3",
    gguf_architectures=(),
    hf_model_types=("deepseek_v3",),
    model=MLAForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, DEEPSEEK2_NAMES),
    expected_shapes=mla_shapes,
    fast_paths=mla_paths,
    from_gguf_weight=from_gguf_weight,
    cache_layout=latent_layout,
    drops_mtp=True,
)
