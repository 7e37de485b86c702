"""Phi-3 / Phi-3.5-mini (and Phi-4-mini): the Llama block with q/k/v and gate/up fused in the
checkpoint itself, LongRoPE (``longrope``/``su``: short and long per-dimension factors, chosen
by the served context against the trained one — see ``models/rope.py``), a sliding window on
some sizes (Phi-3-mini-4k: 2047) and partial rotary dims on Phi-4-mini.

GGUF: ``attn_qkv``/``ffn_up`` hold the fused rows (gate first), the factors are the tensors
``rope_factors_long``/``rope_factors_short``, and a window of 0 means none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs
from pensieve.models.config import decoder_shapes, gguf_args, hf_args, hf_sliding_window
from pensieve.models.family import GLOBAL_NAMES, Family, GGUFNames, GGUFSource, Shapes
from pensieve.models.llama import LlamaForCausalLM, llama_block_paths


class Phi3ForCausalLM(LlamaForCausalLM):
    PACKED: Mapping[str, tuple[str, ...]] = {}  # the checkpoint is fused already


def _longrope(scaling: dict[str, Any] | None, config: Mapping[str, Any]) -> dict[str, Any] | None:
    if not scaling or scaling.get("rope_type") not in ("longrope", "su"):
        return scaling
    scaling = dict(scaling)
    scaling.setdefault("original_max_position_embeddings",
                       int(config.get("original_max_position_embeddings")
                           or config["max_position_embeddings"]))
    scaling.setdefault("max_position_embeddings", int(config["max_position_embeddings"]))
    return scaling


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    args = hf_args(config, "phi3", sliding_window=hf_sliding_window(config))
    scaling = _longrope(args.rope_scaling, config)
    return ModelArgs(**{**args.__dict__, "rope_scaling": scaling})


def _gguf(src: GGUFSource) -> ModelArgs:
    hidden, heads = int(src.key("embedding_length")), int(src.scalar("attention.head_count"))
    head_dim = hidden // heads
    rope_dims = int(src.key("rope.dimension_count", head_dim))
    window = src.key("attention.sliding_window", None)
    scaling = None
    if "rope_factors_long.weight" in src.vectors:
        original = int(src.key("rope.scaling.original_context_length"))
        scaling = {
            "rope_type": "longrope",
            "long_factor": src.vectors["rope_factors_long.weight"],
            "short_factor": src.vectors["rope_factors_short.weight"],
            "original_max_position_embeddings": original,
            "max_position_embeddings": int(src.key("context_length")),
        }
        attn_factor = src.key("rope.scaling.attn_factor", None)
        if attn_factor is not None:
            scaling["attention_factor"] = float(attn_factor)
    return gguf_args(src, "phi3", head_dim=head_dim, partial_rotary_factor=rope_dims / head_dim,
                     rope_scaling=scaling, sliding_window=int(window) if window else None,
                     attention_bias="blk.0.attn_qkv.bias" in src.shapes)


def _shapes(args: ModelArgs) -> Shapes:
    return decoder_shapes(args, fused=True)


FAMILY = Family(
    name="phi3",
    gguf_architectures=("phi3",),
    hf_model_types=("phi3",),
    model=Phi3ForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, {
        "attn_qkv": "self_attn.qkv_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_up": "mlp.gate_up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }, ignored=frozenset({"rope_factors_long.weight", "rope_factors_short.weight"})),
    expected_shapes=_shapes,
    fast_paths=llama_block_paths,
)
