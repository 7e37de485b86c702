"""Qwen3.5 / Qwen3.6, dense (Qwen3.5-4B, 9B, 27B) and MoE (Qwen3.5-35B-A3B, 397B-A17B): Qwen3-Next's
hybrid blocks (``models/qwen3_next.py``: three Gated DeltaNet layers to one gated full-attention
layer, (1 + w) norms, partial rotary) with the linear layers' projections stored apart
(``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), a dense SiLU MLP or MoE with a
sigmoid-gated shared expert (top-k always renormalised).

Text only: the interleaved multimodal RoPE (``mrope_section``) gives every section the same
position for text tokens, which is plain RoPE on the rotary dims. llama.cpp's ``qwen35`` /
``qwen35moe`` converters reorder value heads from grouped to tiled when key heads are fewer:
the module reads them in that order (``GatedDeltaArgs.order``) rather than moving rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs
from pensieve.models.family import Family, GGUFSource
from pensieve.models.moe import gguf_moe
from pensieve.models.hybrid_config import (
    HYBRID_GGUF_NAMES, from_gguf_weight, gguf_hybrid, hf_delta, hf_hybrid,
    hf_shared_moe, hybrid_layout, hybrid_shapes, hybrid_paths,
)
from pensieve.models.qwen3_next import HybridForCausalLM


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's keys: a multimodal checkpoint's ``text_config`` (the output head's
    tying is the top level's), or the config itself."""
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        return dict(config)
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return {**text, "tie_word_embeddings": tie}


def _hf_dense(config: Mapping[str, Any]) -> ModelArgs:
    text = text_config(config)
    return hf_hybrid(text, "qwen3_5", hf_delta(text))


def _hf_moe(config: Mapping[str, Any]) -> ModelArgs:
    text = text_config(config)
    return hf_hybrid(text, "qwen3_5_moe", hf_delta(text), moe=hf_shared_moe(text, norm_topk=True))


def _gguf_dense(src: GGUFSource) -> ModelArgs:
    return gguf_hybrid(src, "qwen3_5", {"order": "tiled"})


def _gguf_moe(src: GGUFSource) -> ModelArgs:
    return gguf_hybrid(src, "qwen3_5_moe", {"order": "tiled"},
                       moe=gguf_moe(src, norm_topk=True, shared_gate=True))


def _family(name: str, gguf_arch: str, model_types: tuple[str, ...], hf: Any, gguf: Any
            ) -> Family:
    return Family(
        name=name,
        gguf_architectures=(gguf_arch,),
        hf_model_types=model_types,
        model=HybridForCausalLM,
        args_from_hf=hf,
        args_from_gguf=gguf,
        gguf_names=HYBRID_GGUF_NAMES,
        expected_shapes=hybrid_shapes,
        fast_paths=hybrid_paths,
        from_gguf_weight=from_gguf_weight,
        cache_layout=hybrid_layout,
        drops_mtp=True,
        # a multimodal checkpoint's language model: model.language_model.* → model.*
        hf_renames={"language_model": ""},
    )


FAMILY = _family("qwen3_5", "qwen35", ("qwen3_5_text", "qwen3_5"), _hf_dense, _gguf_dense)
MOE_FAMILY = _family("qwen3_5_moe", "qwen35moe", ("qwen3_5_moe_text", "qwen3_5_moe"),
                     _hf_moe, _gguf_moe)
