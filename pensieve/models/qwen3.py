"""Qwen3 dense: the Llama block with per-head RMSNorm on q and k before RoPE, no biases, and
a head_dim of its own (128 where hidden/heads differs); no Q/K permutation in GGUF files.

The module is ``models/llama.py``'s (``qk_norm``). The q/k norms sit between the projection
and RoPE, which the one-call CPU decoder does not do: it is not declared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs
from pensieve.models.config import decoder_shapes, gguf_args, hf_args, hf_sliding_window
from pensieve.models.family import (
    GLOBAL_NAMES, LLAMA_BLOCK_NAMES, QK_NORM_NAMES, Family, GGUFNames, GGUFSource,
)
from pensieve.models.llama import LlamaForCausalLM, llama_block_paths
from pensieve.models.qwen2 import window_layers


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    window = hf_sliding_window(config)
    return hf_args(config, "qwen3", qk_norm=True, sliding_window=window,
                   layer_types=window_layers(config, window))


def _gguf(src: GGUFSource) -> ModelArgs:
    return gguf_args(src, "qwen3", qk_norm=True)


FAMILY = Family(
    name="qwen3",
    gguf_architectures=("qwen3",),
    hf_model_types=("qwen3",),
    model=LlamaForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, {**LLAMA_BLOCK_NAMES, **QK_NORM_NAMES}),
    expected_shapes=decoder_shapes,
    fast_paths=llama_block_paths,
)
