"""Load a llama.cpp GGUF file into a ``Checkpoint`` (HF names, dense weights).

Three llama.cpp conventions are undone here:
- names: ``blk.N.attn_q.weight`` → ``model.layers.N.self_attn.q_proj.weight`` (tables below);
- shapes: GGUF lists dims innermost first (``ne``); ``GGUFFile`` already reverses them;
- Q/K row order: ``convert_hf_to_gguf.py`` permutes each head's rows from HF's
  rotate-half layout (first half, second half) to interleaved pairs; for
  architectures flagged ``permute_qk`` we permute them back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pensieve.loaders.architectures import ArchitectureSpec, spec_for_gguf, validate_shapes
from pensieve.loaders.checkpoint import Checkpoint, CheckpointError
from pensieve.loaders.gguf_file import GGUFFile
from pensieve.loaders.int4_codes import Q8_NAMES, int4_groups, q8_0_codes
from pensieve.loaders.quants import dequantize
from pensieve.models.quant_linear import Int4Groups
from pensieve.loaders.tokenizer import TextTokenizer
from pensieve.models.args import ModelArgs

GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Llama 3.1-style GGUFs carry precomputed RoPE frequency factors as a tensor; they go
# to ModelArgs.extra["rope_freq_factors"] rather than into the weights.
ROPE_FREQS = "rope_freqs.weight"
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)
_MISSING = object()


def hf_name(gguf_name: str) -> str | None:
    """The HF name for a llama.cpp tensor name, or None if the table has no entry."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def model_name(path: Path) -> str:
    """Served id from the file name, quant suffix dropped.

    ``SmolLM2-135M-Instruct.Q4_1.gguf`` → ``SmolLM2-135M-Instruct``.
    """
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32, *, keep_int4: bool = False
) -> Checkpoint:
    """Read ``path`` (a .gguf file); CheckpointError if it is unsupported or damaged.

    With ``keep_int4``, 4-bit linear weights (Q4_0/Q4_1/Q4_K) go to ``Checkpoint.int4`` as
    exact codes instead of being dequantised into ``weights``, and a Q8_0 embedding or output
    matrix to ``Checkpoint.int8`` (the int8 output layer takes its codes as they are).
    """
    path = Path(path)
    gf = GGUFFile(path)
    arch = gf.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: GGUF has no general.architecture")
    spec = spec_for_gguf(arch)
    names = _rename_all(gf, path)
    args = gguf_model_args(gf, arch, has_lm_head="lm_head.weight" in names.values())
    validate_shapes(args, {hf: gf.tensors[g].shape for g, hf in names.items()}, str(path))
    tokenizer = TextTokenizer.from_gguf_metadata(gf.metadata)
    int4: dict[str, Int4Groups] = {}
    int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    weights: dict[str, torch.Tensor] = {}
    with _single_threaded():
        for g, hf in names.items():
            raw = _raw_hf_order(gf, g, hf, args, spec)
            info = gf.tensors[g]
            groups = int4_groups(raw, info.ggml_type, info.shape) if keep_int4 else None
            q8 = q8_0_codes(raw, info.ggml_type, info.shape) if keep_int4 and hf in Q8_NAMES else None
            if groups is not None and hf.endswith("_proj.weight"):
                int4[hf] = groups
            elif q8 is not None:
                int8[hf] = q8
            else:
                weights[hf] = dequantize(raw, info.ggml_type, info.shape, dtype, name=g)
    template = gf.get("tokenizer.chat_template")
    return Checkpoint(
        name=model_name(path),
        path=path,
        args=args,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=template if isinstance(template, str) else None,
        context_length=args.max_position_embeddings,
        int4=int4,
        int8=int8,
    )


def _rename_all(gf: GGUFFile, path: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    for g in gf.tensors:
        if g == ROPE_FREQS:
            continue
        hf = hf_name(g)
        if hf is None:
            raise CheckpointError(f"{path}: unexpected tensor {g!r} for a llama-layout model")
        names[g] = hf
    return names


def gguf_model_args(gf: GGUFFile, arch: str, *, has_lm_head: bool) -> ModelArgs:
    """ModelArgs from ``{arch}.*`` metadata; vocab size from the embedding's rows."""

    def key(suffix: str, default: Any = _MISSING) -> Any:
        value = gf.get(f"{arch}.{suffix}", default)
        if value is _MISSING:
            raise CheckpointError(f"{gf.path}: GGUF metadata lacks {arch}.{suffix}")
        if isinstance(value, list):
            raise CheckpointError(f"{gf.path}: per-layer {arch}.{suffix} is not supported")
        return value

    if "token_embd.weight" not in gf.tensors:
        raise CheckpointError(f"{gf.path}: GGUF has no token_embd.weight tensor")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None)
    extra: dict[str, Any] = {}
    if ROPE_FREQS in gf.tensors:
        info = gf.tensors[ROPE_FREQS]
        factors = dequantize(gf.raw(ROPE_FREQS), info.ggml_type, info.shape, name=ROPE_FREQS)
        extra["rope_freq_factors"] = factors.reshape(-1).tolist()
    return ModelArgs(
        architecture=arch,
        vocab_size=gf.tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(head_dim or hidden // heads),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(gf, arch),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings=not has_lm_head,
        attention_bias="blk.0.attn_q.bias" in gf.tensors,
        mlp_bias="blk.0.ffn_gate.bias" in gf.tensors,
        extra=extra,
    )


def _rope_scaling(gf: GGUFFile, arch: str) -> dict[str, Any] | None:
    """``{arch}.rope.scaling.*`` in HF ``rope_scaling`` shape (None when unscaled)."""
    kind = gf.get(f"{arch}.rope.scaling.type")
    factor = gf.get(f"{arch}.rope.scaling.factor")
    if kind is None and gf.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", gf.get(f"{arch}.rope.scale_linear")  # pre-2024 files
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
        value = gf.get(f"{arch}.rope.scaling.{suffix}")
        if value is not None:
            scaling[hf_key] = cast(value)
    return scaling


def _raw_hf_order(gf: GGUFFile, g: str, hf: str, args: ModelArgs, spec: ArchitectureSpec
                  ) -> torch.Tensor:
    """The tensor's bytes, with Q/K rows in HF order."""
    info = gf.tensors[g]
    raw = gf.raw(g)
    heads = _qk_heads(hf, args) if spec.permute_qk else None
    if heads is not None:
        # rows are whole quant blocks, so un-permute the bytes before dequantising
        rows = info.shape[0]
        raw = unpermute_rows(raw.reshape(rows, -1), heads).reshape(-1)
    return raw


def _qk_heads(hf: str, args: ModelArgs) -> int | None:
    if ".self_attn.q_proj." in hf:
        return args.num_heads
    if ".self_attn.k_proj." in hf:
        return args.num_kv_heads
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation along dim 0 (rows: heads × head_dim).

    llama.cpp stores each head's rows as (head_dim/2, 2) — pairs interleaved; HF
    stores (2, head_dim/2) — the two rotary halves one after the other.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot un-permute {rows} rows into {n_heads} heads")
    rest = w.shape[1:]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *rest)
            .transpose(1, 2).reshape(rows, *rest).contiguous())


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Dequantise on one intra-op thread: the per-tensor ops are small, and on a busy
    2-core machine OpenMP workers spin-waiting for a core made loading 5-20× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
