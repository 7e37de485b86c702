"""Mixtral 8x7B / 8x22B: the Llama block (Mistral's optional window) with a softmax top-2
router, renormalised, over SiLU experts.

HF folders name the MLP ``block_sparse_moe`` with per-expert ``w1``/``w3``/``w2`` (gate, up,
down): renamed on load. llama.cpp writes Mixtral as a ``llama`` GGUF (Q/K permuted) with
``llama.expert_count``: this family claims those files, the Llama family the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs, MoEArgs
from pensieve.models.config import gguf_args, hf_args, hf_sliding_window
from pensieve.models.family import GLOBAL_NAMES, LLAMA_BLOCK_NAMES, Family, GGUFNames, GGUFSource
from pensieve.models.moe import (
    MOE_GGUF_NAMES, MoEForCausalLM, gguf_moe, hf_int, moe_paths, moe_shapes,
)


def has_experts(meta: Mapping[str, Any], arch: str) -> bool:
    return int(meta.get(f"{arch}.expert_count", 0) or 0) > 0


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    moe = MoEArgs(num_experts=hf_int(config, "num_local_experts", "num_experts"),
                  top_k=hf_int(config, "num_experts_per_tok"),
                  expert_size=hf_int(config, "intermediate_size"), norm_topk=True)
    return hf_args(config, "mixtral", sliding_window=hf_sliding_window(config), moe=moe)


def _gguf(src: GGUFSource) -> ModelArgs:
    window = src.key("attention.sliding_window", None)
    return gguf_args(src, "mixtral", sliding_window=int(window) if window else None,
                     moe=gguf_moe(src, norm_topk=True))


FAMILY = Family(
    name="mixtral",
    gguf_architectures=("llama",),
    hf_model_types=("mixtral",),
    model=MoEForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, {**LLAMA_BLOCK_NAMES, **MOE_GGUF_NAMES}, permute_qk=True),
    expected_shapes=moe_shapes,
    fast_paths=moe_paths,
    gguf_match=has_experts,
    hf_renames={"block_sparse_moe": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
)
