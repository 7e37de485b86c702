"""Tiny random latent-attention models (GLM-4.7-Flash ``glm4_moe_lite``, DeepSeek-V3) saved as HF
folders or written as llama.cpp ``deepseek2`` GGUFs, optionally with a multi-token-prediction
layer after the trunk.

``write_mla_gguf`` plays llama.cpp's converter (conversion/deepseek.py ``DeepseekV2Model``,
conversion/glm.py ``Glm4MoeLiteModel``): ``head_count_kv`` 1, ``key_length`` latent + rotary,
``key_length_mla``/``value_length_mla`` the per-head dims, ``kv_b_proj`` split per head into
``attn_k_b`` (transposed) and ``attn_v_b`` (or, ``split=False``, a legacy unsplit
``attn_kv_b``), experts stacked 3-D, gguf-py's tensor names; with ``mtp`` the block count
includes the MTP layer, ``nextn_predict_layers`` is set and ``blk.{n}.*`` + ``blk.{n}.nextn.*``
are written. ``add_hf_mtp`` adds an MTP layer's tensors (``model.layers.{n}.*``) to a saved HF
folder as GLM's checkpoints carry it; ``with_gguf_mtp`` copies another writer's F32 GGUF
(``glm4moe``) with an MTP layer added the way conversion/glm.py writes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file

from tests.helpers.tiny_families import TOKENIZER
from tests.helpers.tiny_moe import _hf_tensors
from tests.unit.loader_fixtures import _add_bpe_vocab

# the MTP block's own tensors: HF suffix after ``model.layers.{n}.`` → llama.cpp's
MTP_NAMES = {"eh_proj.weight": "nextn.eh_proj.weight", "enorm.weight": "nextn.enorm.weight",
             "hnorm.weight": "nextn.hnorm.weight",
             "shared_head.norm.weight": "nextn.shared_head_norm.weight",
             "shared_head.head.weight": "nextn.shared_head_head.weight",
             "embed_tokens.weight": "nextn.embed_tokens.weight"}


def mtp_tensors(tensors: dict[str, torch.Tensor], cfg: Any, seed: int = 5
                ) -> dict[str, torch.Tensor]:
    """An MTP layer at index ``num_hidden_layers``: a copy of the last layer's weights (noise
    added) plus the block's own projection, norms, head and embedding, in HF names."""
    n, h, v = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    last = f"model.layers.{n - 1}."
    out = {f"model.layers.{n}." + k[len(last):]: t + 0.1 * torch.randn(t.shape, generator=g)
           for k, t in tensors.items() if k.startswith(last)}
    own = {"eh_proj.weight": (h, 2 * h), "enorm.weight": (h,), "hnorm.weight": (h,),
           "shared_head.norm.weight": (h,), "shared_head.head.weight": (v, h),
           "embed_tokens.weight": (v, h)}
    out.update({f"model.layers.{n}.{k}": torch.randn(s, generator=g) for k, s in own.items()})
    return out


def add_hf_mtp(folder: Path, model: torch.nn.Module) -> Path:
    """``folder`` (saved by ``save_hf``) with the MTP layer's tensors in a second file."""
    extra = mtp_tensors({k: v.detach() for k, v in model.state_dict().items()}, model.config)
    save_file({k: v.contiguous() for k, v in extra.items()}, str(folder / "mtp.safetensors"),
              metadata={"format": "pt"})
    return folder


def write_mla_gguf(path: Path, model: torch.nn.Module, *, mtp: bool = False,
                   split: bool = True, qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                   expert_qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                   kv_b_qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """``qtype``: the 2-D projections (not ``kv_b_proj``'s halves, whose blocks run along
    another axis than the HF matrix's) in that type — round the model first with
    ``tiny_families.quantize_like_gguf`` and restore ``kv_b_proj``; ``expert_qtype``: the 3-D
    experts (``tiny_moe.quantize_experts_like_gguf`` first); ``kv_b_qtype``: ``attn_k_b`` /
    ``attn_v_b`` (``round_kv_b_like_gguf`` first)."""
    cfg = model.config
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    rank, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope, v_dim = cfg.qk_nope_head_dim, cfg.v_head_dim
    layers = cfg.num_hidden_layers + (1 if mtp else 0)
    w = GGUFWriter(str(path), "deepseek2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope_params = cfg.rope_parameters
    w.add_rope_freq_base(rope_params["rope_theta"])
    if rope_params.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope_params["factor"])
        w.add_rope_scaling_orig_ctx_len(rope_params["original_max_position_embeddings"])
        if rope_params.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * rope_params["mscale_all_dim"])
    dense = (cfg.first_k_dense_replace if hasattr(cfg, "first_k_dense_replace")
             else cfg.mlp_layer_types.index("sparse"))
    w.add_leading_dense_block_count(dense)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    if split:
        w.add_kv_lora_rank(rank)
        w.add_key_length(rank + rope)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v_dim)
    else:  # a legacy file: MHA dims, the unsplit attn_kv_b
        w.add_kv_lora_rank(rank)
        w.add_key_length(nope + rope)
        w.add_value_length(v_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    w.add_rope_dimension_count(rope)
    if mtp:
        w.add_nextn_predict_layers(1)
    _add_bpe_vocab(w, TOKENIZER)
    tensors = _hf_tensors(model)
    if mtp:
        tensors.update(mtp_tensors(tensors, cfg))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, layers)
    for hf, t in tensors.items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        for name, a in _converted(hf, t.detach().float(), names, heads, nope, v_dim, split):
            a = a.numpy().astype(np.float32)
            if qtype != GGMLQuantizationType.F32 and a.ndim == 2 and hf.endswith("_proj.weight") \
                    and "kv_b_proj" not in hf and hf.startswith("model.layers."):
                w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
            elif a.ndim == 3 and ".experts." in hf and expert_qtype != GGMLQuantizationType.F32:
                w.add_tensor(name, quantize(a, expert_qtype), raw_dtype=expert_qtype)
            elif name.endswith(("attn_k_b.weight", "attn_v_b.weight")) \
                    and kv_b_qtype != GGMLQuantizationType.F32:
                w.add_tensor(name, quantize(a, kv_b_qtype), raw_dtype=kv_b_qtype)
            else:
                w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def round_kv_b_like_gguf(model: torch.nn.Module, qtype: GGMLQuantizationType) -> None:
    """Round each ``kv_b_proj`` through ``qtype`` as its llama.cpp halves hold it: ``attn_k_b``
    [H, rank, nope] (blocks along nope) and ``attn_v_b`` [H, v, rank] (blocks along rank)."""
    cfg = model.config
    heads, nope, v_dim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("kv_b_proj.weight"):
                kv = p.view(heads, nope + v_dim, -1)
                k_b = kv[:, :nope].transpose(1, 2).contiguous().numpy()
                v_b = kv[:, nope:].contiguous().numpy()
                k_b = dequantize(quantize(k_b, qtype), qtype).reshape(k_b.shape)
                v_b = dequantize(quantize(v_b, qtype), qtype).reshape(v_b.shape)
                p.copy_(torch.cat((torch.from_numpy(k_b).transpose(1, 2),
                                   torch.from_numpy(v_b)), dim=1).reshape(p.shape))


def _converted(hf: str, t: torch.Tensor, names: Any, heads: int, nope: int, v_dim: int,
               split: bool) -> list[tuple[str, torch.Tensor]]:
    layer, _, rest = hf.removeprefix("model.layers.").partition(".")
    if hf.startswith("model.layers.") and rest in MTP_NAMES:
        return [(f"blk.{layer}.{MTP_NAMES[rest]}", t)]
    if hf.endswith("kv_b_proj.weight") and split:
        kv_b = t.view(heads, nope + v_dim, t.shape[-1])
        k_b, v_b = kv_b.split([nope, v_dim], dim=1)
        return [(f"blk.{layer}.attn_k_b.weight", k_b.transpose(1, 2).contiguous()),
                (f"blk.{layer}.attn_v_b.weight", v_b.contiguous())]
    name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(f"no llama.cpp name for {hf}")
    return [(name, t)]


def with_gguf_mtp(src: Path, dst: Path, cfg: Any) -> Path:
    """``src`` (an F32 GGUF of ``cfg``'s model) rewritten with one MTP layer: ``block_count``
    + 1, ``nextn_predict_layers`` 1, ``blk.{n}.*`` copied from the last layer (noise added) and
    ``blk.{n}.nextn.*``."""
    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == f"{arch}.block_count":
            value += 1
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    w.add_nextn_predict_layers(1)
    n = cfg.num_hidden_layers
    tensors = {t.name: torch.from_numpy(np.array(t.data)).reshape(
        tuple(reversed([int(d) for d in t.shape]))) for t in reader.tensors}
    layered = {f"model.layers.{k.split('.')[1]}.{k.split('.', 2)[2]}": v
               for k, v in tensors.items() if k.startswith("blk.")}
    for hf, t in mtp_tensors(layered, cfg).items():
        rest = hf.split(".", 3)[3]
        tensors[f"blk.{n}.{MTP_NAMES.get(rest, rest)}"] = t
    for name, t in tensors.items():
        w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
