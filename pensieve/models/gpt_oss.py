"""gpt-oss (gpt-oss-20b / 120b; transformers' ``gpt_oss``, llama.cpp's ``gpt-oss``).

Attention: GQA with q/k/v/o biases, a learned sink logit per head (``sink_attention.py``),
sliding-window (``sliding_window``, 128) and full layers alternating as ``layer_types`` says
(even layers windowed by default, as llama.cpp's pattern of 2), YaRN RoPE on whole heads,
scale 1/√head_dim. MLP: a mixture of experts — a router with a bias, top-k of the logits then a
softmax over those k; each expert a clamped SwiGLU with biases,

    gate = min(gate, limit); up = clamp(up, ±limit)
    out  = down((up + 1) · gate · σ(alpha · gate)) + b_down

(limit 7, alpha 1.702). The experts are stacked like ``models/moe.py``'s (``gate_up_proj``
[E, 2I, H] gate rows then up rows, plus biases); HF checkpoints hold them input-major with
gate/up columns interleaved, often as MXFP4 blocks — ``loaders/hf_experts.py`` turns both into
the stacked names, and a GGUF's ``ffn_{gate,up,down}_exps`` (MXFP4 or float) are them already.
On CUDA MXFP4 experts stay the file's bytes (two E2M1 codes a byte + the E8M0 byte per 32, 4.25
bits a weight; ``PENSIEVE_MXFP4_INT8=1``: int8 codes × a float16 power of two per 32, ~1.06 bytes
a weight) on ``backends/cuda_moe``'s fused kernels, biases and clamp in their epilogues
(``cuda_moe_codes``); elsewhere, or where an exponent does not fit the form, MXFP4 is
dequantised.

Fast paths: ``cuda_moe_codes`` only. The compiled paged kernels (CPU and Triton) have no sinks,
the Llama-block kernels no biased clamped experts; ``paged_attention`` with sinks always takes
the per-sequence path, also where the runner handed it a kernel backend (on CUDA the hybrid
layout's kernels, ``backends/cuda_hybrid.py``, take the sinks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.models.args import ModelArgs, MoEArgs
from pensieve.models.config import gguf_args, hf_args
from pensieve.models.family import (
    GLOBAL_NAMES, Family, FastPaths, GGUFNames, GGUFSource, ModelConfigError, Shapes,
)
from pensieve.models.forward_context import ForwardContext, paged_attention
from pensieve.models.llama import Attention, CosSin, LlamaForCausalLM, RMSNorm
from pensieve.models.moe import capturing, hf_int, pick_linear

SWIGLU_LIMIT, SWIGLU_ALPHA = 7.0, 1.702  # llama.cpp's constants; HF configs may say otherwise


class SinkAttention(Attention):
    """The Llama attention (fused biased qkv, biased o) with a sink logit per query head."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer)
        self.sinks = nn.Parameter(torch.empty(args.num_heads))

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # applies RoPE to q and k
        out = paged_attention(self.layer, q, k, v, ctx, cos_sin, window=self.window,
                              sinks=self.sinks)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class Router(nn.Module):
    """Token → (weights [T, k], expert ids [T, k]): top-k of the biased logits, softmax over
    those k (transformers' order of ops, so ties pick what it picks)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.moe.top_k
        self.weight = nn.Parameter(torch.empty(args.moe.num_experts, args.hidden_size))
        self.bias = nn.Parameter(torch.empty(args.moe.num_experts))
        # a backend's one-launch top-k + softmax (``backends/cuda_router.topk_softmax``)
        self.kernel: Any = None
        # ... and its GEMM + selection in one launch, None past its batch
        # (``backends/cuda_router_fused.FusedRouter``)
        self.fused: Any = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None and (picked := self.fused(x)) is not None:
            return picked
        logits = F.linear(x, self.weight, self.bias)
        if self.kernel is not None:
            return self.kernel(logits, self.top_k)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype), ids


class BiasedExpertWeights(nn.Module):
    """One projection of every expert: ``weight`` [E, out, in], ``bias`` [E, out]."""

    def __init__(self, experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(experts, out_features))


class ClampedSwiGLUExperts(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        moe = args.moe
        self.num_experts = moe.num_experts
        self.gate_up_proj = BiasedExpertWeights(moe.num_experts, 2 * moe.expert_size,
                                                args.hidden_size)
        self.down_proj = BiasedExpertWeights(moe.num_experts, args.hidden_size, moe.expert_size)
        self.limit = float(args.extra.get("swiglu_limit", SWIGLU_LIMIT))
        self.alpha = float(args.extra.get("swiglu_alpha", SWIGLU_ALPHA))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/ids [T, k] → Σ_picks weight · expert(x), [T, H]; (token, pick)
        rows grouped by expert, each expert's rows one matmul, summed in expert order."""
        if capturing(x):
            return self.gathered(x, weights, ids)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        tokens = order // k
        rows = x[tokens]
        out = torch.empty_like(rows)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        gu, down = self.gate_up_proj, self.down_proj
        start = 0
        for e, n in enumerate(counts):
            if n:
                part = rows[start:start + n]
                gate, up = F.linear(part, gu.weight[e], gu.bias[e]).chunk(2, dim=-1)
                out[start:start + n] = F.linear(self._glu(gate, up), down.weight[e], down.bias[e])
                start += n
        out = out * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, out)

    def _glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``forward`` with no host counts (what a CUDA graph captures): each pick's expert
        weights gathered (``moe.pick_linear``)."""
        gu, down = self.gate_up_proj, self.down_proj
        gate, up = pick_linear(x, ids, gu.weight, bias=gu.bias).chunk(2, dim=-1)
        out = pick_linear(self._glu(gate, up), None, down.weight, ids, down.bias)
        return (out * weights.reshape(-1, 1)).view(*ids.shape, -1).sum(dim=1)


class GptOssMoE(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.router = Router(args)
        self.experts = ClampedSwiGLUExperts(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        return self.experts(x, weights, ids)


class GptOssDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = SinkAttention(args, layer)
        self.mlp = GptOssMoE(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssForCausalLM(LlamaForCausalLM):
    PACKED = {**LlamaForCausalLM.PACKED,
              "mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj")}
    LAYER = GptOssDecoderLayer


# --- config, names, weights ------------------------------------------------------------------

def _layer_types(types: Any, layers: int) -> tuple[str, ...]:
    """``layer_types`` as given, else transformers' default: even layers sliding."""
    if types is None:
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                     for i in range(layers))
    types = tuple(str(t) for t in types)
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ModelConfigError(f"layer_types {list(types)} do not fit {layers} layers")
    return types


def _yarn_default() -> dict[str, Any]:
    """transformers' gpt-oss RoPE when a config gives none (YaRN ×32 over 4096, untruncated)."""
    return {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 4096}


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    layers = int(config.get("num_hidden_layers", 0))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or _yarn_default()
    rope = {"rope_theta": config.get("rope_theta") or 150000.0, **rope}
    moe = MoEArgs(num_experts=hf_int(config, "num_local_experts", "num_experts"),
                  top_k=hf_int(config, "num_experts_per_tok", "experts_per_token"),
                  expert_size=hf_int(config, "intermediate_size"))
    window = config.get("sliding_window")
    return hf_args(
        {**config, "rope_parameters": rope, "rope_scaling": None}, "gpt_oss",
        attention_bias=bool(config.get("attention_bias", True)), moe=moe,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        sliding_window=int(window) if window else None,
        layer_types=_layer_types(config.get("layer_types"), layers),
        extra={"swiglu_limit": float(config.get("swiglu_limit", SWIGLU_LIMIT)),
               "swiglu_alpha": float(config.get("swiglu_alpha", SWIGLU_ALPHA))})


def _gguf(src: GGUFSource) -> ModelArgs:
    """llama.cpp's keys; its YaRN ramp is the reference's untruncated one, and the windowed
    layers follow ``attention.sliding_window_pattern`` (default: every other, from 0)."""
    size = int(src.key("expert_feed_forward_length"))
    layers = int(src.key("block_count"))
    pattern = src.key("attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):
        swa = [bool(p) for p in pattern]
    else:
        n = int(pattern)
        swa = [n == 0 or i % n < n - 1 for i in range(layers)]
    types = tuple("sliding_attention" if s else "full_attention" for s in swa)
    args = gguf_args(src, "gpt_oss", intermediate_size=size,
                     moe=MoEArgs(num_experts=int(src.key("expert_count")),
                                 top_k=int(src.key("expert_used_count")), expert_size=size),
                     attention_bias=True, sliding_window=int(src.key("attention.sliding_window")),
                     layer_types=_layer_types(types, layers),
                     extra={"swiglu_limit": SWIGLU_LIMIT, "swiglu_alpha": SWIGLU_ALPHA})
    if args.rope_scaling and args.rope_scaling.get("rope_type") == "yarn":
        args = replace(args, rope_scaling={**args.rope_scaling, "truncate": False})
    return args


def _shapes(args: ModelArgs) -> Shapes:
    h, hd, e, inner = args.hidden_size, args.head_dim, args.moe.num_experts, args.moe.expert_size
    q_rows, kv_rows = args.num_heads * hd, args.num_kv_heads * hd
    shapes: Shapes = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,),
                      "lm_head.weight": (args.vocab_size, h)}
    if args.tie_word_embeddings:
        del shapes["lm_head.weight"]
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        for name, rows, cols in (("q_proj", q_rows, h), ("k_proj", kv_rows, h),
                                 ("v_proj", kv_rows, h), ("o_proj", h, q_rows)):
            shapes[f"{p}self_attn.{name}.weight"] = (rows, cols)
            shapes[f"{p}self_attn.{name}.bias"] = (rows,)
        shapes.update({
            p + "self_attn.sinks": (args.num_heads,),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "mlp.router.weight": (e, h), p + "mlp.router.bias": (e,),
            p + "mlp.experts.gate_proj.weight": (e, inner, h),
            p + "mlp.experts.gate_proj.bias": (e, inner),
            p + "mlp.experts.up_proj.weight": (e, inner, h),
            p + "mlp.experts.up_proj.bias": (e, inner),
            p + "mlp.experts.down_proj.weight": (e, h, inner),
            p + "mlp.experts.down_proj.bias": (e, h),
        })
    return shapes


def _paths(args: ModelArgs, context_length: int) -> FastPaths:
    return FastPaths(cuda_moe_codes=True)


GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_sinks.weight": "self_attn.sinks",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.router",
    "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}

FAMILY = Family(
    name="gpt_oss",
    gguf_architectures=("gpt-oss",),
    hf_model_types=("gpt_oss",),
    model=GptOssForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, GGUF_BLOCK_NAMES),
    expected_shapes=_shapes,
    fast_paths=_paths,
    hf_expert_layout="gpt_oss",
)
