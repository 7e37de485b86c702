"""Gemma 4 (text): Gemma 3's local/global layer pattern and sandwich norms, with what changed —

- norms multiply by ``w`` (Gemma 3: ``1 + w``); values get a scale-free RMSNorm (``v_norm``)
  after q/k norms; attention is unscaled (``scaling`` 1.0);
- global layers have their own head size and KV heads (``global_head_dim``,
  ``num_global_key_value_heads``), may take values = keys' projection (``attention_k_eq_v``) and
  rotate only ``partial_rotary_factor`` of each half ("proportional" RoPE); local layers keep
  default RoPE at base 10k;
- per-layer embeddings (PLE, ``hidden_size_per_layer_input``): a per-layer token embedding plus a
  projection of the input embedding, gated into each layer's output;
- the last ``num_kv_shared_layers`` layers compute no K/V: each reads the cache of the last
  earlier layer of its kind (their MLPs double in width with ``use_double_wide_mlp``);
- an optional MoE block (26B-A4B) beside the dense MLP: a scaled RMSNorm router, softmax top-k
  renormalised times a per-expert scale, GELU experts, each branch with its own norms;
- a learned ``layer_scalar`` per layer, final logit soft-capping.

Configs, llama.cpp ``gemma4`` metadata, per-layer shapes and the cache layout are
``models/gemma4_config.py``'s; the GGUF tensor names are below with the family.

Left out (vision/audio only): the vision and audio towers (a multimodal ``gemma4`` checkpoint's
language model loads, its towers are not read), their soft tokens, and bidirectional attention
over vision tokens (``use_bidirectional_attention``). A KV-shared layer declares an
empty cache (``PagedKV(0, 0, 0, window)``: no memory) and reads its source layer's.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.models.args import ModelArgs, MoEArgs
from pensieve.models.family import (
    GLOBAL_NAMES, LLAMA_BLOCK_NAMES, QK_NORM_NAMES, Family, FastPaths, GGUFNames,
)
from pensieve.models.forward_context import ForwardContext, attend_cached, paged_attention
from pensieve.models.gemma3 import LOCAL_ROPE_THETA
from pensieve.models.gemma4_config import (
    cache_layout, expected_shapes, gguf_config, hf_config, kv_source, layer_dims, options,
)
from pensieve.models.llama import MLP, CosSin, RMSNorm, activation
from pensieve.models.moe import Experts
from pensieve.models.rope import RotaryEmbedding, apply_rope


class Gemma4Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        o, h, bias = options(args), args.hidden_size, args.attention_bias
        self.layer, self.heads, self.eps = layer, args.num_heads, args.rms_norm_eps
        self.kv_heads, self.head_dim = layer_dims(args, layer)
        self.window = args.window(layer)
        self.source = kv_source(args, layer)
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        if self.source == layer:
            kv = self.kv_heads * self.head_dim
            self.k_proj = nn.Linear(h, kv, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            if not (o.k_eq_v and self.window is None):
                self.v_proj = nn.Linear(h, kv, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)
        self.q_scale = math.sqrt(self.head_dim)  # unscaled scores under SDPA's 1/√d

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(t, self.heads, self.head_dim)) * self.q_scale
        if self.source != self.layer:  # reads the earlier layer's keys and values
            q = apply_rope(q, q[:, :1], cos_sin)[0]
            out = torch.empty_like(q)
            k_cache, v_cache = ctx.k_caches[self.source], ctx.v_caches[self.source]
            for seq in ctx.paged(self.source)[1]:  # the source layer's block tables
                attend_cached(q, k_cache, v_cache, seq, out, self.window)
        else:
            k = self.k_proj(x).view(t, self.kv_heads, self.head_dim)
            v = self.v_proj(x).view(t, self.kv_heads, self.head_dim) if hasattr(
                self, "v_proj") else k
            k = self.k_norm(k)
            v = F.rms_norm(v, (self.head_dim,), None, self.eps)
            out = paged_attention(self.layer, q, k, v, ctx, cos_sin, window=self.window)
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))


class Gemma4Router(nn.Module):
    """Scale-free RMSNorm · ``scale`` / √hidden → expert logits → softmax top-k renormalised,
    times each chosen expert's ``per_expert_scale``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        o = options(args)
        self.proj = nn.Linear(args.hidden_size, o.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(args.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(o.num_experts))
        self.top_k, self.eps, self.root = o.top_k, args.rms_norm_eps, args.hidden_size ** -0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.rms_norm(x, (x.shape[-1],), None, self.eps) * self.scale * self.root
        probs = torch.softmax(self.proj(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.per_expert_scale[ids]).to(x.dtype), ids


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        o, h, eps = options(args), args.hidden_size, args.rms_norm_eps
        self.self_attn = Gemma4Attention(args, layer)
        shared = self.self_attn.source != layer
        wide = 2 if o.double_wide_mlp and shared else 1
        self.mlp = MLP(replace(args, intermediate_size=args.intermediate_size * wide))
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(h, eps))
        self.register_buffer("layer_scalar", torch.ones(1))
        self.moe = o.num_experts > 0
        if self.moe:
            self.router = Gemma4Router(args)
            moe = MoEArgs(o.num_experts, o.top_k, o.expert_size)
            self.experts = Experts(replace(args, moe=moe))
            for name in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                         "pre_feedforward_layernorm_2"):
                setattr(self, name, RMSNorm(h, eps))
        self.ple = o.per_layer_dim > 0
        if self.ple:
            self.act = activation(args.hidden_act)
            self.per_layer_input_gate = nn.Linear(h, o.per_layer_dim, bias=False)
            self.per_layer_projection = nn.Linear(o.per_layer_dim, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps)
        self.local = self.self_attn.window is not None

    def forward(self, x: torch.Tensor, ropes: tuple[CosSin, CosSin], per_layer: torch.Tensor | None,
                ctx: ForwardContext) -> torch.Tensor:
        rope = ropes[1] if self.local else ropes[0]
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, ctx))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            weights, ids = self.router(x)
            routed = self.experts(self.pre_feedforward_layernorm_2(x), weights, ids)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)
        x = x + self.post_feedforward_layernorm(h)
        if self.ple:
            gate = self.act(self.per_layer_input_gate(x)) * per_layer
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return x * self.layer_scalar


class Gemma4Body(nn.Module):
    """``model.*`` in HF naming."""

    def __init__(self, args: ModelArgs, positions: int) -> None:
        super().__init__()
        o, h = options(args), args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, h)
        self.layers = nn.ModuleList(Gemma4DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(h, args.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            o.global_head_dim, positions, o.global_rope_theta,
            {"rope_type": "proportional", "partial_rotary_factor": o.global_rope_partial},
            context_length=positions)
        self.local_rotary = RotaryEmbedding(args.head_dim, positions, args.local_rope_theta
                                            or LOCAL_ROPE_THETA, args.local_rope_scaling,
                                            context_length=positions)
        if o.per_layer_dim:
            n = args.num_layers * o.per_layer_dim
            self.embed_tokens_per_layer = nn.Embedding(o.per_layer_vocab, n)
            self.per_layer_model_projection = nn.Linear(h, n, bias=False)
            self.per_layer_projection_norm = RMSNorm(o.per_layer_dim, args.rms_norm_eps)


class Gemma4ForCausalLM(nn.Module):
    PACKED = {"mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
              "experts.gate_up_proj": ("experts.gate_proj", "experts.up_proj")}

    def __init__(self, args: ModelArgs, max_positions: int | None = None) -> None:
        super().__init__()
        self.args, self.opts = args, options(args)
        self.model = Gemma4Body(args, max_positions or args.max_position_embeddings)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fast_paths = _paths(args, max_positions or args.max_position_embeddings)

    def _per_layer_inputs(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[T, layers, ple]: the token's per-layer embedding and the projected input embedding,
        each normalised/scaled as the reference does, averaged by 1/√2."""
        o, m, t = self.opts, self.model, ids.shape[0]
        scale = torch.tensor(o.per_layer_dim ** 0.5, dtype=x.dtype)
        tokens = (m.embed_tokens_per_layer(ids) * scale).view(t, -1, o.per_layer_dim)
        proj = m.per_layer_model_projection(x) * self.args.hidden_size ** -0.5
        proj = m.per_layer_projection_norm(proj.view(t, -1, o.per_layer_dim))
        return (proj + tokens) * 2.0 ** -0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        m = self.model
        x = m.embed_tokens(input_ids)  # an nn.Embedding or a table kept as codes
        x = x * torch.tensor(self.args.hidden_size ** 0.5, dtype=x.dtype)
        per_layer = self._per_layer_inputs(input_ids, x) if self.opts.per_layer_dim else None
        ropes = tuple(tuple(t.to(x.dtype) for t in r.lookup(positions))
                      for r in (m.rotary, m.local_rotary))
        for i, layer in enumerate(m.layers):
            x = layer(x, ropes, per_layer[:, i] if per_layer is not None else None, ctx)
        logits = self.lm_head(m.norm(x[ctx.logits_indices])).float()
        if self.opts.softcap:
            logits = torch.tanh(logits / self.opts.softcap) * self.opts.softcap
        return logits


def _paths(args: ModelArgs, context_length: int) -> FastPaths:
    """None of the attention/decoder paths (the compiled kernels assume one head size, scaled
    scores, no PLE); a GGUF's experts stay codes on the CPU kernels (``models.moe.Experts``
    with GELU: the sliced kernels take any activation)."""
    return FastPaths(cpu_moe_codes=True)


FAMILY = Family(
    name="gemma4",
    gguf_architectures=("gemma4",),
    hf_model_types=("gemma4_text", "gemma4"),
    model=Gemma4ForCausalLM,
    args_from_hf=hf_config,
    args_from_gguf=gguf_config,
    gguf_names=GGUFNames({
        **GLOBAL_NAMES, "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
        "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
        "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
    }, {
        **LLAMA_BLOCK_NAMES, **QK_NORM_NAMES,
        "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "layer_output_scale.weight": "layer_scalar",
        "ffn_gate_inp": "router.proj", "ffn_gate_inp.scale": "router.scale",
        "ffn_down_exps.scale": "router.per_expert_scale",
        "ffn_gate_up_exps": "experts.gate_up_proj", "ffn_gate_exps": "experts.gate_proj",
        "ffn_up_exps": "experts.up_proj", "ffn_down_exps": "experts.down_proj",
        "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
        "post_ffw_norm_1": "post_feedforward_layernorm_1",
        "post_ffw_norm_2": "post_feedforward_layernorm_2",
        "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
        "post_norm": "post_per_layer_input_norm",
    }, ignored=frozenset({"rope_freqs.weight"})),
    expected_shapes=expected_shapes,
    fast_paths=_paths,
    cache_layout=cache_layout,
    # a multimodal checkpoint: model.language_model.* → model.*; its towers are not read
    hf_renames={"language_model": ""},
    gguf_splits={"experts.gate_up_proj": ("experts.gate_proj", "experts.up_proj")},
    drops_mtp=True,
)
