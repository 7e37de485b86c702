"""Tiny random mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral, GLM-4.5) saved as HF
folders or written as llama.cpp GGUFs.

``moe_model`` is ``tiny_families.hf_model`` with the stacked experts drawn at unit activation
scale too and GLM's ``e_score_correction_bias`` random (it is a buffer: zero otherwise).
``write_moe_gguf`` plays llama.cpp's converter: gguf-py's tensor name map for the architecture
(``ffn_{gate,up,down}_exps`` 3-D, ``ffn_gate_inp``, ``ffn_*_shexp``, ``ffn_gate_inp_shexp``,
``exp_probs_b.bias``, GLM's ``post_attention_norm``), the ``{arch}.expert_*`` keys, Llama's Q/K
permutation for Mixtral. ``save_fused_hf`` writes the experts as transformers 5 holds them
(one 3-D ``gate_up_proj``/``down_proj`` per layer) instead of ``save_pretrained``'s per-expert
matrices.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file

from tests.helpers.tiny_families import TOKENIZER, hf_model, save_hf
from tests.unit.loader_fixtures import _add_bpe_vocab, llamacpp_permute

ARCHS = {"qwen3moe": gguf.MODEL_ARCH.QWEN3MOE, "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE,
         "llama": gguf.MODEL_ARCH.LLAMA, "glm4moe": gguf.MODEL_ARCH.GLM4_MOE}


def moe_model(config: Any, seed: int = 0) -> torch.nn.Module:
    model = hf_model(config, seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 3:  # [E, out, in]
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[2] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return model


def quantize_experts_like_gguf(model: torch.nn.Module, qtype: GGMLQuantizationType) -> None:
    """Round every stacked expert weight through ``qtype`` in place (blocks run along the
    last dim, as in the GGUF's 3-D ``ffn_*_exps``)."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 3:
                a = p.detach().numpy().astype(np.float32)
                p.copy_(torch.from_numpy(dequantize(quantize(a, qtype), qtype).reshape(a.shape)))


def save_fused_hf(folder: Path, model: torch.nn.Module) -> Path:
    """An HF folder whose experts are 3-D tensors (transformers 5's in-memory names)."""
    save_hf(folder, model)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _hf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict in the converter's input names: experts split into gate/up/down 3-D."""
    out = {}
    for hf, t in model.state_dict().items():
        if hf.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            out[hf.replace("gate_up_proj", "gate_proj.weight")] = gate
            out[hf.replace("gate_up_proj", "up_proj.weight")] = up
        elif hf.endswith("experts.down_proj"):
            out[hf + ".weight"] = t
        elif hf.endswith("e_score_correction_bias"):
            out[hf.replace("e_score_correction_bias", "e_score_correction.bias")] = t
        else:
            out[hf] = t
    return out


def write_moe_gguf(path: Path, model: torch.nn.Module, arch: str, *,
                   expert_qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                   expert_blocks: Callable[[tuple[int, ...]], np.ndarray] | None = None,
                   matrix_qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """``model`` as llama.cpp's converter writes it for ``arch``; the 3-D expert tensors in
    ``expert_qtype`` (round the model first with ``quantize_experts_like_gguf``), or, with
    ``expert_blocks``, the ``expert_qtype`` blocks it returns for a tensor's float shape (for
    types gguf-py cannot quantise: the file's experts are then not the model's); the other
    matrices but the router in ``matrix_qtype`` (so attention runs on the code kernels)."""
    cfg = model.config
    w = GGUFWriter(str(path), arch)
    heads, kv_heads, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if getattr(cfg, "head_dim", None):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "glm4moe":
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.5)))
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts")
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch == "glm4moe":
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    _add_bpe_vocab(w, TOKENIZER)
    names = gguf.get_tensor_name_map(ARCHS[arch], cfg.num_hidden_layers)
    for hf, tensor in _hf_tensors(model).items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no llama.cpp name for {hf}")
        t = tensor.detach().float()
        if arch == "llama" and ".q_proj." in hf:
            t = llamacpp_permute(t, heads)
        elif arch == "llama" and ".k_proj." in hf:
            t = llamacpp_permute(t, kv_heads)
        a = t.numpy().astype(np.float32)
        if a.ndim == 3 and expert_blocks is not None:
            w.add_tensor(name, expert_blocks(a.shape), raw_dtype=expert_qtype)
        elif a.ndim == 3 and expert_qtype != GGMLQuantizationType.F32:
            w.add_tensor(name, quantize(a, expert_qtype), raw_dtype=expert_qtype)
        elif (a.ndim == 2 and matrix_qtype != GGMLQuantizationType.F32
              and "ffn_gate_inp" not in name):
            w.add_tensor(name, quantize(a, matrix_qtype), raw_dtype=matrix_qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
