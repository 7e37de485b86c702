"""What a Gemma 4 checkpoint declares (``models/gemma4.py`` holds the modules): HF
``config.json`` and llama.cpp ``gemma4`` metadata → ``ModelArgs`` with ``Gemma4Options`` in
``extra["gemma4"]``; each layer's head count and size, the layer a KV-shared layer reads, the
per-layer cache layout and the expected weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pensieve.models.args import ModelArgs
from pensieve.models.cache_spec import LayerCache, PagedKV
from pensieve.models.config import hf_args
from pensieve.models.family import GGUFSource, ModelConfigError
from pensieve.models.gemma3 import LOCAL_ROPE_THETA, WINDOW_PATTERN, _layer_types


@dataclass(frozen=True)
class Gemma4Options:
    """What Gemma 4 adds to ``ModelArgs`` (kept in ``args.extra["gemma4"]``); ``ModelArgs``'
    ``head_dim``/``num_kv_heads`` are the local layers'."""

    global_head_dim: int
    global_kv_heads: int
    global_rope_theta: float
    global_rope_partial: float
    k_eq_v: bool = False
    kv_shared_layers: int = 0
    per_layer_dim: int = 0  # PLE width (0: none)
    per_layer_vocab: int = 0
    double_wide_mlp: bool = False
    num_experts: int = 0  # the MoE block (0: none)
    top_k: int = 0
    expert_size: int = 0
    softcap: float | None = None


def options(args: ModelArgs) -> Gemma4Options:
    return args.extra["gemma4"]


def layer_dims(args: ModelArgs, layer: int) -> tuple[int, int]:
    """(KV heads, head size) of ``layer``."""
    if args.window(layer) is not None:
        return args.num_kv_heads, args.head_dim
    o = options(args)
    return o.global_kv_heads, o.global_head_dim


def kv_source(args: ModelArgs, layer: int) -> int:
    """The layer whose cache ``layer`` attends over: itself, or for a KV-shared layer the last
    non-shared layer of its kind."""
    first_shared = args.num_layers - options(args).kv_shared_layers
    if layer < first_shared:
        return layer
    kind = args.layer_types[layer] if args.layer_types else None
    for i in range(first_shared - 1, -1, -1):
        if (args.layer_types[i] if args.layer_types else None) == kind:
            return i
    raise ModelConfigError(f"KV-shared layer {layer} has no earlier {kind} layer")


def _global(config: Mapping[str, Any], key: str, default: Any) -> Any:
    """A full-attention layer's override from ``per_layer_config``, else the top-level
    ``global_*`` key, else ``default``."""
    types = config.get("layer_types") or []
    for index, values in (config.get("per_layer_config") or {}).items():
        if int(index) < len(types) and types[int(index)] == "full_attention" and key in values:
            return values[key]
    top = {"head_dim": "global_head_dim", "num_key_value_heads": "num_global_key_value_heads"}
    return config.get(top[key]) or default


def hf_config(config: Mapping[str, Any]) -> ModelArgs:
    """A ``gemma4_text`` config, or a multimodal ``gemma4`` one's ``text_config`` (the output
    head's tying is the top level's; the towers are not loaded)."""
    if isinstance(config.get("text_config"), Mapping):
        text = config["text_config"]
        config = {**text, "tie_word_embeddings": config.get(
            "tie_word_embeddings", text.get("tie_word_embeddings", True))}
    if config.get("attention_bias"):
        raise ModelConfigError("Gemma 4 with attention biases is not supported")
    if config.get("use_bidirectional_attention") == "all":
        raise ModelConfigError("bidirectional Gemma 4 (use_bidirectional_attention=all) "
                               "is not a causal LM")
    n = int(config["num_hidden_layers"])
    types = list(config.get("layer_types") or _layer_types(n, WINDOW_PATTERN))
    types[-1] = "full_attention"  # as the reference forces
    rope = config.get("rope_parameters") or {}
    full = rope.get("full_attention") or {"rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25}
    local = rope.get("sliding_attention") or {"rope_theta": LOCAL_ROPE_THETA}
    if full.get("rope_type", "proportional") != "proportional" or full.get("factor", 1.0) != 1.0:
        raise ModelConfigError("Gemma 4's global RoPE must be unscaled 'proportional'")
    if local.get("rope_type", "default") != "default":
        raise ModelConfigError("Gemma 4's local RoPE must be 'default'")
    kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    k_eq_v = bool(config.get("attention_k_eq_v", False))
    moe = bool(config.get("enable_moe_block"))
    opts = Gemma4Options(
        global_head_dim=int(_global(config, "head_dim", 512)),
        global_kv_heads=int(_global(config, "num_key_value_heads", kv) if k_eq_v else kv),
        global_rope_theta=float(full.get("rope_theta", 1_000_000.0)),
        global_rope_partial=float(full.get("partial_rotary_factor", 1.0)),
        k_eq_v=k_eq_v, kv_shared_layers=int(config.get("num_kv_shared_layers") or 0),
        per_layer_dim=int(config.get("hidden_size_per_layer_input") or 0),
        per_layer_vocab=int(config.get("vocab_size_per_layer_input") or config["vocab_size"]),
        double_wide_mlp=bool(config.get("use_double_wide_mlp", False)),
        num_experts=int(config.get("num_experts") or 0) if moe else 0,
        top_k=int(config.get("top_k_experts") or 0) if moe else 0,
        expert_size=int(config.get("moe_intermediate_size") or 0) if moe else 0,
        softcap=config.get("final_logit_softcapping"))
    return hf_args(
        {**config, "rope_parameters": None, "rope_scaling": None}, "gemma4",
        num_kv_heads=kv, head_dim=int(config.get("head_dim") or 256),
        rope_theta=opts.global_rope_theta, local_rope_theta=float(local["rope_theta"]),
        layer_types=tuple(types), sliding_window=int(config.get("sliding_window") or 512),
        hidden_act=str(config.get("hidden_activation") or "gelu_pytorch_tanh"),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        extra={"gemma4": opts})


def cache_layout(args: ModelArgs) -> tuple[LayerCache, ...]:
    """Per-layer head counts and sizes, windows on local layers; a KV-shared layer keeps
    nothing of its own (an empty ``PagedKV`` in its source's window group: it reads the
    source layer's cache)."""
    layout = []
    for i in range(args.num_layers):
        kv, hd = layer_dims(args, i)
        empty = kv_source(args, i) != i
        layout.append(PagedKV(0, 0, 0, args.window(i)) if empty else
                      PagedKV(kv, hd, hd, args.window(i)))
    return tuple(layout)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    o, h, heads = options(args), args.hidden_size, args.num_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    if o.per_layer_dim:
        n = args.num_layers * o.per_layer_dim
        shapes.update({"model.embed_tokens_per_layer.weight": (o.per_layer_vocab, n),
                       "model.per_layer_model_projection.weight": (n, h),
                       "model.per_layer_projection_norm.weight": (o.per_layer_dim,)})
    for i in range(args.num_layers):
        p, (kv, hd) = f"model.layers.{i}.", layer_dims(args, i)
        shared = kv_source(args, i) != i
        inner = args.intermediate_size * (2 if o.double_wide_mlp and shared else 1)
        shapes.update({p + "self_attn.q_proj.weight": (heads * hd, h),
                       p + "self_attn.q_norm.weight": (hd,),
                       p + "self_attn.o_proj.weight": (h, heads * hd),
                       p + "mlp.gate_proj.weight": (inner, h), p + "mlp.up_proj.weight": (inner, h),
                       p + "mlp.down_proj.weight": (h, inner), p + "layer_scalar": (1,)})
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[f"{p}{norm}.weight"] = (h,)
        if not shared:
            shapes[p + "self_attn.k_proj.weight"] = (kv * hd, h)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
            if not (o.k_eq_v and args.window(i) is None):
                shapes[p + "self_attn.v_proj.weight"] = (kv * hd, h)
        if o.num_experts:
            e, size = o.num_experts, o.expert_size
            shapes.update({p + "router.proj.weight": (e, h), p + "router.scale": (h,),
                           p + "router.per_expert_scale": (e,),
                           p + "experts.down_proj.weight": (e, h, size)})
            # a GGUF's ffn_gate_up_exps is read as these two (Family.gguf_splits)
            shapes[p + "experts.gate_proj.weight"] = (e, size, h)
            shapes[p + "experts.up_proj.weight"] = (e, size, h)
            for norm in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                         "pre_feedforward_layernorm_2"):
                shapes[f"{p}{norm}.weight"] = (h,)
        if o.per_layer_dim:
            shapes.update({p + "per_layer_input_gate.weight": (o.per_layer_dim, h),
                           p + "per_layer_projection.weight": (h, o.per_layer_dim),
                           p + "post_per_layer_input_norm.weight": (h,)})
    return shapes


def _per_layer(src: GGUFSource, suffix: str, n: int, default: Any = ...) -> list[Any]:
    value = src.key(suffix, default)
    return list(value) if isinstance(value, list) else [value] * n


def gguf_config(src: GGUFSource) -> ModelArgs:
    """llama.cpp's ``gemma4`` metadata (conversion/gemma.py ``Gemma4Model``): ``key_length`` the
    global layers' head size, ``key_length_swa`` the local ones', ``head_count_kv`` per layer,
    ``sliding_window_pattern`` per layer, ``rope_freqs`` the proportional RoPE's divisors (1 on
    the rotated angles, 1e30 on the others)."""
    if "token_embd.weight" not in src.shapes:
        raise ModelConfigError("GGUF has no token_embd.weight tensor")
    n = int(src.key("block_count"))
    swa = [bool(x) for x in _per_layer(src, "attention.sliding_window_pattern", n)]
    types = tuple("sliding_attention" if w else "full_attention" for w in swa)
    kv = _per_layer(src, "attention.head_count_kv", n)
    ff = _per_layer(src, "feed_forward_length", n)
    local, full = swa.index(True) if any(swa) else 0, swa.index(False)
    global_dim = int(src.key("attention.key_length"))
    factors = src.vectors.get("rope_freqs.weight")
    rotated = sum(1 for f in factors if f < 1e10) if factors else global_dim // 2
    if factors and any(f != 1.0 and f < 1e10 for f in factors):
        raise ModelConfigError("gemma4 rope_freqs other than proportional RoPE's are not supported")
    shared = int(src.key("attention.shared_kv_layers", 0) or 0)
    experts = int(src.key("expert_count", 0) or 0)
    k_eq_v = any(not w and i < n - shared and f"blk.{i}.attn_v.weight" not in src.shapes
                 for i, w in enumerate(swa))
    ple = int(src.key("embedding_length_per_layer_input", 0) or 0)
    opts = Gemma4Options(
        global_head_dim=global_dim, global_kv_heads=int(kv[full]),
        global_rope_theta=float(src.key("rope.freq_base", 1_000_000.0)),
        global_rope_partial=2 * rotated / global_dim, k_eq_v=k_eq_v, kv_shared_layers=shared,
        per_layer_dim=ple,
        per_layer_vocab=src.shapes["per_layer_token_embd.weight"][0] if ple else 0,
        double_wide_mlp=shared > 0 and int(ff[-1]) == 2 * int(ff[0]),
        num_experts=experts, top_k=int(src.key("expert_used_count", 0) or 0),
        expert_size=int(src.key("expert_feed_forward_length", 0) or 0),
        softcap=src.key("final_logit_softcapping", None))
    return ModelArgs(
        architecture="gemma4", vocab_size=src.shapes["token_embd.weight"][0],
        hidden_size=int(src.key("embedding_length")), intermediate_size=int(ff[0]),
        num_layers=n, num_heads=int(src.scalar("attention.head_count")),
        num_kv_heads=int(kv[local]), head_dim=int(src.key("attention.key_length_swa")),
        rms_norm_eps=float(src.key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=opts.global_rope_theta,
        local_rope_theta=float(src.key("rope.freq_base_swa", LOCAL_ROPE_THETA)),
        max_position_embeddings=int(src.key("context_length", 131072)),
        tie_word_embeddings="output.weight" not in src.shapes, layer_types=types,
        sliding_window=int(src.key("attention.sliding_window")),
        hidden_act="gelu_pytorch_tanh", extra={"gemma4": opts})
