"""Gemma 4 (text) against transformers on tiny random configs saved as HF folders: the dense
shape (local/global layers with their own head sizes and KV heads, keys-as-values and
"proportional" RoPE on global layers, per-layer embeddings, KV-shared last layers with
double-wide MLPs, soft-capping) and the MoE shape (router + experts beside the dense MLP);
logits for a whole prefill and chunked prefill + decodes over a shuffled paged cache of the
family's per-layer shapes (windows binding), from the HF folder and from a GGUF written as
llama.cpp's converter writes it, and the engine's greedy tokens against ``generate``."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from pensieve.backends.torch_backend import build_model  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.loaders.registry import load_checkpoint  # noqa: E402
from pensieve.models.cache_spec import PagedKV  # noqa: E402
from pensieve.models.registry import family  # noqa: E402
from tests.helpers.paged_run import engine_tokens, paged_logits, prompt  # noqa: E402
from tests.helpers.tiny_families import VOCAB, hf_model, save_hf  # noqa: E402
from tests.helpers.tiny_gemma4 import write_gemma4_gguf  # noqa: E402

ATOL = 1e-4
CONTEXT, SEQ = 64, 36
TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
DIMS: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
    num_global_key_value_heads=1, attention_k_eq_v=True, max_position_embeddings=256,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=8,
    layer_types=TYPES, final_logit_softcapping=30.0, tie_word_embeddings=True,
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                     "full_attention": {"rope_type": "proportional", "rope_theta": 1000.0,
                                        "partial_rotary_factor": 0.25}})
CASES: dict[str, dict[str, Any]] = {
    # E2B/E4B-like: PLE, the last 3 layers read earlier layers' K/V with double-wide MLPs
    "dense": dict(num_kv_shared_layers=3, use_double_wide_mlp=True),
    # 26B-A4B-like: an MoE block in every layer, no PLE, no sharing
    "moe": dict(hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8,
                top_k_experts=2, moe_intermediate_size=24),
}


def config(name: str):
    return transformers.Gemma4TextConfig(**{**DIMS, **CASES[name]})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gemma4")


@cache
def reference(name: str) -> torch.nn.Module:
    """Norms at 1 ± 0.2 (Gemma 4 multiplies by w), the router's scales and each layer's
    ``layer_scalar`` drawn too, experts at unit activation scale."""
    model = hf_model(config(name))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(("router.scale", "per_expert_scale")):
                p.add_(1.0)
            elif p.ndim == 3:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[2] ** 0.5)
        for n, b in model.named_buffers():
            if n.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


@cache
def folder(root: Path, name: str) -> Path:
    return save_hf(root / name, reference(name))


@cache
def gguf_file(root: Path, name: str) -> Path:
    return write_gemma4_gguf(root / f"{name}.gguf", reference(name))


def ours(path: Path):
    ckpt = load_checkpoint(path)
    return ckpt, build_model(ckpt, EngineConfig(context_length=CONTEXT))


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("name", CASES)
def test_matches_transformers(root, name, source):
    ckpt, model = ours(folder(root, name) if source == "hf" else gguf_file(root, name))
    ids = prompt(SEQ, VOCAB)
    with torch.no_grad():
        expected = reference(name)(torch.tensor([ids])).logits[0].float()
    layout = family("gemma4").cache_layout(ckpt.args)
    whole, stepped = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5], layout)
    err = max((whole - expected).abs().max().item(), (stepped - expected).abs().max().item())
    print(f"gemma4 {name} ({source}): max abs logit error {err:.2e} "
          f"(|logits| ≤ {expected.abs().max():.1f})")
    torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(stepped, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, source", [("dense", "gguf"), ("moe", "hf")])
def test_engine_greedy_equals_generate(root, name, source):
    ckpt, model = ours(folder(root, name) if source == "hf" else gguf_file(root, name))
    ids = prompt(SEQ - 8, VOCAB, seed=2)
    with torch.no_grad():
        expected = reference(name).generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    assert engine_tokens(model, ckpt, CONTEXT, ids, 6) == expected


def test_multimodal_checkpoint_loads_its_language_model(root):
    """A ``gemma4`` (Gemma4ForConditionalGeneration) folder: ``text_config``, the weights under
    ``model.language_model.*``, and tower tensors that are not read."""
    text = reference("dense")
    mm = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(
        text_config=config("dense").to_dict(), vision_config=None, audio_config=None)).eval()
    state = {k.replace("model.", "model.language_model.", 1): v
             for k, v in text.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = mm.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    path = save_hf(root / "multimodal", mm)
    save_file({"model.vision_tower.encoder.weight": torch.ones(4, 4),
               "model.embed_vision.embedding_projection.weight": torch.ones(4, 4)},
              str(path / "towers.safetensors"), metadata={"format": "pt"})
    ckpt, model = ours(path)
    assert ckpt.args.num_layers == 6
    assert not any("tower" in k or "vision" in k for k in ckpt.weights)
    ids = prompt(SEQ, VOCAB)
    with torch.no_grad():
        expected = mm(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(expected, text(torch.tensor([ids])).logits[0].float())
    layout = family("gemma4").cache_layout(ckpt.args)
    whole, _ = paged_logits(model, ckpt.args, ids, [SEQ - 5], layout)
    torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_quantised_experts_stay_codes_on_the_cpu(root, qtype):
    """The MoE block's GGUF experts (``ffn_gate_up_exps`` read as gate and up halves) kept as
    codes (``keep_int4``: SlicedExperts with GELU; the kernels round activations to 8 bits:
    within 5e-3, 1.8e-3 / 0.8e-3 measured), and dequantised on load (exact) — against
    transformers on the dequantised experts. Widths the kernels' blocks take: 256."""
    from gguf import GGMLQuantizationType

    from pensieve.backends.cpu_quant.expert_linear import SlicedExperts
    from tests.helpers.tiny_moe import quantize_experts_like_gguf

    kind = getattr(GGMLQuantizationType, qtype)
    ref = hf_model(transformers.Gemma4TextConfig(**{
        **DIMS, **CASES["moe"], "hidden_size": 256, "intermediate_size": 256,
        "moe_intermediate_size": 256}))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("norm.weight") or n.endswith(("router.scale", "per_expert_scale")):
                p.add_(1.0)
    quantize_experts_like_gguf(ref, kind)
    path = write_gemma4_gguf(root / f"moe-{qtype}.gguf", ref, expert_qtype=kind)
    ids = prompt(SEQ, VOCAB)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    for keep, atol in ((False, ATOL), (True, 5e-3)):
        ckpt, model = ours_kept(path, keep)
        assert sum(isinstance(m, SlicedExperts) for m in model.modules()) == (6 if keep else 0)
        layout = family("gemma4").cache_layout(ckpt.args)
        whole, stepped = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5], layout)
        err = max((g - expected).abs().max().item() for g in (whole, stepped))
        print(f"gemma4 {qtype} experts (keep_int4={keep}): max abs logit error {err:.2e} "
              f"(|logits| ≤ {expected.abs().max():.1f})")
        assert err < atol


def ours_kept(path: Path, keep: bool):
    ckpt = load_checkpoint(path, keep_int4=keep)
    return ckpt, build_model(ckpt, EngineConfig(context_length=CONTEXT))


def test_cache_layout_per_layer_shapes(root):
    """Local and global shapes; the three KV-shared layers keep nothing of their own."""
    args = family("gemma4").args_from_hf(config("dense").to_dict())
    local, full = PagedKV(2, 16, 16, 8), PagedKV(1, 32, 32, None)
    layout = (local, local, full, PagedKV(0, 0, 0, 8), PagedKV(0, 0, 0, 8), PagedKV(0, 0, 0, None))
    assert family("gemma4").cache_layout(args) == layout
    gguf_args = load_checkpoint(gguf_file(root, "dense"), tensors=False).args
    assert family("gemma4").cache_layout(gguf_args) == layout
    assert gguf_args.extra["gemma4"] == args.extra["gemma4"]
