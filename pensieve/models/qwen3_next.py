"""Qwen3-Next (Qwen3-Next-80B-A3B): a hybrid of Gated DeltaNet layers (linear attention with a
recurrent state) and gated full-attention layers, one full every ``full_attention_interval``
(4); MoE MLPs with a sigmoid-gated shared expert. Qwen3.5 (``models/qwen3_5.py``) reuses these
blocks; what both read from configs and checkpoints is ``models/hybrid_config.py``.

- Gated DeltaNet (``GatedDeltaNet``): projections to q, k, v (through a depthwise causal conv1d
  + SiLU), z (the output gate), b (β = sigmoid b) and a (decay g = −exp(A_log)·softplus(a + dt_bias));
  the gated delta rule (``models/gated_delta.py``); a gated RMSNorm (w·norm(o)·SiLU(z)); out_proj.
  It keeps its conv inputs and its state per request in ``ctx.states`` (``cache_spec.RecurrentState``).
- Gated attention: q_proj yields each head's query and a gate (interleaved per head), q/k
  RMSNorm, RoPE on the first quarter of each head (partial rotary), output · sigmoid(gate).
- Every RMSNorm but the gated one multiplies by ``1 + w`` (``OffsetRMSNorm``), in float32 as
  the reference does: the module keeps HF's w (a GGUF's stored 1 + w gets the 1 taken off), so a
  bf16 model does not round 1 + w to bf16 (that cost MoE routing picks: 1.5-2x the reference's
  bf16 logit error on the tiny MoE configs).

Checkpoint layouts, taken as they are (no row shuffles on load, so quantised codes stay whole):
HF Qwen3-Next fuses ``in_proj_qkvz`` and ``in_proj_ba`` with one group per key head
(``interleaved``); its GGUF splits qkv/z flat but keeps ``ssm_ba`` grouped; Qwen3.5 writes them
apart (``flat``), and its GGUFs order value heads ``tiled`` (see ``gated_delta.expand_heads``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.models.args import ModelArgs
from pensieve.models.family import Family, GGUFSource
from pensieve.models.forward_context import ForwardContext, paged_attention
from pensieve.models.gated_delta import causal_conv1d, causal_conv1d_step, gated_delta_rule
from pensieve.models.hybrid_config import (
    HYBRID_GGUF_NAMES, LINEAR, delta_args, from_gguf_weight, gguf_hybrid,
    hf_delta, hf_hybrid, hf_shared_moe, hybrid_layout, hybrid_shapes, hybrid_paths,
)
from pensieve.models.llama import MLP, CosSin, LlamaForCausalLM
from pensieve.models.moe import EXPERT_PACKED, MoE, gguf_moe


class OffsetRMSNorm(nn.Module):
    """RMSNorm times ``1 + w``, computed in float32 (``weight`` holds w, as HF does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        # a backend's one-launch form (``backends/cuda_offset_norm.offset_rms_norm``)
        self.kernel: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype != torch.float32:
            return self.kernel(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight + 1.0, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


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
    """One linear-attention layer: fused projections in the checkpoint's layout (``_split``),
    conv + gated delta rule per sequence against its state slot (``_mix``), gated norm, out."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.d = d = delta_args(args)
        self.key_size, self.value_size = d.key_heads * d.key_dim, d.value_heads * d.value_dim
        h = args.hidden_size
        self.in_proj_qkvz = nn.Linear(h, 2 * self.key_size + 2 * self.value_size, bias=False)
        self.in_proj_ba = nn.Linear(h, 2 * d.value_heads, bias=False)
        self.conv1d = nn.Module()  # a holder, so the kernel keeps HF's name conv1d.weight
        self.conv1d.weight = nn.Parameter(torch.empty(d.conv_channels, 1, d.conv_kernel))
        self.dt_bias = nn.Parameter(torch.ones(d.value_heads))
        self.A_log = nn.Parameter(torch.zeros(d.value_heads))
        self.norm = GatedRMSNorm(d.value_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_size, h, bias=False)
        # a backend's fused step (``backends/cuda_gdn.GatedDeltaKernel``): (module, mixed, a, b,
        # z, ctx) → the normed output [T, Hv, Dv]; None: the torch path below
        self.step_kernel: Any = None

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
        t = x.shape[0]
        mixed, z, b, a = self._split(x)
        if self.step_kernel is not None and ctx.states is not None:
            out = self.step_kernel(self, mixed, a, b, z, ctx)
            return self.out_proj(out.reshape(t, self.value_size))
        beta, g = self._gates(b, a)
        out = self._mix(mixed, g, beta, ctx)
        out = self.norm(out, z).reshape(t, self.value_size)
        return self.out_proj(out)

    def _gates(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(β = sigmoid b, g = −exp(A_log)·softplus(a + dt_bias))."""
        return b.sigmoid(), -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())

    def torch_sequence(self, mixed: torch.Tensor, z: torch.Tensor, b: torch.Tensor,
                       a: torch.Tensor, ctx: ForwardContext, i: int, out: torch.Tensor) -> None:
        """Sequence ``i`` of the step on the torch path (a ``step_kernel`` leaves it the chunks
        it does not take): its normed output into ``out`` [T, Hv, Dv], its state advanced."""
        states = ctx.states
        assert states is not None
        seq = ctx.sequences[i]
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        beta, g = self._gates(b[rows], a[rows])
        weight = self.conv1d.weight.reshape(self.conv1d.weight.shape[0], -1)
        o = mixed.new_empty(seq.query_len, self.d.value_heads, self.d.value_dim)
        self._chunk(mixed[rows], g, beta, weight, states.conv[self.layer],
                    states.ssm[self.layer], states.slots[i:i + 1],
                    seq.context_len > seq.query_len, o)
        out[rows] = self.norm(o, z[rows])

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
        if states.cached is not None:  # static decode buffers: row i is sequence i's token
            rows = slice(0, mixed.shape[0])
            self._decode(mixed, g, beta, weight, conv, ssm, rows, states.slots, states.cached, out)
            return out
        singles = [i for i, s in enumerate(ctx.sequences) if s.query_len == 1]
        if singles:
            rows = torch.tensor([ctx.sequences[i].query_start for i in singles], device=mixed.device)
            cached = torch.tensor([ctx.sequences[i].context_len > 1 for i in singles],
                                  device=mixed.device)
            self._decode(mixed, g, beta, weight, conv, ssm, rows, states.slots[singles], cached,
                         out)
        for i, seq in enumerate(ctx.sequences):
            if seq.query_len == 1:
                continue
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            self._chunk(mixed[rows], g[rows], beta[rows], weight, conv, ssm,
                        states.slots[i:i + 1], seq.context_len > seq.query_len, out[rows])
        return out

    def _chunk(self, mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               weight: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, slot: torch.Tensor,
               cached: bool, out: torch.Tensor) -> None:
        """One sequence's chunk (rows of its own) from and back into its state ``slot``."""
        y, conv_out = causal_conv1d(mixed, weight, conv[slot][0] if cached else None)
        o, ssm_out = self._rule(y.unsqueeze(0), g.unsqueeze(0), beta.unsqueeze(0),
                                ssm[slot] if cached else None, decode=False)
        out.copy_(o[0])
        conv.index_copy_(0, slot, conv_out.unsqueeze(0).to(conv.dtype))
        ssm.index_copy_(0, slot, ssm_out.to(ssm.dtype))

    def _decode(self, mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                weight: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor,
                rows: slice | torch.Tensor, slots: torch.Tensor, cached: torch.Tensor,
                out: torch.Tensor) -> None:
        """One recurrent step of the decode ``rows`` from and back into their state ``slots``
        (read as zeros where not ``cached``): no host values, so a CUDA graph captures it."""
        conv_in = torch.where(cached.view(-1, 1, 1), conv[slots], 0.0)
        ssm_in = torch.where(cached.view(-1, 1, 1, 1), ssm[slots], 0.0)
        y, conv_out = causal_conv1d_step(mixed[rows], weight, conv_in)
        o, ssm_out = self._rule(y.unsqueeze(1), g[rows].unsqueeze(1), beta[rows].unsqueeze(1),
                                ssm_in, decode=True)
        out[rows] = o[:, 0]
        conv.index_copy_(0, slots, conv_out.to(conv.dtype))
        ssm.index_copy_(0, slots, ssm_out.to(ssm.dtype))

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
        self.q_norm = OffsetRMSNorm(hd, args.rms_norm_eps)
        self.k_norm = OffsetRMSNorm(hd, args.rms_norm_eps)

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
        self.input_layernorm = OffsetRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = OffsetRMSNorm(args.hidden_size, args.rms_norm_eps)

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

    def __init__(self, args: ModelArgs, max_positions: int | None = None) -> None:
        super().__init__(args, max_positions)
        self.model.norm = OffsetRMSNorm(args.hidden_size, args.rms_norm_eps)


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    delta = hf_delta(config, qkvz="interleaved", ba="interleaved")
    return hf_hybrid(config, "qwen3_next", delta, moe=hf_shared_moe(config))


def _gguf(src: GGUFSource) -> ModelArgs:
    moe = gguf_moe(src, norm_topk=True, shared_gate=True) if src.key("expert_count", 0) else None
    legacy = any(name.endswith(".ssm_in.weight") for name in src.shapes)  # qkvz in one tensor
    layout = {"ba": "interleaved", "qkvz": "interleaved" if legacy else "flat"}
    return gguf_hybrid(src, "qwen3_next", layout, moe=moe)


FAMILY = Family(
    name="qwen3_next",
    gguf_architectures=("qwen3next",),
    hf_model_types=("qwen3_next",),
    model=HybridForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=HYBRID_GGUF_NAMES,
    expected_shapes=hybrid_shapes,
    fast_paths=hybrid_paths,
    from_gguf_weight=from_gguf_weight,
    cache_layout=hybrid_layout,
    drops_mtp=True,
)
