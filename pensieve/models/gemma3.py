"""Gemma 3 (text): local sliding-window layers interleaved with global ones (5:1), each kind
with its own RoPE (local base 10k unscaled, global 1M with the config's scaling), RMSNorms
around both attention and MLP ("sandwich"), per-head q/k RMSNorm, a GELU-tanh gated MLP, the
embedding scaled by √hidden, attention scaled by ``query_pre_attn_scalar``, head_dim 256 and a
262k vocabulary, tied output head.

Gemma's RMSNorm multiplies by ``1 + w``. The module keeps the effective ``1 + w`` as a plain
``RMSNorm`` weight: an HF checkpoint's norms get ``+ 1`` on load (``from_hf_weight``), and a
GGUF already stores them so (llama.cpp's converter added the 1).

Reads like the reference: Layer → Model → Family. Attention and MLP are ``models/llama.py``'s
(``qk_norm``, windows, query scale and activation come from ``ModelArgs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pensieve.models.args import ModelArgs
from pensieve.models.config import decoder_shapes, gguf_args, hf_args, hf_rope
from pensieve.models.family import (
    GLOBAL_NAMES, LLAMA_BLOCK_NAMES, QK_NORM_NAMES, Family, FastPaths, GGUFNames, GGUFSource,
    ModelConfigError, Shapes,
)
from pensieve.models.forward_context import ForwardContext
from pensieve.models.llama import (
    MLP, Attention, CosSin, LlamaBody, LlamaForCausalLM, RMSNorm, rotary_dim,
)
from pensieve.models.rope import RotaryEmbedding

LOCAL_ROPE_THETA = 10000.0
WINDOW_PATTERN = 6  # every 6th layer global (llama.cpp's and transformers' default)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        h, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.local = args.window(layer) is not None

    def forward(self, x: torch.Tensor, cos_sin: tuple[CosSin, CosSin],
                ctx: ForwardContext) -> torch.Tensor:
        rope = cos_sin[1] if self.local else cos_sin[0]
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(nn.Module):
    PACKED = LlamaForCausalLM.PACKED

    def __init__(self, args: ModelArgs, max_positions: int | None = None) -> None:
        super().__init__()
        self.args = args
        positions = max_positions or args.max_position_embeddings
        self.model = LlamaBody(args, positions, Gemma3DecoderLayer)
        self.model.local_rotary = RotaryEmbedding(
            rotary_dim(args), positions, args.local_rope_theta or LOCAL_ROPE_THETA,
            args.local_rope_scaling, context_length=positions)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.embed_scale = args.hidden_size ** 0.5
        self.softcap = args.extra.get("final_logit_softcapping")
        self.fast_paths = fast_paths(args, positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # rounded as the reference rounds
        ropes = tuple(tuple(t.to(x.dtype) for t in r.lookup(positions))
                      for r in (self.model.rotary, self.model.local_rotary))
        for layer in self.model.layers:
            x = layer(x, ropes, ctx)
        logits = self.lm_head(self.model.norm(x[ctx.logits_indices])).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def fast_paths(args: ModelArgs, context_length: int) -> FastPaths:
    """The paged kernels while no window masks within the context (they attend over all
    keys); never the Llama-block kernels (other norms, GELU)."""
    return FastPaths(paged_kernels=not args.windows_bind(context_length))


def _layer_types(n: int, pattern: int) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(n))


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    if config.get("model_type") == "gemma3":
        raise ModelConfigError("multimodal Gemma 3 checkpoints are not supported; "
                               "use the text model (model_type gemma3_text)")
    if config.get("attn_logit_softcapping"):
        raise ModelConfigError("attention logit softcapping is not supported")
    rope = config.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers 5: one RoPE per layer type
        theta, scaling = hf_rope(rope["full_attention"], 1_000_000.0)
        local_theta, local_scaling = hf_rope(rope.get("sliding_attention"), LOCAL_ROPE_THETA)
    else:
        theta, scaling = hf_rope(config.get("rope_scaling"),
                                 float(config.get("rope_theta") or 1_000_000.0))
        local_theta, local_scaling = float(config.get("rope_local_base_freq") or LOCAL_ROPE_THETA), None
    n = int(config["num_hidden_layers"])
    types = config.get("layer_types") or _layer_types(
        n, int(config.get("sliding_window_pattern") or WINDOW_PATTERN))
    return hf_args(
        {**config, "rope_parameters": None, "rope_scaling": None}, "gemma3",
        rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta,
        local_rope_scaling=local_scaling, qk_norm=True, layer_types=tuple(types),
        sliding_window=int(config.get("sliding_window") or 4096),
        query_pre_attn_scalar=float(config.get("query_pre_attn_scalar") or 256),
        hidden_act=str(config.get("hidden_activation") or "gelu_pytorch_tanh"),
        head_dim=int(config.get("head_dim") or 256), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        extra={"final_logit_softcapping": config.get("final_logit_softcapping")},
    )


def _gguf(src: GGUFSource) -> ModelArgs:
    hidden, heads = int(src.key("embedding_length")), int(src.scalar("attention.head_count"))
    n = int(src.key("block_count"))
    head_dim = int(src.key("attention.key_length", 256))
    window = int(src.key("attention.sliding_window", 0) or 0)
    pattern = src.key("attention.sliding_window_pattern", WINDOW_PATTERN)
    if isinstance(pattern, list):
        types = tuple("sliding_attention" if p else "full_attention" for p in pattern)
    else:
        types = _layer_types(n, int(pattern))
    # llama.cpp: the 27B (62 layers) scales by hidden/heads, every other size by head_dim
    scalar = hidden / heads if n == 62 else head_dim
    return gguf_args(
        src, "gemma3", head_dim=head_dim, qk_norm=True, hidden_act="gelu_pytorch_tanh",
        sliding_window=window or None, layer_types=types if window else None,
        local_rope_theta=float(src.key("rope.freq_base_swa", LOCAL_ROPE_THETA)),
        query_pre_attn_scalar=float(scalar), rms_norm_eps=float(src.key("attention.layer_norm_rms_epsilon", 1e-6)),
        extra={"final_logit_softcapping": src.key("final_logit_softcapping", None)},
    )


def _shapes(args: ModelArgs) -> Shapes:
    shapes = decoder_shapes(args)
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "pre_feedforward_layernorm.weight"] = (args.hidden_size,)
        shapes[p + "post_feedforward_layernorm.weight"] = (args.hidden_size,)
    return shapes


def _from_hf(name: str, weight: torch.Tensor) -> torch.Tensor:
    return weight + 1 if name.endswith("norm.weight") else weight


FAMILY = Family(
    name="gemma3",
    gguf_architectures=("gemma3",),
    hf_model_types=("gemma3_text", "gemma3"),
    model=Gemma3ForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, {
        **LLAMA_BLOCK_NAMES, **QK_NORM_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }),
    expected_shapes=_shapes,
    fast_paths=fast_paths,
    from_hf_weight=_from_hf,
)
