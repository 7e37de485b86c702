"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases, none on
o_proj) with a softmax top-k router (renormalised only where ``norm_topk_prob``; llama.cpp's
``qwen2moe`` never does) and a shared expert scaled by ``sigmoid(shared_expert_gate · x)``.

The module is ``models/moe.py``'s; this file declares the config, names and fast paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs
from pensieve.models.config import gguf_args, hf_args, hf_sliding_window
from pensieve.models.family import GLOBAL_NAMES, LLAMA_BLOCK_NAMES, Family, GGUFNames, GGUFSource
from pensieve.models.moe import (
    MOE_GGUF_NAMES, MoEForCausalLM, gguf_moe, moe_paths, moe_shapes, shared_gguf_names,
)
from pensieve.models.qwen2 import window_layers
from pensieve.models.qwen3_moe import hf_moe


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    window = hf_sliding_window(config)
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    return hf_args(config, "qwen2_moe", attention_bias=bool(config.get("qkv_bias", True)),
                   attention_out_bias=False, sliding_window=window,
                   layer_types=window_layers(config, window),
                   moe=hf_moe(config, shared_size=shared, shared_gate=shared > 0))


def _gguf(src: GGUFSource) -> ModelArgs:
    gated = "blk.0.ffn_gate_inp_shexp.weight" in src.shapes
    return gguf_args(src, "qwen2_moe", attention_out_bias=False,
                     moe=gguf_moe(src, norm_topk=False, shared_gate=gated))


FAMILY = Family(
    name="qwen2_moe",
    gguf_architectures=("qwen2moe",),
    hf_model_types=("qwen2_moe",),
    model=MoEForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, {
        **LLAMA_BLOCK_NAMES, **MOE_GGUF_NAMES, **shared_gguf_names("shared_expert"),
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    }),
    expected_shapes=moe_shapes,
    fast_paths=moe_paths,
)
