"""What the hybrid (Gated DeltaNet + gated attention) families share — Qwen3-Next
(``models/qwen3_next.py``, whose modules these describe) and Qwen3.5 (``models/qwen3_5.py``):
the linear layers' shape and checkpoint layout (``GatedDeltaArgs``), config.json and GGUF
metadata → ``ModelArgs``, the cache each layer keeps, the expected weights, llama.cpp's names
and the weight fix-ups on load.

llama.cpp's converter (conversion/qwen.py) writes ``ssm_a`` = −exp(A_log) (no suffix),
``ssm_dt.bias`` = dt_bias, the conv kernel squeezed to [C, K], the (1 + w) norms with the 1
added (taken off again: the module keeps HF's w), and counts its MTP blocks in ``block_count`` (``nextn_predict_layers``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from pensieve.models.args import ModelArgs, MoEArgs
from pensieve.models.cache_spec import LayerCache, PagedKV, RecurrentState
from pensieve.models.config import gguf_args, hf_args
from pensieve.models.family import (
    GLOBAL_NAMES, LLAMA_BLOCK_NAMES, QK_NORM_NAMES, FastPaths, GGUFNames, GGUFSource,
    ModelConfigError,
)
from pensieve.models.moe import MOE_GGUF_NAMES, shared_gguf_names

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


def hybrid_paths(args: ModelArgs, context_length: int) -> FastPaths:
    """Only the per-module CPU kernels: the q4 SiLU MLP (dense models) or the experts kept as
    codes (``models.moe``'s experts). None of the uniform-cache paths: the compiled paged kernels
    rotate whole heads over one uniform cache, the one-call decoder and the Llama-block CUDA
    kernels know neither gates nor recurrent layers."""
    if args.moe is not None:
        return FastPaths(cpu_moe_codes=True)
    return FastPaths(cpu_fused_mlp=args.hidden_act == "silu")


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
    if "intermediate_size" not in config and "moe_intermediate_size" in config:
        # Qwen3.5-MoE configs have no dense MLP width: every layer is sparse
        config = {**config, "intermediate_size": config["moe_intermediate_size"]}
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
    if src.key("feed_forward_length", None) is None and src.key("expert_feed_forward_length", None):
        # Qwen3.5-MoE files: no dense MLP width (every layer is sparse)
        src = replace(src, meta={**src.meta, f"{src.arch}.feed_forward_length":
                                 src.key("expert_feed_forward_length")})
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


def offset_norm(name: str) -> bool:
    """A (1 + w) RMSNorm's weight (every norm but the linear layers' gated one)."""
    return name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight")


def from_gguf_weight(name: str, weight: torch.Tensor) -> torch.Tensor:
    """llama.cpp stores −exp(A_log) as ``ssm_a``, the conv kernel as [C, K] and the (1 + w)
    norms with the 1 added (the module keeps HF's w)."""
    if name.endswith("linear_attn.A_log"):
        return torch.log(-weight)
    if name.endswith("linear_attn.conv1d.weight") and weight.ndim == 2:
        return weight.unsqueeze(1)
    if offset_norm(name):
        return weight - 1
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
    "ssm_in": "linear_attn.in_proj_qkvz",  # legacy Qwen3-Next files: HF's grouped qkvz
    "ssm_ba": "linear_attn.in_proj_ba", "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a", "ssm_conv1d": "linear_attn.conv1d",
    "ssm_dt.bias": "linear_attn.dt_bias", "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
    **MOE_GGUF_NAMES, **shared_gguf_names("shared_expert"),
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
HYBRID_GGUF_NAMES = HybridGGUFNames(GLOBAL_NAMES, HYBRID_BLOCK_NAMES)
