"""Tiny random hybrid (Gated DeltaNet + gated attention) models — Qwen3-Next, Qwen3.5 dense and
MoE — saved as HF folders or written as llama.cpp GGUFs, and a runner that feeds our model the
way the engine does (paged K/V for attention layers, state slots for recurrent ones).

``hybrid_model``: ``tiny_families.hf_model`` with the (1 + w) norms drawn around 0, the gated
norm around 1, slow decays (A_log ≈ −2, so the state carries far) and the conv and experts at
unit activation scale. ``save_hybrid_hf`` adds an ``mtp.*`` block to the folder (Qwen3.5's
checkpoints carry one). ``write_hybrid_gguf`` plays llama.cpp's converter (conversion/qwen.py
``Qwen3NextModel``, ``_LinearAttentionVReorderBase``): ``in_proj_qkvz`` un-grouped into
``attn_qkv`` + ``attn_gate``, value heads reordered grouped → tiled for ``qwen35*``,
``ssm_a`` = −exp(A_log), ``ssm_dt.bias``, the conv kernel squeezed, (1 + w) norms stored
with the 1 added, the ``ssm.*`` keys, and one MTP block after the trunk's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from pensieve.models.cache_spec import PagedKV, RecurrentState
from pensieve.models.forward_context import ForwardContext, RecurrentStates, SequenceSlice
from pensieve.models.registry import family
from tests.helpers.tiny_families import Q, TOKENIZER, VOCAB, _is_projection, hf_model, save_hf
from tests.unit.loader_fixtures import _add_bpe_vocab

ARCHS = {"qwen3next": gguf.MODEL_ARCH.QWEN3NEXT, "qwen35": gguf.MODEL_ARCH.QWEN35,
         "qwen35moe": gguf.MODEL_ARCH.QWEN35MOE}
BLOCK = 4

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, linear_conv_kernel_dim=4, linear_key_head_dim=32,
              linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
              full_attention_interval=2, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                               "partial_rotary_factor": 0.5})
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=64)
CONFIGS = {
    "qwen3_next": ("Qwen3NextConfig", {**COMMON, **MOE, "norm_topk_prob": True}, "qwen3next"),
    "qwen3_5": ("Qwen3_5TextConfig", COMMON, "qwen35"),
    # Qwen3.5-MoE's configs have no dense intermediate_size (every layer is sparse)
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig",
                    {k: v for k, v in {**COMMON, **MOE}.items() if k != "intermediate_size"},
                    "qwen35moe"),
}


def hybrid_config(name: str, **overrides: Any) -> Any:
    import transformers

    cls, kwargs, _ = CONFIGS[name]
    return getattr(transformers, cls)(**{**kwargs, **overrides})


def hybrid_model(config: Any, seed: int = 0) -> torch.nn.Module:
    model = hf_model(config, seed)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("norm.weight"):
                p.copy_(0.2 * noise)  # (1 + w)
            elif name.endswith("A_log"):
                p.copy_(-2.0 + 0.5 * noise)
            elif p.ndim == 3:  # conv [C, 1, K], experts [E, out, in]
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def save_hybrid_hf(folder: Path, model: torch.nn.Module) -> Path:
    """``save_pretrained`` plus an ``mtp.*`` block in the weights (never run)."""
    save_hf(folder, model)
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    h = model.config.hidden_size
    tensors["mtp.fc.weight"] = torch.randn(h, 2 * h)
    tensors["mtp.layers.0.input_layernorm.weight"] = torch.zeros(h)
    tensors["mtp.norm.weight"] = torch.zeros(h)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return folder


def is_projection(hf: str) -> bool:
    """A weight llama.cpp quantises: the projections, Gated DeltaNet's ``in_proj_*`` too."""
    return _is_projection(hf) or (".linear_attn.in_proj_" in hf and hf.endswith(".weight"))


def quantize_hybrid_like_gguf(model: torch.nn.Module, qtype: Q) -> None:
    """Round every projection and the stacked experts through ``qtype`` in place (what the GGUF
    holds; blocks run along rows, and the converter's value-head reorder moves whole 32-wide
    blocks here)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_projection(name) or (p.ndim == 3 and ".experts." in name):
                a = p.detach().numpy().astype(np.float32)
                p.copy_(torch.from_numpy(dequantize(quantize(a, qtype), qtype).reshape(a.shape)))


def _v_tiled(t: torch.Tensor, dim: int, nk: int, nv: int, head: int) -> torch.Tensor:
    """Value heads grouped by key head → tiled, along ``dim`` (the converter's reorder)."""
    shape = list(t.shape)
    r = nv // nk
    t = t.reshape(*shape[:dim], nk, r, head, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def _converter_tensors(model: torch.nn.Module, arch: str, legacy: bool = False
                       ) -> dict[str, torch.Tensor]:
    """The converter's output in HF-ish names that gguf-py's map turns into llama.cpp's."""
    cfg = model.config
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    key, value = nk * dk, nv * dv
    tiled = arch != "qwen3next" and nk != nv
    out: dict[str, torch.Tensor] = {}
    for hf, t in model.state_dict().items():
        t = t.detach().float()
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf.endswith("norm.weight") and not hf.endswith("linear_attn.norm.weight"):
            t = t + 1
        if hf.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            out[hf.replace("gate_up_proj", "gate_proj.weight")] = gate
            out[hf.replace("gate_up_proj", "up_proj.weight")] = up
            continue
        if hf.endswith("experts.down_proj"):
            out[hf + ".weight"] = t
            continue
        if hf.endswith("in_proj_qkvz.weight") and legacy:  # early files: ssm_in, as HF holds it
            out[hf.replace("linear_attn.in_proj_qkvz", "ssm_in")] = t
            continue
        if hf.endswith("in_proj_qkvz.weight"):  # Qwen3-Next: one group per key head
            q, k, v, z = t.t().reshape(-1, nk, 2 * dk + 2 * value // nk).split(
                [dk, dk, value // nk, value // nk], dim=-1)
            flat = [x.reshape(cfg.hidden_size, -1) for x in (q, k, v, z)]
            out[hf.replace("in_proj_qkvz", "in_proj_qkv")] = torch.cat(flat[:3], -1).t()
            out[hf.replace("in_proj_qkvz", "in_proj_z")] = flat[3].t()
            continue
        if tiled and ".linear_attn." in hf:
            if hf.endswith("in_proj_qkv.weight"):
                t = torch.cat([t[:2 * key], _v_tiled(t[2 * key:], 0, nk, nv, dv)])
            elif hf.endswith("in_proj_z.weight"):
                t = _v_tiled(t, 0, nk, nv, dv)
            elif hf.endswith(("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias")):
                t = _v_tiled(t, 0, nk, nv, 1)
            elif hf.endswith("conv1d.weight"):
                t = torch.cat([t[:2 * key], _v_tiled(t[2 * key:], 0, nk, nv, dv)])
            elif hf.endswith("out_proj.weight"):
                t = _v_tiled(t, 1, nk, nv, dv)
        if hf.endswith("A_log"):
            t = -torch.exp(t)
        elif hf.endswith("dt_bias"):
            hf = hf.replace("dt_bias", "dt_proj.bias")
        elif hf.endswith("conv1d.weight"):
            t = t.squeeze()
        out[hf] = t
    return out


def write_hybrid_gguf(path: Path, model: torch.nn.Module, arch: str, *,
                      recurrent_layers: bool = True, qtype: Q = Q.F32,
                      legacy_ssm_in: bool = False) -> Path:
    """``model`` as llama.cpp writes it, plus one MTP block (``blk.{n}.*``, ``nextn.*``).
    ``recurrent_layers``: write ``attention.recurrent_layers`` (else only the interval);
    ``qtype``: the 2-D projections' type (``tiny_families.quantize_like_gguf`` the model
    first, so both sides compute with the same numbers); ``legacy_ssm_in``: Qwen3-Next's
    ``in_proj_qkvz`` as one ``ssm_in`` tensor (files from before the qkv/gate split)."""
    cfg = model.config
    n, h = cfg.num_hidden_layers, cfg.hidden_size
    w = GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(h)
    w.add_block_count(n + 1)
    w.add_nextn_predict_layers(1)
    if "intermediate_size" in cfg.to_dict():  # the converter writes it only where the config has it
        w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(int(cfg.head_dim * rope.get("partial_rotary_factor", 0.25)))
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
    w.add_ssm_state_size(cfg.linear_key_head_dim)
    w.add_ssm_group_count(cfg.linear_num_key_heads)
    w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
    w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
    if recurrent_layers:
        w.add_array(f"{arch}.attention.recurrent_layers",
                    [t == "linear_attention" for t in cfg.layer_types] + [False])
    w.add_full_attention_interval(list(cfg.layer_types).index("full_attention") + 1)
    if arch != "qwen3next":
        w.add_rope_dimension_sections([11, 11, 10, 0])
    if getattr(cfg, "num_experts", 0):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    _add_bpe_vocab(w, TOKENIZER)
    names = gguf.get_tensor_name_map(ARCHS[arch], n + 1)
    for hf, t in _converter_tensors(model, arch, legacy_ssm_in).items():
        name = (hf.replace("model.layers.", "blk.")
                if ".ssm_in." in hf else names.get_name(hf, try_suffixes=(".weight", ".bias")))
        if name is None:
            raise KeyError(f"no llama.cpp name for {hf}")
        a = t.numpy().astype(np.float32)
        if qtype != Q.F32 and (is_projection(hf) if a.ndim == 2 else ".experts." in hf):
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    # the MTP block after the trunk's (llama.cpp: blk.{n}.nextn.* + a full-attention layer)
    rng = np.random.default_rng(0)
    w.add_tensor(f"blk.{n}.nextn.eh_proj.weight", rng.standard_normal((h, 2 * h), np.float32))
    w.add_tensor(f"blk.{n}.nextn.enorm.weight", np.ones(h, np.float32))
    w.add_tensor(f"blk.{n}.attn_norm.weight", np.ones(h, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class HybridCache:
    """Our model's per-layer caches for tests: paged K/V (a spare block pool) for attention
    layers, ``slots`` state slots for recurrent ones."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    conv: list[torch.Tensor | None]
    ssm: list[torch.Tensor | None]

    @classmethod
    def build(cls, args: Any, blocks: int = 64, slots: int = 4) -> "HybridCache":
        k, v, conv, ssm = [], [], [], []
        for spec in family(args.architecture).cache_layout(args):
            if isinstance(spec, PagedKV):
                k.append(torch.zeros(blocks, BLOCK, spec.kv_heads, spec.head_dim))
                v.append(torch.zeros(blocks, BLOCK, spec.kv_heads, spec.v_head_dim))
                conv.append(None)
                ssm.append(None)
            else:
                assert isinstance(spec, RecurrentState)
                k.append(torch.zeros(0, BLOCK, 1, 1))
                v.append(torch.zeros(0, BLOCK, 1, 1))
                conv.append(torch.full((slots, *spec.conv_shape), float("nan")))
                ssm.append(torch.full((slots, *spec.state_shape), float("nan")))
        return cls(k, v, conv, ssm)


@dataclass(frozen=True)
class Step:
    """One sequence's part of a step: ``ids[start:end]`` of a sequence in state ``slot`` whose
    K/V lives in ``blocks``."""

    ids: list[int]
    start: int
    end: int
    slot: int
    blocks: list[int]


def run_step(model: torch.nn.Module, cache: HybridCache, steps: list[Step]) -> torch.Tensor:
    """One forward over several sequences flattened together; logits of every new token."""
    tokens, positions, slot_map, seqs, at = [], [], [], [], 0
    for s in steps:
        n = s.end - s.start
        tokens += s.ids[s.start:s.end]
        positions += list(range(s.start, s.end))
        slot_map += [s.blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(s.start, s.end)]
        seqs.append(SequenceSlice(at, n, s.end, torch.tensor(s.blocks)))
        at += n
    states = RecurrentStates(cache.conv, cache.ssm, torch.tensor([s.slot for s in steps]))
    ctx = ForwardContext(cache.k, cache.v, torch.tensor(slot_map), seqs, torch.arange(at),
                         states=states)
    with torch.no_grad():
        return model(torch.tensor(tokens), torch.tensor(positions), ctx)


def stepped_logits(model: torch.nn.Module, args: Any, ids: list[int], ends: list[int],
                   slot: int = 1) -> torch.Tensor:
    """Logits of ``ids`` fed in pieces ending at ``ends`` (prefill chunks, then one decode
    per remaining token), the state carried in its slot between steps."""
    cache = HybridCache.build(args)
    blocks = torch.randperm(64, generator=torch.Generator().manual_seed(1))[
        : -(-len(ids) // BLOCK)].tolist()
    parts, start = [], 0
    for end in [*ends, *range(ends[-1] + 1, len(ids) + 1)]:
        parts.append(run_step(model, cache, [Step(ids, start, end, slot, blocks)]))
        start = end
    return torch.cat(parts)
