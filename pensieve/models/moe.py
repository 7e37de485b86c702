"""Mixture-of-experts MLPs and the decoder block that carries them (Qwen3-MoE, Qwen2-MoE,
Mixtral, GLM-4.5/4.6), shared by those families' files.

Reads like the reference: Router → Experts → MoE block → Layer → Model, then what the families
share (config keys, GGUF names, expected weights, fast paths).

Experts are stacked 3-D weights, as transformers 5 holds them: ``experts.gate_up_proj.weight``
[E, 2I, H] (gate rows, then up rows) and ``experts.down_proj.weight`` [E, H, I]; checkpoints
give ``experts.{gate,up,down}_proj.weight`` [E, rows, K] (a GGUF's ``ffn_*_exps``, or an HF
folder's per-expert matrices stacked by ``loaders/hf_experts.py``) and ``PACKED`` fuses gate/up.

Routing is capacity-free and computed as the reference computes it (same ops, same order), so
ties pick what ``torch.topk`` picks there. The expert loop groups a batch's (token, pick) rows by
expert and runs each expert's rows as one matmul; contributions are summed per token in expert
order, as transformers sums them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.models.args import ModelArgs, MoEArgs
from pensieve.models.config import decoder_shapes
from pensieve.models.family import FastPaths, GGUFSource, ModelConfigError, Shapes
from pensieve.models.forward_context import ForwardContext
from pensieve.models.llama import (
    MLP, Attention, CosSin, LlamaForCausalLM, RMSNorm, activation, rotary_dim,
)


class Router(nn.Module):
    """Token → (weights [T, k], expert ids [T, k]) under ``MoEArgs.gating``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.moe = moe = args.moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, args.hidden_size))
        if moe.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(moe.num_experts))
        # a backend's one-launch softmax selection (``backends/cuda_router.softmax_topk``)
        self.kernel: Any = None
        # ... and sigmoid one: float32 logits → (weights, ids) (``cuda_router.sigmoid_router``)
        self.sigmoid_kernel: Any = None
        # a backend's GEMM + selection in one launch: x → (weights, ids), or None where the
        # batch is too long for it (``backends/cuda_router_fused.FusedRouter``)
        self.fused: Any = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None and (picked := self.fused(x)) is not None:
            return picked
        moe = self.moe
        if moe.gating == "sigmoid":
            logits = F.linear(x.float(), self.weight.float())
            if self.sigmoid_kernel is not None:
                return self.sigmoid_kernel(logits)
            return self._sigmoid(logits)
        logits = F.linear(x, self.weight)
        if self.kernel is not None:
            return self.kernel(logits, moe.top_k, moe.norm_topk, moe.scale, x.dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, ids = torch.topk(probs, moe.top_k, dim=-1)
        if moe.norm_topk:
            top = top / top.sum(dim=-1, keepdim=True)
        return (top * moe.scale if moe.scale != 1.0 else top).to(x.dtype), ids

    def _sigmoid(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3-style: choose by score + bias among the best groups (a group's worth is
        its two best biased scores), weigh by the unbiased scores."""
        moe, t = self.moe, logits.shape[0]
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float() if moe.correction_bias else scores
        if moe.n_group > 1:
            grouped = choice.view(t, moe.n_group, -1)
            best = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = torch.zeros_like(best).scatter_(
                1, torch.topk(best, moe.topk_group, dim=-1, sorted=False)[1], 1.0)
            mask = keep.bool().unsqueeze(-1).expand_as(grouped).reshape(t, -1)
            choice = choice.masked_fill(~mask, float("-inf"))
        ids = torch.topk(choice, moe.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if moe.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * moe.scale, ids


class ExpertWeights(nn.Module):
    """One projection of every expert: ``weight`` [E, out, in]."""

    def __init__(self, experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))


class Experts(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        moe = args.moe
        self.num_experts = moe.num_experts
        self.gate_up_proj = ExpertWeights(moe.num_experts, 2 * moe.expert_size, args.hidden_size)
        self.down_proj = ExpertWeights(moe.num_experts, args.hidden_size, moe.expert_size)
        self.act = activation(args.hidden_act)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/ids [T, k] → Σ_picks weight · expert(x), [T, H]."""
        if capturing(x):
            return self.gathered(x, weights, ids)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # (token, pick) rows grouped by expert
        tokens = order // k
        rows = x[tokens]
        out = torch.empty_like(rows)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n:
                part = rows[start:start + n]
                gate, up = F.linear(part, self.gate_up_proj.weight[e]).chunk(2, dim=-1)
                out[start:start + n] = F.linear(self.act(gate) * up, self.down_proj.weight[e])
                start += n
        # sigmoid routers weigh in float32 (as the reference): the product is cast back, as
        # transformers casts it before its index_add
        out = out * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, out.to(x.dtype))

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``forward`` with no host counts (what a CUDA graph captures): each pick's expert
        weights gathered and applied in one batched matmul (memory ∝ picks × expert size)."""
        gate, up = pick_linear(x, ids, self.gate_up_proj.weight).chunk(2, dim=-1)
        out = pick_linear(self.act(gate) * up, None, self.down_proj.weight, ids)
        out = out * weights.reshape(-1, 1)
        return out.to(x.dtype).view(*ids.shape, -1).sum(dim=1)


def capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s stream is being captured into a CUDA graph (no host syncs allowed)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def pick_linear(x: torch.Tensor, ids: torch.Tensor | None, weight: torch.Tensor,
                picked: torch.Tensor | None = None, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Per (token, pick) row its expert's linear map: x [T, K] with ``ids`` [T, k] (each token
    repeated per pick), or x [T·k, K] already per pick with ``picked`` [T, k] → [T·k, N]."""
    flat = (ids if ids is not None else picked).reshape(-1)
    rows = x.repeat_interleave(ids.shape[1], dim=0) if ids is not None else x
    out = torch.bmm(weight[flat], rows.unsqueeze(-1)).squeeze(-1)
    return out if bias is None else out + bias[flat]


def shared_mlp(args: ModelArgs) -> MLP:
    return MLP(replace(args, intermediate_size=args.moe.shared_size, mlp_bias=False))


class MoE(nn.Module):
    """Router + experts (+ a shared expert every token runs, optionally sigmoid-gated).
    ``SHARED``: the shared expert's HF attribute name."""

    SHARED = "shared_expert"

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        moe = args.moe
        self.gate = Router(args)
        self.experts = Experts(args)
        self.has_shared = moe.shared_size > 0
        if self.has_shared:
            setattr(self, self.SHARED, shared_mlp(args))
        if moe.shared_gate:
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)
        self.shared_gated = moe.shared_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.has_shared:
            shared = getattr(self, self.SHARED)(x)
            if self.shared_gated:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


class GLMMoE(MoE):
    SHARED = "shared_experts"


class MoEDecoderLayer(nn.Module):
    """The Llama block with an MoE MLP (a dense one on ``MoEArgs.dense_layers``)."""

    MOE: type[MoE] = MoE

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args) if layer in args.moe.dense_layers else self.MOE(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class GLMDecoderLayer(MoEDecoderLayer):
    MOE = GLMMoE


EXPERT_PACKED = {
    "mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj"),
    "mlp.shared_expert.gate_up_proj": ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
    "mlp.shared_experts.gate_up_proj": ("mlp.shared_experts.gate_proj",
                                        "mlp.shared_experts.up_proj"),
}


class MoEForCausalLM(LlamaForCausalLM):
    PACKED = {**LlamaForCausalLM.PACKED, **EXPERT_PACKED}
    LAYER = MoEDecoderLayer


class GLMForCausalLM(MoEForCausalLM):
    LAYER = GLMDecoderLayer


# --- what the MoE families share -------------------------------------------------------------

MOE_GGUF_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}


def shared_gguf_names(attr: str) -> dict[str, str]:
    return {f"ffn_{p}_shexp": f"mlp.{attr}.{p}_proj" for p in ("gate", "up", "down")}


def hf_int(config: Mapping[str, Any], *keys: str) -> int:
    """The first of ``keys`` config.json has (checkpoints and transformers versions spell the
    expert count differently), as an int; ModelConfigError when none is there."""
    for key in keys:
        if config.get(key) is not None:
            try:
                return int(config[key])
            except (TypeError, ValueError):
                raise ModelConfigError(f"config.json has a malformed {key!r}") from None
    raise ModelConfigError(f"config.json lacks {keys[0]!r}")


def qwen_dense_layers(config: Mapping[str, Any]) -> frozenset[int]:
    """Qwen-MoE's dense layers: ``mlp_only_layers``, and all but every
    ``decoder_sparse_step``-th."""
    step = int(config.get("decoder_sparse_step") or 1)
    only = set(config.get("mlp_only_layers") or ())
    return frozenset(i for i in range(int(config["num_hidden_layers"]))
                     if i in only or (i + 1) % step)


def gguf_moe(src: GGUFSource, **overrides: Any) -> MoEArgs:
    """MoEArgs from llama.cpp's ``{arch}.expert_*`` keys; ``overrides`` where llama.cpp fixes a
    value per architecture rather than reading it."""
    gating = int(src.key("expert_gating_func", 1))
    # Mixtral's files give the experts' width as the model's feed_forward_length only
    size = int(src.key("expert_feed_forward_length", None) or src.scalar("feed_forward_length"))
    # Qwen2-MoE writes the shared expert's width; DeepSeek-style files a count of experts' widths
    shared = src.key("expert_shared_feed_forward_length", None)
    shared = int(shared) if shared else size * int(src.key("expert_shared_count", 0))
    values: dict[str, Any] = dict(
        num_experts=int(src.key("expert_count")),
        top_k=int(src.key("expert_used_count")),
        expert_size=size,
        gating="sigmoid" if gating == 2 else "softmax",
        norm_topk=bool(src.key("expert_weights_norm", False)),
        scale=float(src.key("expert_weights_scale", 1.0) or 1.0),
        n_group=int(src.key("expert_group_count", 1) or 1),
        topk_group=int(src.key("expert_group_used_count", 1) or 1),
        shared_size=shared,
        dense_layers=frozenset(range(int(src.key("leading_dense_block_count", 0)))),
    )
    values.update(overrides)
    return MoEArgs(**values)


def moe_shapes(args: ModelArgs, shared: str = "shared_expert") -> Shapes:
    """``decoder_shapes`` with each sparse layer's MLP replaced by router, experts, shared."""
    moe, h = args.moe, args.hidden_size
    shapes = decoder_shapes(args)
    for i in range(args.num_layers):
        if i in moe.dense_layers:
            continue
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj", "down_proj"):
            shapes.pop(f"{p}{name}.weight")
        e, inner = moe.num_experts, moe.expert_size
        shapes.update({
            p + "gate.weight": (e, h),
            p + "experts.gate_proj.weight": (e, inner, h),
            p + "experts.up_proj.weight": (e, inner, h),
            p + "experts.down_proj.weight": (e, h, inner),
        })
        if moe.correction_bias:
            shapes[p + "gate.e_score_correction_bias"] = (e,)
        if moe.shared_size:
            s = moe.shared_size
            shapes.update({p + f"{shared}.gate_proj.weight": (s, h),
                           p + f"{shared}.up_proj.weight": (s, h),
                           p + f"{shared}.down_proj.weight": (h, s)})
        if moe.shared_gate:
            shapes[p + "shared_expert_gate.weight"] = (1, h)
    return shapes


def moe_paths(args: ModelArgs, context_length: int) -> FastPaths:
    """The compiled paged attention where no window masks and RoPE covers whole heads; expert
    codes sliced on the CPU kernels (``cpu_moe_codes``); on CUDA the block's fused kernels for
    SiLU experts (``cuda_fused_layers``: q/k norms inside RoPE, the post-attention add + norm,
    a dense or shared MLP's SiLU·mul — exact classes only); no CUDA graphs declared here (the
    expert loop reads per-expert counts on the host: the CUDA expert kernels turn them on).
    The CPU one-call decoder (``cpu_moe_decoder``) where a softmax router picks SiLU experts
    and no shared expert runs beside them (Qwen3-MoE, Mixtral) and no query scale applies."""
    whole = not args.windows_bind(context_length) and rotary_dim(args) == args.head_dim
    moe, silu = args.moe, args.hidden_act == "silu"
    one_call = (whole and silu and moe.gating == "softmax" and not moe.correction_bias
                and not moe.shared_size and not moe.shared_gate
                and args.query_pre_attn_scalar is None)
    return FastPaths(paged_kernels=whole, cpu_moe_codes=True, cuda_fused_layers=silu,
                     cpu_moe_decoder=one_call)
