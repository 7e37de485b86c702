"""Tiny random transformers models of every family, saved as HF folders or written as GGUFs.

``hf_model`` builds a seeded float32 model from a config with weights drawn wide enough that
attention, norms and RoPE all matter; ``save_hf`` writes it with ``save_pretrained`` and a
tokenizer; ``write_gguf`` plays llama.cpp's converter (``conversion/*.py``) for the same
model: llama.cpp's metadata keys and tensor names, Llama's Q/K row permutation, Gemma's
norm ``+ 1``, Phi-3's LongRoPE factor tensors, and optionally Q8_0/Q4_0 projections (the HF
model then gets the dequantised weights, so both sides compute with the same numbers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType
from gguf.quants import dequantize, quantize

from tests.unit.loader_fixtures import _add_bpe_vocab, llamacpp_permute, tiny_bpe_tokenizer

Q = GGMLQuantizationType
TOKENIZER = tiny_bpe_tokenizer()
VOCAB = TOKENIZER.get_vocab_size()

# HF module → llama.cpp block tensor (the part between ``blk.N.`` and ``.weight``/``.bias``)
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up", "input_layernorm": "attn_norm",
}
GLOBALS = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def hf_model(config: Any, seed: int = 0) -> torch.nn.Module:
    """A transformers causal LM for ``config`` (its class from the config), float32, eval, with
    weights of unit-scale activations: matrices ~N(0, 1/fan_in), norms ~1 ± 0.2 (Gemma's
    stored ``w`` ~ ±0.2, as its norm multiplies by ``1 + w``), biases ~N(0, 0.2)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gemma = config.model_type.startswith("gemma")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(0.2 * noise + (0.0 if gemma else 1.0))
            else:
                p.copy_(0.2 * noise)
    return model


def save_hf(folder: Path, model: torch.nn.Module) -> Path:
    model.save_pretrained(folder)
    TOKENIZER.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return folder


def quantize_like_gguf(model: torch.nn.Module, qtype: GGMLQuantizationType) -> None:
    """Round every projection of ``model`` through ``qtype`` in place (what a GGUF holds)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_projection(name):
                a = p.detach().numpy().astype(np.float32)
                p.copy_(torch.from_numpy(dequantize(quantize(a, qtype), qtype).reshape(a.shape)))


def _is_projection(hf: str) -> bool:
    return hf.startswith("model.layers.") and hf.endswith("_proj.weight")


def write_gguf(path: Path, model: torch.nn.Module, arch: str, *,
               qtype: GGMLQuantizationType = Q.F32, context_length: int | None = None,
               swa_pattern: int | list[bool] | None = None) -> Path:
    """``model`` as llama.cpp's converter writes it for ``arch`` (llama, qwen2, qwen3, phi3,
    gemma3); projections in ``qtype`` (call ``quantize_like_gguf`` on the model first so the
    reference computes with the same weights)."""
    cfg = model.config
    w = GGUFWriter(str(path), arch)
    heads, kv_heads, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    w.add_context_length(context_length or cfg.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    global_rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(global_rope["rope_theta"])
    vectors: dict[str, list[float]] = {}
    if arch == "phi3":  # conversion/phi.py Phi3MiniModel
        rot = rope.get("partial_rotary_factor", 1.0)
        rope_dims = int(rot * hidden) // heads
        original = (rope.get("original_max_position_embeddings")
                    or cfg.original_max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_dimension_count(rope_dims)
        w.add_sliding_window(cfg.sliding_window or 0)
        if rope.get("long_factor"):
            scale = cfg.max_position_embeddings / original
            w.add_rope_scaling_type(RopeScalingType.LONGROPE)
            w.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
            vectors = {"rope_factors_long.weight": rope["long_factor"],
                       "rope_factors_short.weight": rope["short_factor"]}
    else:  # conversion/base.py TextModel, llama.py LlamaModel, gemma.py Gemma3Model
        if arch in ("llama", "qwen3", "gemma3") or head_dim != hidden // heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if arch == "llama":
            w.add_rope_dimension_count(head_dim)
            if global_rope.get("rope_type") == "llama3":
                vectors = {"rope_freqs.weight": llama3_rope_factors(global_rope, head_dim)}
        if global_rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(global_rope["factor"])
        if "sliding_attention" in rope:
            w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        if arch == "gemma3":
            w.add_sliding_window(cfg.sliding_window)
            if swa_pattern is not None:
                if isinstance(swa_pattern, list):
                    w.add_array(f"{arch}.attention.sliding_window_pattern", swa_pattern)
                else:
                    w.add_sliding_window_pattern(swa_pattern)
    _add_bpe_vocab(w, TOKENIZER)
    shift = 1.0 if arch == "gemma3" else 0.0
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf, arch)
        t = tensor.detach().float()
        if arch == "llama" and ".q_proj." in hf:
            t = llamacpp_permute(t, heads)
        elif arch == "llama" and ".k_proj." in hf:
            t = llamacpp_permute(t, kv_heads)
        if hf.endswith("norm.weight"):
            t = t + shift
        a = t.numpy().astype(np.float32)
        if qtype != Q.F32 and _is_projection(hf):
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    for name, values in vectors.items():
        w.add_tensor(name, np.asarray(values, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama3_rope_factors(rope: dict[str, Any], dim: int) -> list[float]:
    """The ``rope_freqs`` divisors conversion/llama.py writes for Llama 3.1's RoPE scaling."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [float(f) for f in factors]


def gguf_name(hf: str, arch: str) -> str:
    if hf in GLOBALS:
        return GLOBALS[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":  # Gemma's sandwich: after attention; else the MLP's
        block = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
    else:
        block = {"pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}.get(module) or BLOCK_NAMES[module]
    return f"blk.{layer}.{block}.{kind}"
