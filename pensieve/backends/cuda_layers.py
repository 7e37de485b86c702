"""Fused steps of the Llama block on CUDA (one Triton kernel each) and fewer launches a layer.

``fuse_cuda_layers`` changes the class of each ``models.llama.MLP`` to ``CudaMLP``, of each
``DecoderLayer`` to ``CudaDecoderLayer``, of each q/k-normed ``Attention`` (Qwen3) to
``CudaAttention`` and of a ``LlamaBody`` whose layers all became ``CudaDecoderLayer`` to
``CudaLlamaBody`` — same children, same state dict, only ``forward``/``run`` differ — so the
model file keeps reading like the reference:

* ``silu_mul``: SiLU(gate)·up straight from the fused gate/up output. PyTorch runs SiLU on the
  strided half, then the product: three passes over [T, 2I] instead of one and a half (~6%
  of a 2048-token prefill step on an H100).
* ``add_rms_norm``: a residual add and the RMSNorm after it in one pass — the post-attention
  norm in each layer and, in ``CudaLlamaBody``, the end-of-layer add with the next layer's
  input norm (the last layer's with the final norm).
* Qwen3's per-head q/k RMSNorms inside ``rope_and_store`` (``cuda_rope_kernels.rope_norm``).
* at 1 row, SiLU·up in the int4 gate/up GEMV's epilogue (``plan_fused_mlps``, below).

Kernel launches of one dense decode layer (CUDA graphs on; batch 1 or 8):

======================  ================  =====================================================
step                    unfused           fused
======================  ================  =====================================================
input RMSNorm           1 (F.rms_norm)    0 (the previous layer's end add + norm; layer 0: 1)
qkv projection          1 GEMV (+1 bias)  1 GEMV (+1 bias: Qwen2)
q_norm, k_norm (Qwen3)  2 (F.rms_norm)    0 (in rope_and_store)
RoPE + K/V store        1                 1
paged decode            2 (partial+merge) 2
o projection            1 GEMV            1
add + post-attn norm    1                 1
gate/up projection      1 GEMV            1
SiLU·up                 1                 0-1 (in the int4 gate/up GEMV: 1 row, timed)
down projection         1 GEMV            1
residual add            1                 1 (with the next layer's input norm)
======================  ================  =====================================================

Llama: 11 → 10 a layer (9 with the SiLU·up GEMV), Qwen3: 13 → 10 (9); more unfused where
``F.rms_norm`` copies the strided q/k views first. The first layer's input norm stays separate,
the last layer's add meets the final norm. ``plan_fused_mlps`` (at start, after the int4 plans):
where an int4 gate/up weight has timed wide-GEMV tiles (bfloat16, no bias), their SwiGLU form
(``gemv_wide(swiglu=True)``: a program reads the gate and the up rows of its outputs) is checked
against the planned 1-row GEMV + ``silu_mul`` and timed against them; kept where faster.
Every fused step computes in float32 and rounds where PyTorch rounds (a sum to x's dtype
before the norm reads it, a norm's output before RoPE, the gate/up products and SiLU before
their product).
``PENSIEVE_FUSED_DECODE=0`` keeps the per-layer fusions only (no cross-layer add + norm, no
q/k norms in RoPE). Importing this module needs no GPU; Triton is imported on first use.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import NamedTuple

import torch
from torch import nn

from pensieve.backends.cuda_attention import CudaPagedAttention
from pensieve.backends.cuda_int4 import CudaInt4Linear
from pensieve.backends.cuda_int4_gemv_wide import Wide, gemv_wide
from pensieve.backends.cuda_moe import CudaMoEExperts
from pensieve.models.llama import MLP, Attention, DecoderLayer, LlamaBody, RMSNorm
from pensieve.models.deepseek_mla import MLADecoderLayer
from pensieve.models.moe import GLMDecoderLayer, GLMMoE, MoE, MoEDecoderLayer

log = logging.getLogger(__name__)


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_layer_kernels

    return cuda_layer_kernels


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] → SiLU(gate_up[:, :I]) · gate_up[:, I:]."""
    t, two_i = gate_up.shape
    inner = two_i // 2
    out = torch.empty(t, inner, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _kernels().silu_mul[(t, -(-inner // block))](gate_up, out, inner, gate_up.stride(0),
                                                 BLOCK=block, num_warps=4)
    return out


class Picks(NamedTuple):
    """An MoE block's output left unsummed for ``add_rms_norm``: the experts' weighted picks
    [T, k, H] and a shared expert's output [T, H] (or None)."""

    rows: torch.Tensor
    shared: torch.Tensor | None

    def total(self) -> torch.Tensor:
        """[T, H] as the block's forward gives it (the picks' sum, then + shared)."""
        out = self.rows.sum(1)
        return out if self.shared is None else out + self.shared


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | Picks, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, RMSNorm(x + y) · weight) for rows of width H; y [T, H], or [T, P, H] whose P
    rows a token are summed first, or ``Picks`` (an MoE's weighted picks, summed, and its shared
    expert's output added, in the same launch)."""
    t, h = x.shape
    total = torch.empty_like(x)
    normed = torch.empty_like(x)
    block = 1 << (h - 1).bit_length()
    shared = None
    if isinstance(y, Picks):
        y, shared = y.rows, y.shared
    parts = y.shape[1] if y.dim() == 3 else 1
    y = y.contiguous()
    z = y if shared is None else shared.reshape(t, h).contiguous()
    _kernels().add_rms_norm[(t,)](x, y, weight, total, normed, h, eps, BLOCK=block,
                                  PARTS=parts, Z=z, EXTRA=shared is not None,
                                  num_warps=8 if block >= 4096 else 4)
    return total, normed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) · weight over rows of width H (x [T, H] contiguous), in one launch."""
    t, h = x.shape
    out = torch.empty_like(x)
    block = 1 << (h - 1).bit_length()
    _kernels().add_rms_norm[(t,)](x, x, weight, out, out, h, eps, BLOCK=block, Z=x, ADD=False,
                                  num_warps=8 if block >= 4096 else 4)
    return out


class CudaRMSNorm(RMSNorm):
    """An RMSNorm no fused step absorbed (GLM's q_a_layernorm, the first layer's input norm)
    on ``rms_norm`` at decode sizes: torch's norm kernel took 3.2 µs a [1, 2048] row on an
    H200; more rows than ``ROWS``, other devices or strided inputs keep ``F.rms_norm``."""

    ROWS = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1]
        if (x.is_cuda and x.is_contiguous() and x.numel() <= self.ROWS * h
                and x.dtype == self.weight.dtype):
            return rms_norm(x.view(-1, h), self.weight, self.eps).view(x.shape)
        return super().forward(x)


_PICKED = (MoE, GLMMoE)  # exact classes whose forward is router + experts (+ shared)


def moe_picks(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | Picks:
    """An MoE block's output on ``x`` [T, H]: its experts' weighted picks unsummed (``Picks``)
    where the block is a ``MoE`` whose shared expert, if any, is ungated, over CUDA expert
    codes on the GPU — ``add_rms_norm`` sums them and adds the shared expert's output in the
    launch that adds them to the residual (torch's ``sum(1)`` was a 4 µs kernel a layer, the
    shared add another) — else the block's own [T, H] output."""
    experts = getattr(mlp, "experts", None)
    if (type(mlp) in _PICKED and not mlp.shared_gated and type(experts) is CudaMoEExperts
            and x.is_cuda):
        weights, ids = mlp.gate(x)
        shared = getattr(mlp, mlp.SHARED)(x) if mlp.has_shared else None
        return Picks(experts.picks(x, weights, ids), shared)
    return mlp(x)


class CudaMLP(MLP):
    # the wide GEMV's tiles of a gate/up weight where its one-launch SiLU·up form was checked
    # and timed faster at 1 row than the GEMV + silu_mul (``plan_fused_mlps``); else None
    swiglu: Wide | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.swiglu is not None and x2.shape[0] == 1 and x.dtype == torch.bfloat16:
            gu = self.gate_up_proj
            act = gemv_wide(x2.contiguous(), gu.packed, gu.scale_offset, self.swiglu, swiglu=True)
            return self.down_proj(act.view(*x.shape[:-1], act.shape[-1]))
        gate_up = self.gate_up_proj(x)
        shape = gate_up.shape
        act = silu_mul(gate_up.reshape(-1, shape[-1]).contiguous())
        return self.down_proj(act.view(*shape[:-1], shape[-1] // 2))


class CudaAttention(Attention):
    """Attention with per-head q/k RMSNorms (Qwen3): on the CUDA paged attention the norms
    run inside ``rope_and_store``; elsewhere (no CUDA attention in the step) as the reference."""

    def forward(self, x, cos_sin, ctx):  # noqa: ANN001, ANN201 - as Attention.forward
        attention = ctx.attention
        if type(attention) is not CudaPagedAttention or cos_sin is None:
            return super().forward(x, cos_sin, ctx)
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        out = attention(self.layer, q.view(t, self.num_heads, self.head_dim),
                        k.view(t, self.num_kv_heads, self.head_dim),
                        v.view(t, self.num_kv_heads, self.head_dim), ctx, cos_sin,
                        qk_norm=norms)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


def _fusable_attention(m: nn.Module) -> bool:
    """An exact ``Attention`` with q/k norms of one eps and no extra query scale."""
    return (type(m) is Attention and m.qk_norm and m.q_scale == 1.0
            and type(m.q_norm) is RMSNorm and type(m.k_norm) is RMSNorm
            and m.q_norm.eps == m.k_norm.eps)


class CudaDecoderLayer(DecoderLayer):
    def forward(self, x, cos_sin, ctx):  # noqa: ANN001, ANN201 - as DecoderLayer.forward
        x, mlp = self.fused(x, self.input_layernorm(x), cos_sin, ctx)
        return x + mlp

    def fused(self, x: torch.Tensor, h: torch.Tensor, cos_sin, ctx  # noqa: ANN001
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """From x and its input norm ``h``: (x + attention, the MLP's output) — the last
        residual add left to the caller (``CudaLlamaBody`` fuses it with the next norm)."""
        attn = self.self_attn(h, cos_sin, ctx)
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(x.reshape(-1, x.shape[-1]), attn.reshape(-1, x.shape[-1]),
                            norm.weight, norm.eps)
        return x, self.mlp(h)


class _FusedMoEBlock:
    """The MoE block's post-attention residual add and norm in one launch (``add_rms_norm``);
    its MoE (router kernel, expert kernels) and attention as they are. ``fused`` as
    ``CudaDecoderLayer``'s: ``CudaLlamaBody`` adds its output into the next layer's norm."""

    def forward(self, x, cos_sin, ctx):  # noqa: ANN001, ANN201 - as MoEDecoderLayer.forward
        x2, mlp = self.fused(x, self.input_layernorm(x), cos_sin, ctx)
        return (x2 + (mlp.total() if isinstance(mlp, Picks) else mlp)).view(x.shape)

    def fused(self, x: torch.Tensor, h: torch.Tensor, cos_sin, ctx  # noqa: ANN001
              ) -> tuple[torch.Tensor, torch.Tensor | Picks]:
        """From x and its input norm ``h``: (x + attention, the MoE's output) — [T, H], or its
        weighted picks and shared output for the caller's ``add_rms_norm`` (``moe_picks``)."""
        d = x.shape[-1]
        attn = self.self_attn(h, cos_sin, ctx)
        norm = self.post_attention_layernorm
        x, normed = add_rms_norm(x.reshape(-1, d), attn.reshape(-1, d), norm.weight, norm.eps)
        return x, moe_picks(self.mlp, normed)


class CudaMoEDecoderLayer(_FusedMoEBlock, MoEDecoderLayer):
    pass


class CudaGLMDecoderLayer(_FusedMoEBlock, GLMDecoderLayer):
    pass


class CudaMLADecoderLayer(_FusedMoEBlock, MLADecoderLayer):
    """Latent attention (its own kernels, ``cuda_mla``) in the fused block (GLM-4.7-Flash,
    DeepSeek-V3): a 47-layer GLM-4.7-Flash step ran 94 torch RMSNorms, 94 residual adds and 46
    top-k sums + shared adds outside it."""


_MOE_LAYERS = {MoEDecoderLayer: CudaMoEDecoderLayer, GLMDecoderLayer: CudaGLMDecoderLayer,
               MLADecoderLayer: CudaMLADecoderLayer}


class CudaLlamaBody(LlamaBody):
    """Each layer's last residual add fused with the next layer's input norm (the last
    layer's with the final norm, over every row, then the engine's rows picked)."""

    def run(self, x, cos_sin, ctx):  # noqa: ANN001, ANN201 - as LlamaBody.run
        layers = list(self.layers)
        x = x.reshape(-1, x.shape[-1])
        h = layers[0].input_layernorm(x)
        for i, layer in enumerate(layers):
            x, mlp = layer.fused(x, h, cos_sin, ctx)
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            x, h = add_rms_norm(x, mlp if isinstance(mlp, Picks) else mlp.reshape(x.shape),
                                norm.weight, norm.eps)
        return h[ctx.logits_indices]


# the layers whose ``fused`` the body runs: Llama blocks and MoE blocks (a 30B-A3B b=1 step ran
# 49 torch RMSNorms and 48 residual adds, ~0.2 ms of 3.3, before MoE blocks took the body)
_BODY_LAYERS = (CudaDecoderLayer, CudaMoEDecoderLayer, CudaGLMDecoderLayer,
                CudaMLADecoderLayer)


def _fusable_body(m: nn.Module) -> bool:
    return (type(m) is LlamaBody and len(m.layers) > 0 and type(m.norm) is RMSNorm
            and all(type(layer) in _BODY_LAYERS and type(layer.input_layernorm) is RMSNorm
                    for layer in m.layers))


def fuse_cuda_layers(model: nn.Module) -> int:
    """Switch the model's MLPs, decoder layers, q/k-normed attentions and the body (exact
    classes only) to the fused forms; returns the number of decoder layers switched."""
    count = 0
    # PENSIEVE_FUSED_DECODE=0: only the per-layer fusions (silu_mul, the post-attention
    # add + norm), not the cross-layer add + norm or the q/k norms inside RoPE (session 9's
    # additions, first checked on a GPU by tests/unit/test_cuda_fused_decode.py)
    cross = os.environ.get("PENSIEVE_FUSED_DECODE", "1") != "0"
    for module in model.modules():
        if type(module) is MLP:
            module.__class__ = CudaMLP
        elif type(module) is DecoderLayer:
            module.__class__ = CudaDecoderLayer
            count += 1
        elif type(module) in _MOE_LAYERS and type(module.post_attention_layernorm) is RMSNorm:
            module.__class__ = _MOE_LAYERS[type(module)]
            count += 1
        elif cross and _fusable_attention(module):
            module.__class__ = CudaAttention
    for module in model.modules():  # after the layers: the body needs all of them fused
        if cross and _fusable_body(module):
            module.__class__ = CudaLlamaBody
    for module in model.modules():  # last: the checks above ask for exact RMSNorms
        if cross and type(module) is RMSNorm:
            module.__class__ = CudaRMSNorm
    return count


def plan_fused_mlps(model: nn.Module, dtype: torch.dtype, reps: int = 15) -> str:
    """Per int4 gate/up weight shape with timed wide-GEMV tiles (bfloat16, no bias): the
    one-launch SiLU·up form on those tiles (``gemv_wide(swiglu=True)``) checked against the
    planned 1-row GEMV (whichever kernel won) + ``silu_mul`` and timed against them on up to 8
    layers; kept where faster. Returns a note for the start log (µs per call)."""
    from pensieve.backends.cuda_int4_tune import gpu_us

    if dtype != torch.bfloat16:
        return ""
    shapes: dict[tuple[int, int], list[CudaMLP]] = {}
    for m in model.modules():
        gu = getattr(m, "gate_up_proj", None)
        if (type(m) is CudaMLP and isinstance(gu, CudaInt4Linear) and gu.bias is None
                and gu.plan is not None and gu.plan.wide is not None):
            shapes.setdefault((gu.out_features, gu.in_features), []).append(m)
    notes = []
    for (n, k), group in shapes.items():
        sample, t = group[:8], group[0].gate_up_proj.plan.wide
        x = torch.randn(1, k, device=group[0].gate_up_proj.packed.device, dtype=dtype)

        def fused(m: CudaMLP) -> torch.Tensor:
            return gemv_wide(x, m.gate_up_proj.packed, m.gate_up_proj.scale_offset, t, True)

        def unfused(m: CudaMLP) -> torch.Tensor:
            return silu_mul(m.gate_up_proj(x))

        try:
            ref = unfused(group[0]).float()
            err = ((fused(group[0]).float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        except Exception as e:  # a Triton that cannot build it: leave it out
            log.warning("fused SiLU·up %dx%d left out: %s", n, k, str(e).splitlines()[0][:80])
            continue
        if not err < 2e-2:
            log.warning("fused SiLU·up %dx%d left out: relative error %.3g", n, k, err)
            continue
        one, two = gpu_us(fused, sample, reps), gpu_us(unfused, sample, reps)
        if one < two:
            for m in group:
                m.swiglu = t
        notes.append(f"{n}x{k}: fused {one:.1f} vs GEMV + silu_mul {two:.1f}")
    return "; ".join(notes)
