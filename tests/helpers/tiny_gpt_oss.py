"""Tiny random gpt-oss models: saved as HF folders (float, or with MXFP4 experts as the released
checkpoints hold them) and written as llama.cpp GGUFs (float or MXFP4 experts).

``gpt_oss_model`` draws the expert matrices wide enough that the SwiGLU clamp (±7) binds and the
sinks at unit scale so they matter. ``mxfp4_codes`` is an MXFP4 quantiser (the rule of gguf-py's
``quants.MXFP4``: scale 2^(⌊log2 max|x|⌋ − 2), nearest E2M1 code, first on ties), with packers
for both layouts; ``round_experts_mxfp4`` rounds a model's experts through it so that the
reference computes with the numbers the file holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType
from safetensors.torch import save_file

from tests.helpers.tiny_families import TOKENIZER, VOCAB, hf_model, save_hf
from tests.unit.loader_fixtures import _add_bpe_vocab

DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def config(**overrides: Any):  # noqa: ANN201 - a transformers config
    import transformers

    values: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager",
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 64,
                         "rope_theta": 1000.0})
    values.update(overrides)
    return transformers.GptOssConfig(**values)


def gpt_oss_model(cfg: Any, seed: int = 0) -> torch.nn.Module:
    model = hf_model(cfg, seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj"):  # [E, H, 2I]: |gate|, |up| often past 7
                p.copy_(4.0 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith("experts.down_proj"):  # [E, I, H]
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5 / 4.0)
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


# --- MXFP4 -------------------------------------------------------------------------------------

def mxfp4_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [..., K] float32 → (codes [..., K] uint8 in 0..15, exponents [..., K/32] uint8 E8M0)."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(d > 0, np.floor(np.log2(d)) - 2 + 127, 0).astype(np.uint8)
    half = np.where(e < 2, np.uint32(0x00200000) << e.astype(np.uint32),
                    (e.astype(np.uint32) - 1) << np.uint32(23)).view(np.float32)
    errs = np.abs(half[:, :, None] * DOUBLED[None, None, :] - blocks[:, :, None])
    codes = errs.argmin(axis=-1).astype(np.uint8)
    return codes.reshape(w.shape), e.reshape(*w.shape[:-1], -1)


def mxfp4_values(codes: np.ndarray, exps: np.ndarray) -> np.ndarray:
    scale = np.ldexp(np.float32(1.0), exps.astype(np.int32) - 128).astype(np.float32)
    v = DOUBLED[codes].reshape(*exps.shape, 32) * scale[..., None]
    return v.reshape(codes.shape).astype(np.float32)


def ggml_mxfp4_bytes(codes: np.ndarray, exps: np.ndarray) -> np.ndarray:
    """GGML blocks [..., K/32 * 17]: exponent, then nibbles (low j, high j + 16)."""
    c = codes.reshape(*exps.shape, 32)
    qs = c[..., :16] | (c[..., 16:] << 4)
    return np.concatenate([exps[..., None], qs], axis=-1).reshape(*exps.shape[:-1], -1)


def hf_mxfp4_blocks(codes: np.ndarray) -> np.ndarray:
    """HF ``*_blocks`` [..., G, 16]: byte i = code 2i (low) | code 2i + 1 (high)."""
    c = codes.reshape(*codes.shape[:-1], -1, 16, 2)
    return (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)


def _expert_matrices(model: torch.nn.Module):  # noqa: ANN202
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            yield name, p


def round_experts_mxfp4(model: torch.nn.Module) -> None:
    """Round every expert matrix through MXFP4 in place, blocks along its input dim (the
    checkpoints' [E, out, in] rows)."""
    with torch.no_grad():
        for _, p in _expert_matrices(model):
            rows = p.detach().transpose(1, 2).contiguous().numpy()
            codes, exps = mxfp4_codes(rows)
            p.copy_(torch.from_numpy(mxfp4_values(codes, exps)).transpose(1, 2))


def save_mxfp4_hf(folder: Path, model: torch.nn.Module) -> Path:
    """The released checkpoints' layout: experts as ``*_blocks``/``*_scales`` [E, out, ...],
    ``quantization_config.quant_method = "mxfp4"`` (round the model first)."""
    save_hf(folder, model)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            codes, exps = mxfp4_codes(t.transpose(1, 2).contiguous().numpy())
            state[name + "_blocks"] = torch.from_numpy(hf_mxfp4_blocks(codes))
            state[name + "_scales"] = torch.from_numpy(exps)
        else:
            state[name] = t.contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# --- GGUF ----------------------------------------------------------------------------------------

def _gguf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The converter's input names: experts split into gate/up/down [E, out, in] + biases."""
    out = {}
    for hf, t in model.state_dict().items():
        if hf.endswith("experts.gate_up_proj"):
            rows = t.transpose(1, 2)
            out[hf.replace("gate_up_proj", "gate_proj.weight")] = rows[:, ::2]
            out[hf.replace("gate_up_proj", "up_proj.weight")] = rows[:, 1::2]
        elif hf.endswith("experts.gate_up_proj_bias"):
            out[hf.replace("gate_up_proj_bias", "gate_proj.bias")] = t[..., ::2]
            out[hf.replace("gate_up_proj_bias", "up_proj.bias")] = t[..., 1::2]
        elif hf.endswith("experts.down_proj"):
            out[hf + ".weight"] = t.transpose(1, 2)
        elif hf.endswith("experts.down_proj_bias"):
            out[hf.replace("down_proj_bias", "down_proj.bias")] = t
        elif hf.endswith("sinks"):
            out[hf + ".weight"] = t
        else:
            out[hf] = t
    return out


def write_gpt_oss_gguf(path: Path, model: torch.nn.Module, *, mxfp4: bool = False) -> Path:
    """``model`` as llama.cpp's converter writes it (``conversion/gpt_oss.py``): ``gpt-oss``
    keys, expert matrices in MXFP4 (``mxfp4``; round the model first) or F32."""
    cfg = model.config
    w = GGUFWriter(str(path), "gpt-oss")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    _add_bpe_vocab(w, TOKENIZER)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, cfg.num_hidden_layers)
    for hf, tensor in _gguf_tensors(model).items():
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no llama.cpp name for {hf}")
        a = tensor.detach().float().contiguous().numpy()
        if mxfp4 and a.ndim == 3:
            codes, exps = mxfp4_codes(a)
            w.add_tensor(name, ggml_mxfp4_bytes(codes, exps),
                         raw_dtype=GGMLQuantizationType.MXFP4)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
