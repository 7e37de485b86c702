"""Qwen3-Next (Qwen3-Next-80B-A3B): a hybrid of Gated DeltaNet layers (linear attention with a
recurrent state) and gated full-attention layers, one full every ``full_attention_interval``
(4); MoE MLPs with a sigmoid-gated shared expert. Qwen3.5 (``models/qwen3_5.py``) reuses these
blocks.

- Gated DeltaNet (``GatedDeltaNet``): projections to q, k, v (through a depthwise causal conv1d
  + SiLU), z (the output gate), b (β = sigmoid b) and a (decay g = −exp(A_log)·softplus(a + dt_bias));
  the gated delta rule (``models/gated_delta.py``); a gated RMSNorm (w·norm(o)·SiLU(z)); out_proj.
  It keeps its conv inputs and its state per request in ``ctx.states`` (``cache_spec.RecurrentState``).
- Gated attention: q_proj yields each head's query and a gate (interleaved per head), q/k
  RMSNorm, RoPE on the first quarter of each head (partial rotary), output · sigmoid(gate).
- Every RMSNorm but the gated one multiplies by ``1 + w``; the module keeps the effective
  weight: an HF checkpoint gets ``+ 1`` on load, a GGUF already stores it so.

Checkpoint layouts, taken as they are (no row shuffles on load, so quantised codes stay whole):
HF Qwen3-Next fuses ``in_proj_qkvz`` and ``in_proj_ba`` with one group per key head
(``interleaved``); its GGUF splits qkv/z flat but keeps ``ssm_ba`` grouped; Qwen3.5 writes them
apart (``flat``), and its GGUFs order value heads ``tiled`` (see ``gated_delta.expand_heads``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.models.args import ModelArgs, MoEArgs
from pensieve.models.cache_spec import LayerCache, PagedKV, RecurrentState
from pensieve.models.config import gguf_args, hf_args
from pensieve.models.family import (
    GLOBAL_NAMES, LLAMA_BLOCK_NAMES, QK_NORM_NAMES, Family, FastPaths, GGUFNames, GGUFSource,
    ModelConfigError,
)
from pensieve.models.forward_context import ForwardContext, paged_attention
from pensieve.models.gated_delta import causal_conv1d, causal_conv1d_step, gated_delta_rule
from pensieve.models.llama import MLP, CosSin, LlamaForCausalLM, RMSNorm
from pensieve.models.moe import EXPERT_PACKED, MOE_GGUF_NAMES, MoE, gguf_moe, shared_gguf_names

LINEAR, FULL = "linear_attention", "full_attention"


@dataclass(frozen=True)
class GatedDeltaArgs:
    """A Gated DeltaNet layer's shape and its checkpoint's layout (``ModelArgs.extra["gated_delta"]``).

    ``qkvz`` / ``ba``: "flat" (all q, all k, all v, all z; all b, all a) or "interleaved" (one
    group per key head: q, k, its value heads' v, z; b, a). ``order``: which key head a value
    head reads ("grouped" or "tiled"). ``conv_2d``: the conv weight stored [C, K] (GGUF), not
    [C, 1, K]."""

    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_kernel: int
    qkvz: str = "flat"
    ba: str = "flat"
    order: str = "grouped"
    conv_2d: bool = False

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim


def delta_args(args: ModelArgs) -> GatedDeltaArgs:
    return args.extra["gated_delta"]


class GatedRMSNorm(nn.Module):
    """RMSNorm over each value head, times SiLU of the gate (a plain ``w``, not ``1 + w``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return (self.weight * normed * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.d = d = delta_args(args)
        self.key_size, self.value_size = d.key_heads * d.key_dim, d.value_heads * d.value_dim
        h = args.hidden_size
        self.in_proj_qkvz = nn.Linear(h, 2 * self.key_size + 2 * self.value_size, bias=False)
        self.in_proj_ba = nn.Linear(h, 2 * d.value_heads, bias=False)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(d.conv_channels, 1, d.conv_kernel))
        self.dt_bias = nn.Parameter(torch.ones(d.value_heads))
        self.A_log = nn.Parameter(torch.zeros(d.value_heads))
        self.norm = GatedRMSNorm(d.value_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_size, h, bias=False)

    def _split(self, x: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(conv input [T, C] = q|k|v flat, z [T, Hv, Dv], b, a [T, Hv])."""
        d, t = self.d, x.shape[0]
        qkvz, ba = self.in_proj_qkvz(x), self.in_proj_ba(x)
        if d.qkvz == "interleaved":
            r = d.value_heads // d.key_heads
            q, k, v, z = qkvz.view(t, d.key_heads, -1).split(
                [d.key_dim, d.key_dim, r * d.value_dim, r * d.value_dim], dim=-1)
            mixed = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
        else:
            mixed, z = qkvz.split([2 * self.key_size + self.value_size, self.value_size], dim=-1)
        if d.ba == "interleaved":
            b, a = ba.view(t, d.key_heads, -1).chunk(2, dim=-1)
            b, a = b.reshape(t, -1), a.reshape(t, -1)
        else:
            b, a = ba.chunk(2, dim=-1)
        return mixed, z.reshape(t, d.value_heads, d.value_dim), b, a

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        d, t = self.d, x.shape[0]
        mixed, z, b, a = self._split(x)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        out = self._mix(mixed, g, beta, ctx)
        out = self.norm(out, z).reshape(t, self.value_size)
        return self.out_proj(out)

    def _mix(self, mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
             ctx: ForwardContext) -> torch.Tensor:
        """Conv + delta rule per sequence, each from and back into its own state slot: the
        single-token rows (decodes) batched in one recurrent step, each longer chunk alone."""
        states = ctx.states
        if states is None or states.conv[self.layer] is None:
            raise RuntimeError(f"layer {self.layer} is recurrent: ForwardContext.states is needed")
        conv, ssm, weight = states.conv[self.layer], states.ssm[self.layer], self.conv1d.weight
        weight = weight.reshape(weight.shape[0], -1)
        out = mixed.new_empty(mixed.shape[0], self.d.value_heads, self.d.value_dim)
        singles = [i for i, s in enumerate(ctx.sequences) if s.query_len == 1]
        if singles:
            rows = torch.tensor([ctx.sequences[i].query_start for i in singles], device=mixed.device)
            slots = states.slots[singles]
            cached = torch.tensor([ctx.sequences[i].context_len > 1 for i in singles],
                                  device=mixed.device)
            conv_in = torch.where(cached.view(-1, 1, 1), conv[slots], 0.0)
            ssm_in = torch.where(cached.view(-1, 1, 1, 1), ssm[slots], 0.0)
            y, conv_out = causal_conv1d_step(mixed[rows], weight, conv_in)
            o, ssm_out = self._rule(y.unsqueeze(1), g[rows].unsqueeze(1), beta[rows].unsqueeze(1),
                                    ssm_in, decode=True)
            out[rows] = o[:, 0]
            conv.index_copy_(0, slots, conv_out.to(conv.dtype))
            ssm.index_copy_(0, slots, ssm_out.to(ssm.dtype))
        for i, seq in enumerate(ctx.sequences):
            if seq.query_len == 1:
                continue
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            slot = states.slots[i:i + 1]
            cached = seq.context_len > seq.query_len
            y, conv_out = causal_conv1d(mixed[rows], weight, conv[slot][0] if cached else None)
            o, ssm_out = self._rule(y.unsqueeze(0), g[rows].unsqueeze(0), beta[rows].unsqueeze(0),
                                    ssm[slot] if cached else None, decode=False)
            out[rows] = o[0]
            conv.index_copy_(0, slot, conv_out.unsqueeze(0).to(conv.dtype))
            ssm.index_copy_(0, slot, ssm_out.to(ssm.dtype))
        return out

    def _rule(self, y: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              state: torch.Tensor | None, *, decode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d
        bsz, t = y.shape[:2]
        q, k, v = y.split([self.key_size, self.key_size, self.value_size], dim=-1)
        q = q.reshape(bsz, t, d.key_heads, d.key_dim)
        k = k.reshape(bsz, t, d.key_heads, d.key_dim)
        v = v.reshape(bsz, t, d.value_heads, d.value_dim)
        return gated_delta_rule(q, k, v, g, beta, state, order=d.order, decode=decode)


class GatedAttention(nn.Module):
    """Full attention whose q_proj also yields a per-head output gate."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads = layer, args.num_heads, args.num_kv_heads
        self.head_dim = hd = args.head_dim
        self.q_size, self.kv_size = 2 * args.num_heads * hd, args.num_kv_heads * hd
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=args.attention_bias)
        self.o_proj = nn.Linear(args.num_heads * hd, args.hidden_size, bias=args.attention_bias)
        self.q_norm = RMSNorm(hd, args.rms_norm_eps)
        self.k_norm = RMSNorm(hd, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        qg, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, gate = qg.view(t, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(k.view(t, self.kv_heads, self.head_dim))
        v = v.view(t, self.kv_heads, self.head_dim)
        out = paged_attention(self.layer, q, k, v, ctx, cos_sin).reshape(t, -1)
        return self.o_proj(out * torch.sigmoid(gate.reshape(t, -1)))


class HybridDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.linear = args.layer_types[layer] == LINEAR
        if self.linear:
            self.linear_attn = GatedDeltaNet(args, layer)
        else:
            self.self_attn = GatedAttention(args, layer)
        self.mlp = MoE(args) if args.moe and layer not in args.moe.dense_layers else MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + (self.linear_attn(h, ctx) if self.linear else self.self_attn(h, cos_sin, ctx))
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridForCausalLM(LlamaForCausalLM):
    PACKED = {
        **LlamaForCausalLM.PACKED, **EXPERT_PACKED,
        "linear_attn.in_proj_qkvz": ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"),
        "linear_attn.in_proj_ba": ("linear_attn.in_proj_b", "linear_attn.in_proj_a"),
    }
    LAYER = HybridDecoderLayer


# --- what the hybrid families share --------------------------------------------------------

def layer_types(n: int, interval: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % interval == 0 else LINEAR for i in range(n))


def hybrid_layout(args: ModelArgs) -> tuple[LayerCache, ...]:
    """Recurrent state for the Gated DeltaNet layers, paged K/V for the full-attention ones."""
    d = delta_args(args)
    recurrent = RecurrentState((d.conv_channels, d.conv_kernel - 1),
                               (d.value_heads, d.key_dim, d.value_dim))
    return tuple(recurrent if kind == LINEAR else
                 PagedKV(args.num_kv_heads, args.head_dim, args.head_dim)
                 for kind in args.layer_types)


def no_fast_paths(args: ModelArgs, context_length: int) -> FastPaths:
    """None: the compiled paged kernels rotate whole heads and attend over a uniform cache, the
    Llama-block kernels know neither gates nor recurrent layers."""
    return FastPaths()


def hf_delta(config: Mapping[str, Any], **layout: Any) -> GatedDeltaArgs:
    try:
        return GatedDeltaArgs(
            key_heads=int(config["linear_num_key_heads"]),
            value_heads=int(config["linear_num_value_heads"]),
            key_dim=int(config["linear_key_head_dim"]),
            value_dim=int(config["linear_value_head_dim"]),
            conv_kernel=int(config.get("linear_conv_kernel_dim", 4)), **layout)
    except KeyError as exc:
        raise ModelConfigError(f"config.json lacks {exc.args[0]!r}") from exc


def hf_hybrid(config: Mapping[str, Any], architecture: str, delta: GatedDeltaArgs,
              **overrides: Any) -> ModelArgs:
    n = int(config["num_hidden_layers"])
    kinds = tuple(config.get("layer_types") or layer_types(
        n, int(config.get("full_attention_interval", 4))))
    rope = config.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 0.25
    return hf_args(config, architecture, qk_norm=True, layer_types=kinds,
                   head_dim=int(config.get("head_dim") or 256),
                   partial_rotary_factor=float(partial), extra={"gated_delta": delta}, **overrides)


def hf_shared_moe(config: Mapping[str, Any], norm_topk: bool | None = None) -> MoEArgs | None:
    """Qwen-MoE experts with a sigmoid-gated shared expert (None when the config has none)."""
    from pensieve.models.qwen3_moe import hf_moe

    if not config.get("num_experts"):
        return None
    moe = hf_moe(config, shared_size=int(config.get("shared_expert_intermediate_size") or 0),
                 shared_gate=True)
    if norm_topk is not None:
        moe = replace(moe, norm_topk=norm_topk)
    return moe


def gguf_hybrid(src: GGUFSource, architecture: str, delta_layout: Mapping[str, Any],
                **overrides: Any) -> ModelArgs:
    """The ``{arch}.ssm.*`` keys of llama.cpp's Qwen3-Next/3.5 files; MTP layers are counted in
    ``block_count`` (``nextn_predict_layers`` of them, after the decoder's) and left out."""
    n = int(src.key("block_count")) - int(src.key("nextn_predict_layers", 0) or 0)
    value_heads = int(src.key("ssm.time_step_rank"))
    delta = GatedDeltaArgs(
        key_heads=int(src.key("ssm.group_count")), value_heads=value_heads,
        key_dim=int(src.key("ssm.state_size")),
        value_dim=int(src.key("ssm.inner_size")) // value_heads,
        conv_kernel=int(src.key("ssm.conv_kernel")), conv_2d=True, **delta_layout)
    recurrent = src.key("attention.recurrent_layers", None)
    kinds = (tuple(LINEAR if r else FULL for r in recurrent[:n]) if isinstance(recurrent, list)
             else layer_types(n, int(src.key("full_attention_interval", 4))))
    head_dim = int(src.key("attention.key_length"))
    rotary = int(src.key("rope.dimension_count", head_dim // 4))
    return gguf_args(src, architecture, num_layers=n, head_dim=head_dim, qk_norm=True,
                     layer_types=kinds, partial_rotary_factor=rotary / head_dim,
                     rms_norm_eps=float(src.key("attention.layer_norm_rms_epsilon", 1e-6)),
                     extra={"gated_delta": delta}, **overrides)


def hybrid_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight, in the checkpoint's names (Qwen3.5's split projections unless Qwen3-Next's
    HF layout fuses them)."""
    d, h, hd = delta_args(args), args.hidden_size, args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    key_size, value_size = d.key_heads * d.key_dim, d.value_heads * d.value_dim
    for i, kind in enumerate(args.layer_types):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
        if kind == LINEAR:
            a = p + "linear_attn."
            if d.qkvz == "interleaved":
                shapes[a + "in_proj_qkvz.weight"] = (2 * key_size + 2 * value_size, h)
            else:
                shapes[a + "in_proj_qkv.weight"] = (2 * key_size + value_size, h)
                shapes[a + "in_proj_z.weight"] = (value_size, h)
            if d.ba == "interleaved":
                shapes[a + "in_proj_ba.weight"] = (2 * d.value_heads, h)
            else:
                shapes[a + "in_proj_b.weight"] = shapes[a + "in_proj_a.weight"] = (d.value_heads, h)
            shapes[a + "conv1d.weight"] = ((d.conv_channels, d.conv_kernel) if d.conv_2d
                                           else (d.conv_channels, 1, d.conv_kernel))
            shapes[a + "dt_bias"] = shapes[a + "A_log"] = (d.value_heads,)
            shapes[a + "norm.weight"] = (d.value_dim,)
            shapes[a + "out_proj.weight"] = (h, value_size)
        else:
            s = p + "self_attn."
            shapes[s + "q_proj.weight"] = (2 * args.num_heads * hd, h)
            shapes[s + "k_proj.weight"] = shapes[s + "v_proj.weight"] = (args.num_kv_heads * hd, h)
            shapes[s + "o_proj.weight"] = (h, args.num_heads * hd)
            shapes[s + "q_norm.weight"] = shapes[s + "k_norm.weight"] = (hd,)
        shapes.update(_mlp_shapes(args, i))
    return shapes


def _mlp_shapes(args: ModelArgs, i: int) -> dict[str, tuple[int, ...]]:
    p, h, moe = f"model.layers.{i}.mlp.", args.hidden_size, args.moe
    if moe is None or i in moe.dense_layers:
        inner = args.intermediate_size
        return {p + "gate_proj.weight": (inner, h), p + "up_proj.weight": (inner, h),
                p + "down_proj.weight": (h, inner)}
    e, inner, s = moe.num_experts, moe.expert_size, moe.shared_size
    return {p + "gate.weight": (e, h), p + "experts.gate_proj.weight": (e, inner, h),
            p + "experts.up_proj.weight": (e, inner, h), p + "experts.down_proj.weight": (e, h, inner),
            p + "shared_expert.gate_proj.weight": (s, h), p + "shared_expert.up_proj.weight": (s, h),
            p + "shared_expert.down_proj.weight": (h, s), p + "shared_expert_gate.weight": (1, h)}


def from_hf_weight(name: str, weight: torch.Tensor) -> torch.Tensor:
    """The (1 + w) norms' effective weight (the gated norm keeps its plain w)."""
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return weight + 1
    return weight


def from_gguf_weight(name: str, weight: torch.Tensor) -> torch.Tensor:
    """llama.cpp stores −exp(A_log) as ``ssm_a`` and the conv kernel as [C, K]."""
    if name.endswith("linear_attn.A_log"):
        return torch.log(-weight)
    if name.endswith("linear_attn.conv1d.weight") and weight.ndim == 2:
        return weight.unsqueeze(1)
    return weight


@dataclass(frozen=True)
class HybridGGUFNames(GGUFNames):
    """Plus ``blk.N.ssm_a`` (no suffix) and the MTP blocks' ``blk.N.nextn.*``."""

    _EXTRA_RE = re.compile(r"blk\.(\d+)\.(ssm_a|nextn\.[a-z_]+\.weight)")

    def hf_name(self, gguf_name: str) -> str | None:
        m = self._EXTRA_RE.fullmatch(gguf_name)
        if m:
            part = "linear_attn.A_log" if m.group(2) == "ssm_a" else m.group(2)
            return f"model.layers.{m.group(1)}.{part}"
        return super().hf_name(gguf_name)


HYBRID_BLOCK_NAMES = {
    **{k: v for k, v in LLAMA_BLOCK_NAMES.items() if k != "ffn_norm"}, **QK_NORM_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z",
    "ssm_ba": "linear_attn.in_proj_ba", "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a", "ssm_conv1d": "linear_attn.conv1d",
    "ssm_dt.bias": "linear_attn.dt_bias", "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
    **MOE_GGUF_NAMES, **shared_gguf_names("shared_expert"),
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
HYBRID_GGUF_NAMES = HybridGGUFNames(GLOBAL_NAMES, HYBRID_BLOCK_NAMES)


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    delta = hf_delta(config, qkvz="interleaved", ba="interleaved")
    return hf_hybrid(config, "qwen3_next", delta, moe=hf_shared_moe(config))


def _gguf(src: GGUFSource) -> ModelArgs:
    moe = gguf_moe(src, norm_topk=True, shared_gate=True) if src.key("expert_count", 0) else None
    return gguf_hybrid(src, "qwen3_next", {"ba": "interleaved"}, moe=moe)


FAMILY = Family(
    name="qwen3_next",
    gguf_architectures=("qwen3next",),
    hf_model_types=("qwen3_next",),
    model=HybridForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=HYBRID_GGUF_NAMES,
    expected_shapes=hybrid_shapes,
    fast_paths=no_fast_paths,
    from_hf_weight=from_hf_weight,
    from_gguf_weight=from_gguf_weight,
    cache_layout=hybrid_layout,
    drops_mtp=True,
)
