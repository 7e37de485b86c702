"""Make an MLX model folder (what ``mlx_lm.convert`` writes) from a HF folder or a GGUF file.

A GGUF is first dequantised through Pensieve's own loader (``loaders/gguf.py``: weights in HF
names, Q/K rows in HF order) into a temporary HF folder — ``config.json``, ``model.safetensors``
and the tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with the chat template) — then
``mlx_lm.convert`` casts and, with ``q_bits``, quantises it. Pensieve's tokenizer files are
copied over mlx-lm's so that the MLX backend tokenises exactly as the GGUF's own vocabulary.
Dense families mlx-lm names as Pensieve does: llama, mistral, qwen2, qwen3.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pensieve.loaders.checkpoint import Checkpoint, CheckpointError
from pensieve.models.args import ModelArgs

# Pensieve family → HF model_type mlx-lm builds with the same (Llama-named) weights
GGUF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPES = ("bfloat16", "float16", "float32")


def hf_config(args: ModelArgs, tokenizer_eos: list[int]) -> dict[str, Any]:
    """A transformers-style config.json for a dense family's ``ModelArgs``."""
    model_type = GGUF_MODEL_TYPES.get(args.architecture)
    if model_type is None or args.moe is not None or args.extra.get("rope_freq_factors") is not None:
        raise CheckpointError(
            f"converting a {args.architecture!r} GGUF to MLX is not supported (supported: "
            f"{', '.join(sorted(GGUF_MODEL_TYPES))} without MoE or RoPE frequency factors); "
            "convert its Hugging Face folder instead")
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [f"{model_type.capitalize()}ForCausalLM"],
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": args.attention_bias,
        "mlp_bias": args.mlp_bias,
        "hidden_act": "silu",
        "eos_token_id": tokenizer_eos,
        "torch_dtype": "float32",
    }
    if args.rope_scaling:
        config["rope_scaling"] = dict(args.rope_scaling)
    if args.sliding_window is not None:
        config["sliding_window"] = args.sliding_window
    return config


def write_hf_folder(ckpt: Checkpoint, out: Path) -> None:
    """A loaded checkpoint (float weights in HF names) as a HF folder at ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tok = ckpt.tokenizer
    eos = sorted(tok.eos_token_ids)
    (out / "config.json").write_text(json.dumps(hf_config(ckpt.args, eos), indent=2))
    weights = {name: w.contiguous() for name, w in ckpt.weights.items()}
    if ckpt.args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.backend.save(str(out / "tokenizer.json"))
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": tok.add_bos,
        "clean_up_tokenization_spaces": False,
    }
    if ckpt.chat_template:
        tok_config["chat_template"] = ckpt.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def convert(src: str | Path, out: str | Path, *, q_bits: int = 4, q_group_size: int = 64,
            dtype: str = "bfloat16") -> Path:
    """Write the MLX folder ``out`` from ``src`` (HF folder or GGUF); ``q_bits`` 0 keeps the
    weights in ``dtype``. ``out`` must not exist; it appears complete or not at all."""
    from mlx_lm.convert import convert as mlx_convert

    from pensieve.loaders.registry import checkpoint_format, load_checkpoint

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out.exists():
        raise ValueError(f"{out} already exists: remove it or choose another folder")
    if q_bits not in (0, 2, 3, 4, 5, 6, 8):
        raise ValueError(f"--q-bits must be 0 (no quantisation) or one of 2, 3, 4, 5, 6, 8, got {q_bits}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pensieve-convert-", dir=out.parent) as tmp:
        hf_dir, staged = src, Path(tmp) / "mlx"
        if checkpoint_format(src) == "gguf":
            hf_dir = Path(tmp) / "hf"
            write_hf_folder(load_checkpoint(src, dtype=torch.float32), hf_dir)
        mlx_convert(str(hf_dir), str(staged), quantize=q_bits > 0,
                    q_bits=q_bits or None, q_group_size=q_group_size if q_bits else None,
                    dtype=dtype)
        for name in TOKENIZER_FILES:  # Pensieve's own vocabulary files, byte for byte
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, staged / name)
        staged.rename(out)
    return out


def cached_conversion(src: Path, cache_root: Path, *, q_bits: int = 4,
                      dtype: str = "bfloat16") -> Path:
    """The MLX folder converted from ``src`` once and kept under ``cache_root``, keyed by the
    source's path, size, mtime and the conversion's settings."""
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{q_bits}|{dtype}"
                         .encode()).hexdigest()[:16]
    out = cache_root / f"{src.stem}-q{q_bits or dtype}-{key}"
    if not (out / "config.json").is_file():
        try:
            convert(src, out, q_bits=q_bits, dtype=dtype)
        except (OSError, ValueError):
            if not (out / "config.json").is_file():  # not another process's finished copy
                raise
    return out
