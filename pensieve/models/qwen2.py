"""Qwen2 / Qwen2.5 (and Qwen2.5-Coder): the Llama block with q/k/v biases (no o_proj bias),
an untied output head on the larger sizes, RoPE base 1M; no Q/K permutation in GGUF files.

The module is ``models/llama.py``'s; this file declares the config, names and fast paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs
from pensieve.models.config import decoder_shapes, gguf_args, hf_args, hf_sliding_window
from pensieve.models.family import GLOBAL_NAMES, LLAMA_BLOCK_NAMES, Family, GGUFNames, GGUFSource
from pensieve.models.llama import LlamaForCausalLM, llama_block_paths


def window_layers(config: Mapping[str, Any], window: int | None) -> tuple[str, ...] | None:
    """Qwen windows the layers from ``max_window_layers`` on, when it windows at all."""
    if window is None:
        return None
    if config.get("layer_types"):
        return tuple(config["layer_types"])
    first = int(config.get("max_window_layers", 0))
    return tuple("sliding_attention" if i >= first else "full_attention"
                 for i in range(int(config["num_hidden_layers"])))


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    window = hf_sliding_window(config)
    return hf_args(config, "qwen2", attention_bias=True, attention_out_bias=False,
                   sliding_window=window, layer_types=window_layers(config, window))


def _gguf(src: GGUFSource) -> ModelArgs:
    return gguf_args(src, "qwen2", attention_out_bias=False)


FAMILY = Family(
    name="qwen2",
    gguf_architectures=("qwen2",),
    hf_model_types=("qwen2",),
    model=LlamaForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, LLAMA_BLOCK_NAMES),
    expected_shapes=decoder_shapes,
    fast_paths=llama_block_paths,
)
