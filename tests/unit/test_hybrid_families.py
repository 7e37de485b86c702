"""Hybrid families (Gated DeltaNet + gated attention) against transformers: tiny random
Qwen3-Next, Qwen3.5 and Qwen3.5-MoE models saved as HF folders (with an ``mtp.*`` block) and
written as llama.cpp GGUFs (``qwen3next``/``qwen35``/``qwen35moe`` names and ``ssm.*`` keys, value
heads tiled, an MTP block after the trunk), loaded through ``load_checkpoint`` + ``build_model``
and run over paged K/V + per-sequence state slots (``ForwardContext.states``): a whole prompt,
the prompt in chunks with the state carried in its slot, decodes against transformers' own
cached steps, and two sequences batched together against each alone. Slots start as NaN: a
sequence with nothing cached must read zeros, never the slot.

float32 throughout; logits within ATOL of transformers' (|logits| ≈ 4)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pensieve.backends.torch_backend import build_model  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.loaders.registry import load_checkpoint  # noqa: E402
from pensieve.models.cache_spec import PagedKV, RecurrentState  # noqa: E402
from pensieve.models.family import FastPaths  # noqa: E402
from pensieve.models.registry import family, family_for_gguf, family_for_hf  # noqa: E402
from tests.helpers.paged_run import prompt  # noqa: E402
from tests.helpers.tiny_families import VOCAB  # noqa: E402
from tests.helpers.tiny_hybrid import (  # noqa: E402
    CONFIGS, HybridCache, Step, hybrid_config, hybrid_model, run_step, save_hybrid_hf,
    stepped_logits, write_hybrid_gguf,
)

ATOL = 1e-4
CONTEXT, SEQ = 96, 80  # past one 64-token chunk of the delta rule
NAMES = list(CONFIGS)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hybrid")


@cache
def reference(name: str) -> torch.nn.Module:
    return hybrid_model(hybrid_config(name))


@cache
def ours(root: Path, name: str, source: str, recurrent_layers: bool = True):
    if source == "hf":
        path = save_hybrid_hf(root / name, reference(name))
    else:
        path = write_hybrid_gguf(root / f"{name}-{recurrent_layers}.gguf", reference(name),
                                 CONFIGS[name][2], recurrent_layers=recurrent_layers)
    ckpt = load_checkpoint(path)
    return ckpt, build_model(ckpt, EngineConfig(context_length=CONTEXT))


@cache
def expected(name: str, seed: int = 0, n: int = SEQ) -> tuple[list[int], torch.Tensor]:
    ids = prompt(n, VOCAB, seed)
    with torch.no_grad():
        return ids, reference(name)(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("name", NAMES)
def test_prompt_whole_and_chunked_match_transformers(root, name, source):
    ckpt, model = ours(root, name, source)
    ids, want = expected(name)
    whole = stepped_logits(model, ckpt.args, ids, [SEQ])
    chunked = stepped_logits(model, ckpt.args, ids, [7, 70, 75])  # 3 chunks, then decodes
    print(f"{name} ({source}): max abs logit error whole "
          f"{(whole - want).abs().max():.2e}, chunked {(chunked - want).abs().max():.2e}")
    torch.testing.assert_close(whole, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, want, atol=ATOL, rtol=0)
    assert not any(n.startswith("mtp.") or ".layers.4." in n for n in ckpt.weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_decodes_match_transformers_cached_steps(root, name):
    """Prefill 70 tokens, then one token a step: transformers' own cache (recurrent form)."""
    ckpt, model = ours(root, name, "hf")
    ids, _ = expected(name)
    ref = reference(name)
    with torch.no_grad():
        out = ref(torch.tensor([ids[:70]]), use_cache=True)
        steps, cache_ = [out.logits[0, -1]], out.cache
        for i in range(70, SEQ):
            out = ref(torch.tensor([[ids[i]]]), cache=cache_, use_cache=True)
            steps.append(out.logits[0, -1])
    got = stepped_logits(model, ckpt.args, ids, [70])[69:]
    torch.testing.assert_close(got, torch.stack(steps).float(), atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next"])
def test_two_sequences_batched_equal_each_alone(root, name):
    """Chunks of two prompts in one step, then both decoding in one step, then one decoding
    beside the other's chunk: each sequence's logits equal its own run and transformers'."""
    ckpt, model = ours(root, name, "gguf")
    a, want_a = expected(name, 0, 70)
    b, want_b = expected(name, 5, 40)
    cache_ = HybridCache.build(ckpt.args)
    blocks_a, blocks_b = list(range(0, 18)), list(range(30, 40))
    plan = [((0, 66), (0, 20)), ((66, 67), (20, 21)), ((67, 68), (21, 39)), ((68, 70), (39, 40))]
    got_a, got_b = [], []
    for (sa, ea), (sb, eb) in plan:
        logits = run_step(model, cache_, [Step(a, sa, ea, 2, blocks_a), Step(b, sb, eb, 0, blocks_b)])
        got_a.append(logits[: ea - sa])
        got_b.append(logits[ea - sa:])
    got_a, got_b = torch.cat(got_a), torch.cat(got_b)
    torch.testing.assert_close(got_a, stepped_logits(model, ckpt.args, a, [66, 67, 68]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(got_b, stepped_logits(model, ckpt.args, b, [20, 21, 39]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(got_a, want_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_b, want_b, atol=ATOL, rtol=0)


def test_legacy_qwen3_next_gguf_with_one_ssm_in_tensor(root):
    """Early llama.cpp Qwen3-Next files keep HF's grouped ``in_proj_qkvz`` as ``ssm_in``."""
    path = write_hybrid_gguf(root / "qwen3_next-legacy.gguf", reference("qwen3_next"), "qwen3next",
                             legacy_ssm_in=True)
    ckpt = load_checkpoint(path)
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in ckpt.weights
    model = build_model(ckpt, EngineConfig(context_length=CONTEXT))
    ids, want = expected("qwen3_next")
    torch.testing.assert_close(stepped_logits(model, ckpt.args, ids, [SEQ]), want,
                               atol=ATOL, rtol=0)


def test_gguf_without_recurrent_layers_key_uses_the_interval(root):
    ckpt, model = ours(root, "qwen3_5", "gguf", recurrent_layers=False)
    ids, want = expected("qwen3_5")
    assert ckpt.args.layer_types == tuple(hybrid_config("qwen3_5").layer_types)
    torch.testing.assert_close(stepped_logits(model, ckpt.args, ids, [SEQ]), want,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_cache_layout_and_fast_paths(root, name):
    ckpt, model = ours(root, name, "gguf")
    cfg = hybrid_config(name)
    layout = family(ckpt.args.architecture).cache_layout(ckpt.args)
    conv = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
        cfg.linear_num_value_heads * cfg.linear_value_head_dim)
    for kind, spec in zip(cfg.layer_types, layout, strict=True):
        if kind == "linear_attention":
            assert spec == RecurrentState((conv, cfg.linear_conv_kernel_dim - 1), (
                cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim))
        else:
            assert spec == PagedKV(cfg.num_key_value_heads, cfg.head_dim, cfg.head_dim)
    moe = name != "qwen3_5"  # the per-module CPU kernels only, never the uniform-cache paths
    assert model.fast_paths == FastPaths(cpu_fused_mlp=not moe, cpu_moe_codes=moe)


@pytest.mark.parametrize("model_type, gguf_arch, name", [
    ("qwen3_next", "qwen3next", "qwen3_next"), ("qwen3_5", "qwen35", "qwen3_5"),
    ("qwen3_5_text", "qwen35", "qwen3_5"), ("qwen3_5_moe", "qwen35moe", "qwen3_5_moe"),
    ("qwen3_5_moe_text", "qwen35moe", "qwen3_5_moe"),
])
def test_registry_lookups(model_type, gguf_arch, name):
    assert family_for_hf(model_type).name == name
    assert family_for_gguf(gguf_arch).name == name


def test_multimodal_config_reads_its_text_config():
    """A Qwen3.5 checkpoint's config.json nests the language model under ``text_config``."""
    text = hybrid_config("qwen3_5").to_dict()
    args = family_for_hf("qwen3_5").args_from_hf(
        {"model_type": "qwen3_5", "text_config": text, "tie_word_embeddings": True})
    assert args.tie_word_embeddings and args.num_layers == text["num_hidden_layers"]
    assert args.extra["gated_delta"].value_heads == text["linear_num_value_heads"]
    assert args.partial_rotary_factor == 0.5


def test_multimodal_checkpoint_loads_its_language_model(root):
    """Qwen3.5's released folders: ``Qwen3_5ForConditionalGeneration`` names
    (``model.language_model.*``), a vision tower and an ``mtp.*`` block, the text model's keys
    under ``text_config``."""
    import json

    from safetensors.torch import load_file, save_file

    folder = save_hybrid_hf(root / "qwen3_5-vl", reference("qwen3_5"))
    file = folder / "model.safetensors"
    tensors = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in load_file(str(file)).items()}
    tensors["model.visual.patch_embed.proj.weight"] = torch.zeros(8, 3, 2, 2)
    save_file(tensors, str(file), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
        "tie_word_embeddings": False, "text_config": {**config, "model_type": "qwen3_5_text"},
        "vision_config": {"depth": 1}}))
    ckpt = load_checkpoint(folder)
    model = build_model(ckpt, EngineConfig(context_length=CONTEXT))
    ids, want = expected("qwen3_5")
    torch.testing.assert_close(stepped_logits(model, ckpt.args, ids, [SEQ]), want,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, qtype", [("qwen3_5", "Q8_0"), ("qwen3_5_moe", "Q4_0")])
def test_quantised_gguf_kept_as_codes(root, name, qtype):
    """Projections stored quantised: dequantised on load they match transformers on the same
    rounded weights; kept as codes (``keep_int4``: the CPU kernels, activations rounded to int8)
    the split linear-attention projections fuse as codes and stay close to that."""
    from tests.helpers.tiny_families import Q
    from tests.helpers.tiny_hybrid import quantize_hybrid_like_gguf

    ref = hybrid_model(hybrid_config(name))
    quantize_hybrid_like_gguf(ref, getattr(Q, qtype))
    path = write_hybrid_gguf(root / f"{name}-{qtype}.gguf", ref, CONFIGS[name][2],
                             qtype=getattr(Q, qtype))
    ids = prompt(40, VOCAB, 3)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()
    floats = load_checkpoint(path)
    model = build_model(floats, EngineConfig(context_length=CONTEXT))
    dequantised = stepped_logits(model, floats.args, ids, [25])
    torch.testing.assert_close(dequantised, want, atol=ATOL, rtol=0)
    codes = load_checkpoint(path, keep_int4=True)
    assert {"model.layers.0.linear_attn.in_proj_qkv.weight",
            "model.layers.0.linear_attn.in_proj_b.weight"} <= set(codes.int4)
    model = build_model(codes, EngineConfig(context_length=CONTEXT))
    assert type(model.model.layers[0].linear_attn.in_proj_qkvz).__name__ != "Linear"
    kinds = {type(layer.mlp).__name__ for layer in model.model.layers}
    assert kinds == ({"MoE"} if "moe" in name else {"Q4MLP"})
    if "moe" in name:  # the experts stay codes, each routed expert run on its slice
        assert type(model.model.layers[0].mlp.experts).__name__ == "SlicedExperts"
    kept = stepped_logits(model, codes.args, ids, [25])
    err = (kept - dequantised).abs().max().item()
    print(f"{name} {qtype}: codes vs dequantised max abs logit difference {err:.2e}")
    assert err < 1e-2 * dequantised.abs().max().item()


def test_offset_norm_in_bf16_equals_the_reference():
    """The (1 + w) norms compute as transformers' do in a bf16 model (w kept, 1 + w in float32):
    storing 1 + w in bf16 rounded it 10x coarser and moved MoE routing picks."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

    from pensieve.models.qwen3_next import OffsetRMSNorm

    g = torch.Generator().manual_seed(0)
    ref, ours_ = Qwen3NextRMSNorm(64, eps=1e-6), OffsetRMSNorm(64, 1e-6)
    with torch.no_grad():
        ref.weight.copy_(0.2 * torch.randn(64, generator=g))
        ours_.weight.copy_(ref.weight)
    ref, ours_ = ref.bfloat16(), ours_.bfloat16()
    x = torch.randn(16, 64, generator=g).bfloat16()
    assert torch.equal(ours_(x), ref(x))
