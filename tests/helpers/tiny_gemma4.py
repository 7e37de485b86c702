"""A tiny random Gemma 4 written as llama.cpp's converter writes it (conversion/gemma.py
``Gemma4Model``): arch ``gemma4``, ``key_length`` the global head size and ``key_length_swa``
the local one, ``head_count_kv`` and (double-wide MLPs) ``feed_forward_length`` per layer,
``sliding_window_pattern`` per layer, ``shared_kv_layers``, ``embedding_length_per_layer_input``,
norms as stored (no shift), the router's ``scale`` as ``ffn_gate_inp.scale`` and its per-expert
scale as ``ffn_down_exps.scale``, ``layer_scalar`` as ``layer_output_scale``, the fused
``ffn_gate_up_exps``, and ``rope_freqs`` = 1 on the proportional RoPE's rotated angles, 1e30 on
the others; gguf-py's tensor names."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from tests.helpers.tiny_families import TOKENIZER
from tests.unit.loader_fixtures import _add_bpe_vocab


def write_gemma4_gguf(path: Path, model: torch.nn.Module, *,
                      expert_qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """``expert_qtype``: the 3-D experts in that type (``tiny_moe.quantize_experts_like_gguf``
    on the model first)."""
    cfg = model.config
    n, types = cfg.num_hidden_layers, cfg.layer_types
    swa = [t == "sliding_attention" for t in types]
    full, local = swa.index(False), swa.index(True)
    global_dim = cfg.per_layer_config[full].head_dim
    global_kv = cfg.per_layer_config[full].num_key_value_heads
    local_dim = cfg.per_layer_config[local].head_dim
    local_kv = cfg.per_layer_config[local].num_key_value_heads
    rope = cfg.rope_parameters
    w = GGUFWriter(str(path), "gemma4")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n)
    first_shared = n - cfg.num_kv_shared_layers
    if cfg.use_double_wide_mlp:
        w.add_feed_forward_length([cfg.intermediate_size * (1 if i < first_shared else 2)
                                   for i in range(n)])
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv([local_kv if s else global_kv for s in swa])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(global_dim)
    w.add_value_length(global_dim)
    w.add_key_length_swa(local_dim)
    w.add_value_length_swa(local_dim)
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_rope_dimension_count(global_dim)
    w.add_rope_dimension_count_swa(local_dim)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern(swa)
    w.add_shared_kv_layers(cfg.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input or 0)
    if cfg.enable_moe_block:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    _add_bpe_vocab(w, TOKENIZER)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.detach().float().numpy().astype(np.float32)
        if a.ndim == 3 and expert_qtype != GGMLQuantizationType.F32:
            w.add_tensor(_name(hf, names), quantize(a, expert_qtype), raw_dtype=expert_qtype)
        else:
            w.add_tensor(_name(hf, names), a)
    rotated = int(global_dim * rope["full_attention"]["partial_rotary_factor"] / 2)
    freqs = [1.0] * rotated + [1e30] * (global_dim // 2 - rotated)
    w.add_tensor("rope_freqs.weight", np.asarray(freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _name(hf: str, names) -> str:  # noqa: ANN001
    if hf.endswith("router.scale"):
        return f"blk.{hf.split('.')[2]}.ffn_gate_inp.scale"
    if hf.endswith("router.per_expert_scale"):
        return f"blk.{hf.split('.')[2]}.ffn_down_exps.scale"
    name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(f"no llama.cpp name for {hf}")
    if not name.endswith((".weight", ".bias")):  # layer_scalar, the 3-D experts: ".weight" added
        name += ".weight"
    return name
