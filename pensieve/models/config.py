"""The keys every decoder family shares: HF ``config.json`` and GGUF metadata → ``ModelArgs``.

Families call these and add what is theirs (``overrides``); a missing or malformed value
raises ``ModelConfigError``. Also the weight table of the Llama-shaped block most families
keep (``decoder_shapes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pensieve.models.args import ModelArgs
from pensieve.models.family import GGUFSource, ModelConfigError, Shapes


def hf_rope(params: Mapping[str, Any] | None, default_theta: float = 10000.0
            ) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling in ``{"rope_type": ...}`` shape or None) from one
    ``rope_parameters``/``rope_scaling`` dict."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", None) or default_theta)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")  # transformers < 4.45 spelling
    params.pop("type", None)
    params.pop("partial_rotary_factor", None)
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def hf_args(config: Mapping[str, Any], architecture: str, **overrides: Any) -> ModelArgs:
    """ModelArgs from config.json keys shared by decoder families.

    RoPE comes as transformers 4's ``rope_theta`` + ``rope_scaling`` or 5's ``rope_parameters``.
    """
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        theta, scaling = hf_rope(rope, float(config.get("rope_theta") or 10000.0))
        partial = (config.get("rope_parameters") or {}).get("partial_rotary_factor")
        values: dict[str, Any] = dict(
            architecture=architecture,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            partial_rotary_factor=float(partial or config.get("partial_rotary_factor") or 1.0),
        )
        values.update(overrides)
        return ModelArgs(**values)
    except KeyError as exc:
        raise ModelConfigError(f"config.json lacks {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ModelConfigError):
            raise
        raise ModelConfigError(f"config.json has a malformed value ({exc})") from exc


def hf_sliding_window(config: Mapping[str, Any]) -> int | None:
    """The window where the config turns it on (Qwen's ``use_sliding_window`` gates it)."""
    if config.get("use_sliding_window") is False:
        return None
    window = config.get("sliding_window")
    return int(window) if window else None


def gguf_args(src: GGUFSource, architecture: str, **overrides: Any) -> ModelArgs:
    """ModelArgs from ``{arch}.*`` metadata; vocab size from the embedding's rows."""
    if "token_embd.weight" not in src.shapes:
        raise ModelConfigError("GGUF has no token_embd.weight tensor")
    hidden, heads = int(src.key("embedding_length")), int(src.scalar("attention.head_count"))
    head_dim = src.key("attention.key_length", None) or src.key("rope.dimension_count", None)
    values: dict[str, Any] = dict(
        architecture=architecture,
        vocab_size=src.shapes["token_embd.weight"][0],
        hidden_size=hidden,
        intermediate_size=int(src.scalar("feed_forward_length")),
        num_layers=int(src.key("block_count")),
        num_heads=heads,
        num_kv_heads=int(src.scalar("attention.head_count_kv", heads)),
        head_dim=int(head_dim or hidden // heads),
        rms_norm_eps=float(src.key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(src.key("rope.freq_base", 10000.0)),
        rope_scaling=gguf_rope_scaling(src) or (
            {"rope_type": "freq_factors", "factors": src.vectors["rope_freqs.weight"]}
            if "rope_freqs.weight" in src.vectors else None),
        max_position_embeddings=int(src.key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in src.shapes,
        attention_bias="blk.0.attn_q.bias" in src.shapes,
        mlp_bias="blk.0.ffn_gate.bias" in src.shapes,
        extra={"rope_freq_factors": src.vectors["rope_freqs.weight"]}
        if "rope_freqs.weight" in src.vectors else {},
    )
    values.update(overrides)
    return ModelArgs(**values)


def gguf_rope_scaling(src: GGUFSource) -> dict[str, Any] | None:
    """``{arch}.rope.scaling.*`` in HF ``rope_scaling`` shape (None when unscaled)."""
    kind = src.key("rope.scaling.type", None)
    factor = src.key("rope.scaling.factor", None)
    if kind is None and src.key("rope.scale_linear", None) is not None:
        kind, factor = "linear", src.key("rope.scale_linear")  # pre-2024 files
    if kind is None or kind == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(factor or 1.0)}
    optional = {
        "original_context_length": ("original_max_position_embeddings", int),
        "attn_factor": ("attention_factor", float),
        "yarn_beta_fast": ("beta_fast", float),
        "yarn_beta_slow": ("beta_slow", float),
    }
    for suffix, (hf_key, cast) in optional.items():
        value = src.key(f"rope.scaling.{suffix}", None)
        if value is not None:
            scaling[hf_key] = cast(value)
    return scaling


def decoder_shapes(args: ModelArgs, *, fused: bool = False) -> Shapes:
    """Every weight of a Llama-shaped decoder in HF names, with torch shapes: separate
    q/k/v and gate/up projections, or (``fused``, Phi-3) ``qkv_proj`` and ``gate_up_proj``."""
    h, hd, inner = args.hidden_size, args.head_dim, args.intermediate_size
    q_rows, kv_rows = args.num_heads * hd, args.num_kv_heads * hd
    shapes: Shapes = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.o_proj.weight": (h, q_rows),
            p + "mlp.down_proj.weight": (h, inner),
        })
        if fused:
            shapes[p + "self_attn.qkv_proj.weight"] = (q_rows + 2 * kv_rows, h)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * inner, h)
        else:
            shapes.update({
                p + "self_attn.q_proj.weight": (q_rows, h),
                p + "self_attn.k_proj.weight": (kv_rows, h),
                p + "self_attn.v_proj.weight": (kv_rows, h),
                p + "mlp.gate_proj.weight": (inner, h),
                p + "mlp.up_proj.weight": (inner, h),
            })
        if args.attention_bias:
            names = (("qkv_proj", q_rows + 2 * kv_rows),) if fused else (
                ("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows))
            shapes.update({p + f"self_attn.{n}.bias": (rows,) for n, rows in names})
        if args.attention_bias if args.attention_out_bias is None else args.attention_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if args.mlp_bias:
            for name, rows in (("gate_proj", inner), ("up_proj", inner), ("down_proj", h)):
                shapes[p + f"mlp.{name}.bias"] = (rows,)
        if args.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
    return shapes
