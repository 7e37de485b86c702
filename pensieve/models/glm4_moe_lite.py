"""GLM-4.7-Flash (``glm4_moe_lite``): DeepSeek-V3's block — multi-head latent attention with a
low-rank q path and interleaved RoPE on a shared rotary key, a dense first layer then
sigmoid-routed MoE with a shared expert — at 47 layers, 20 heads, 64 experts (4 active).

The module and what the MLA families share are ``models/deepseek_mla.py``'s. llama.cpp writes
these models as ``deepseek2`` (``kv_b_proj`` split into ``attn_k_b``/``attn_v_b``, the
multi-token-prediction block as ``blk.47.*`` + ``blk.47.nextn.*``): this family claims those
files (a DeepSeek-V3 GGUF computes the same). The MTP layer is dropped on load, not run.
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
    n = int(config.get("num_hidden_layers") or 0)
    types = config.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    return hf_mla_args(config, "glm4_moe_lite",
                       frozenset(i for i, kind in enumerate(types) if kind == "dense"))


def _gguf(src: GGUFSource) -> ModelArgs:
    return gguf_mla_args(src, "glm4_moe_lite")


FAMILY = Family(
    name="glm4_moe_lite",
    gguf_architectures=("deepseek2",),
    hf_model_types=("glm4_moe_lite",),
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
