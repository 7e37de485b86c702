"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (``glm4_moe``): GQA attention with q/k/v biases, optional
per-head q/k RMSNorm, RoPE on the first half of each head (``partial_rotary_factor`` 0.5); the
first ``first_k_dense_replace`` layers dense, the rest MoE with DeepSeek-V3 routing (sigmoid
scores, chosen by score + ``e_score_correction_bias`` within the best ``topk_group`` of
``n_group`` groups, renormalised, times ``routed_scaling_factor``) plus a shared expert.

The module is ``models/moe.py``'s (``GLMForCausalLM``: the shared expert is ``shared_experts``).
The multi-token-prediction layers (``num_nextn_predict_layers``: HF ``model.layers.{n}.*``,
llama.cpp ``blk.{n}.*`` + ``blk.{n}.nextn.*``) are dropped on load, never run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs, MoEArgs
from pensieve.models.config import gguf_args, hf_args
from pensieve.models.family import (
    GLOBAL_NAMES, LLAMA_BLOCK_NAMES, NEXTN_NAMES, QK_NORM_NAMES, Family, GGUFNames, GGUFSource,
    Shapes,
)
from pensieve.models.moe import (
    MOE_GGUF_NAMES, GLMForCausalLM, gguf_moe, hf_int, moe_paths, moe_shapes, shared_gguf_names,
)


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    rope = config.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 0.5
    size = hf_int(config, "moe_intermediate_size")
    moe = MoEArgs(
        num_experts=hf_int(config, "n_routed_experts", "num_local_experts"),
        top_k=hf_int(config, "num_experts_per_tok"), expert_size=size, gating="sigmoid",
        norm_topk=bool(config.get("norm_topk_prob", True)),
        scale=float(config.get("routed_scaling_factor", 1.0)),
        n_group=int(config.get("n_group") or 1), topk_group=int(config.get("topk_group") or 1),
        correction_bias=True,
        shared_size=size * int(config.get("n_shared_experts", 1)),
        dense_layers=frozenset(range(int(config.get("first_k_dense_replace", 1)))))
    return hf_args(config, "glm4_moe", attention_bias=bool(config.get("attention_bias", False)),
                   attention_out_bias=False, qk_norm=bool(config.get("use_qk_norm", False)),
                   partial_rotary_factor=float(partial), moe=moe)


def _gguf(src: GGUFSource) -> ModelArgs:
    hidden, heads = int(src.key("embedding_length")), int(src.scalar("attention.head_count"))
    head_dim = int(src.key("attention.key_length", 0) or hidden // heads)
    rope_dims = int(src.key("rope.dimension_count", head_dim // 2))
    layers = int(src.key("block_count")) - int(src.key("nextn_predict_layers", 0))
    moe = gguf_moe(src, correction_bias=any(n.endswith(".exp_probs_b.bias") for n in src.shapes))
    return gguf_args(src, "glm4_moe", head_dim=head_dim, num_layers=layers,
                     partial_rotary_factor=rope_dims / head_dim, attention_out_bias=False,
                     qk_norm="blk.0.attn_q_norm.weight" in src.shapes, moe=moe)


def _shapes(args: ModelArgs) -> Shapes:
    return moe_shapes(args, shared="shared_experts")


FAMILY = Family(
    name="glm4_moe",
    gguf_architectures=("glm4moe",),
    hf_model_types=("glm4_moe",),
    model=GLMForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, {
        **LLAMA_BLOCK_NAMES, **QK_NORM_NAMES, **MOE_GGUF_NAMES,
        **shared_gguf_names("shared_experts"), **NEXTN_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    }),
    expected_shapes=_shapes,
    fast_paths=moe_paths,
    drops_mtp=True,
)
