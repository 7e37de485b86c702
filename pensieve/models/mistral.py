"""Mistral 7B / Mistral-Small / Devstral: the Llama block, with Mistral 7B v0.1's sliding
window (4096) where the config sets one, and a head_dim of its own on Mistral-Small (128 for
hidden 5120 / 32 heads).

llama.cpp writes these as ``llama`` GGUFs (Q/K permuted, no window key): they load through
``models/llama.py``'s family. This one reads HF folders (``model_type: mistral``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs
from pensieve.models.config import decoder_shapes, gguf_args, hf_args, hf_sliding_window
from pensieve.models.family import GLOBAL_NAMES, LLAMA_BLOCK_NAMES, Family, GGUFNames, GGUFSource
from pensieve.models.llama import LlamaForCausalLM, llama_block_paths


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    return hf_args(config, "mistral", sliding_window=hf_sliding_window(config))


def _gguf(src: GGUFSource) -> ModelArgs:
    window = src.key("attention.sliding_window", None)
    return gguf_args(src, "mistral", sliding_window=int(window) if window else None)


FAMILY = Family(
    name="mistral",
    gguf_architectures=(),
    hf_model_types=("mistral",),
    model=LlamaForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, LLAMA_BLOCK_NAMES, permute_qk=True),
    expected_shapes=decoder_shapes,
    fast_paths=llama_block_paths,
)
