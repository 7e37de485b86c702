"""Latent-attention families against transformers: tiny random GLM-4.7-Flash (``glm4_moe_lite``:
low-rank q, interleaved RoPE; and rotate-half RoPE) and DeepSeek-V3 (direct ``q_proj``, YaRN
with ``mscale_all_dim``) saved as HF folders and written as llama.cpp ``deepseek2`` GGUFs (split
``attn_k_b``/``attn_v_b``, or a legacy ``attn_kv_b``), with and without a multi-token-prediction
layer; logits for a whole prefill and for chunked prefill + decodes over a shuffled paged latent
cache (decode through the absorbed projections), absorbed = expanded attention, the engine's
greedy tokens against ``generate``, and the latent cache a family declares."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pensieve.backends.torch_backend import build_model  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.loaders.registry import load_checkpoint  # noqa: E402
from pensieve.models.cache_spec import PagedKV  # noqa: E402
from pensieve.models.deepseek_mla import MLAttention  # noqa: E402
from pensieve.models.registry import family  # noqa: E402
from tests.helpers.paged_run import engine_tokens, paged_logits, prompt  # noqa: E402
from tests.helpers.tiny_families import Q, VOCAB, quantize_like_gguf, save_hf  # noqa: E402
from tests.helpers.tiny_mla import (  # noqa: E402
    add_hf_mtp, round_kv_b_like_gguf, with_gguf_mtp, write_mla_gguf,
)
from tests.helpers.tiny_moe import moe_model, write_moe_gguf  # noqa: E402

ATOL = 1e-4
CONTEXT, SEQ = 64, 36
DIMS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
            n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
            n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=1.8,
            norm_topk_prob=True, tie_word_embeddings=False)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(
        q_lora_rank=24, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    # rotate-half RoPE: HF only (llama.cpp's deepseek2 always rotates adjacent pairs)
    "glm4_moe_lite_half": ("Glm4MoeLiteConfig", dict(
        q_lora_rank=24, rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    "deepseek_v3": ("DeepseekV3Config", dict(
        q_lora_rank=None, rope_interleave=True, first_k_dense_replace=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})),
}


GLM4_MOE = dict(  # GLM-4.5's shape (issue 11), its MTP layer as GLM's checkpoints carry it
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, n_routed_experts=8,
    num_experts_per_tok=3, moe_intermediate_size=32, n_group=2, topk_group=1,
    first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, attention_bias=True,
    use_qk_norm=True, num_nextn_predict_layers=1,
    rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5})


def config(name: str):
    if name == "glm4_moe":
        return transformers.Glm4MoeConfig(**GLM4_MOE)
    cls, extra = CASES[name]
    return getattr(transformers, cls)(**{**DIMS, **extra})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mla")


@cache
def reference(name: str) -> torch.nn.Module:
    return moe_model(config(name))


@cache
def folder(root: Path, name: str, mtp: bool = False) -> Path:
    path = save_hf(root / f"{name}-{mtp}", reference(name))
    return add_hf_mtp(path, reference(name)) if mtp else path


@cache
def gguf_file(root: Path, name: str, mtp: bool = False, split: bool = True) -> Path:
    return write_mla_gguf(root / f"{name}-{mtp}-{split}.gguf", reference(name), mtp=mtp,
                          split=split)


def ours(path: Path):
    ckpt = load_checkpoint(path)
    return ckpt, build_model(ckpt, EngineConfig(context_length=CONTEXT))


def compare(name: str, path: Path, label: str) -> None:
    ckpt, model = ours(path)
    ids = prompt(SEQ, VOCAB)
    with torch.no_grad():
        expected = reference(name)(torch.tensor([ids])).logits[0].float()
    whole, stepped = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5])
    err = max((whole - expected).abs().max().item(), (stepped - expected).abs().max().item())
    print(f"{label}: max abs logit error {err:.2e} (|logits| ≤ {expected.abs().max():.1f})")
    torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(stepped, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_hf_folder_matches_transformers(root, name):
    compare(name, folder(root, name), f"{name} (safetensors)")


GGUF_CASES = ["glm4_moe_lite", "deepseek_v3"]


@pytest.mark.parametrize("name", GGUF_CASES)
def test_gguf_matches_transformers(root, name):
    compare(name, gguf_file(root, name), f"{name} (GGUF deepseek2, split k_b/v_b)")


def test_quantised_gguf_matches_transformers_on_dequantised_weights(root):
    """Q8_0 projections, dequantised (exact) and kept as their codes (``keep_int4``: the CPU
    code kernels round activations to 8 bits, so within 5e-3); ``kv_b_proj``'s halves dense.
    Widths that are whole Q8_0 blocks: q/kv_lora_rank 32, heads × v_head_dim 64."""
    cls, extra = CASES["glm4_moe_lite"]
    ref = moe_model(getattr(transformers, cls)(
        **{**DIMS, **extra, "q_lora_rank": 32, "kv_lora_rank": 32, "v_head_dim": 16}))
    kv_b = {n: p.detach().clone() for n, p in ref.named_parameters() if "kv_b_proj" in n}
    quantize_like_gguf(ref, Q.Q8_0)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in kv_b:
                p.copy_(kv_b[n])
    path = write_mla_gguf(root / "glm4_moe_lite-q8.gguf", ref, qtype=Q.Q8_0)
    ids = prompt(SEQ, VOCAB)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    for keep, atol in ((False, ATOL), (True, 5e-3)):
        ckpt = load_checkpoint(path, keep_int4=keep)
        assert keep == any("q_b_proj" in n for n in [*ckpt.int4, *ckpt.int8])
        model = build_model(ckpt, EngineConfig(context_length=CONTEXT))
        whole, stepped = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5])
        torch.testing.assert_close(whole, expected, atol=atol, rtol=0)
        torch.testing.assert_close(stepped, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_quantised_experts_stay_codes_on_the_cpu(root, qtype):
    """A GGUF's 3-D experts kept as their codes (``keep_int4``: ``FastPaths.cpu_moe_codes``,
    each routed expert on its slice) — what lets a real GLM-4.7-Flash file fit in memory;
    within 2e-3 of transformers on the dequantised experts. Widths the kernels' blocks take:
    hidden and expert width 256."""
    from pensieve.backends.cpu_quant.expert_linear import SlicedExperts
    from tests.helpers.tiny_moe import quantize_experts_like_gguf

    kind = getattr(Q, qtype)
    cls, extra = CASES["glm4_moe_lite"]
    ref = moe_model(getattr(transformers, cls)(**{
        **DIMS, **extra, "hidden_size": 256, "intermediate_size": 256,
        "moe_intermediate_size": 256}))
    quantize_experts_like_gguf(ref, kind)
    path = write_mla_gguf(root / f"glm4_moe_lite-exps-{qtype}.gguf", ref, expert_qtype=kind)
    ckpt = load_checkpoint(path, keep_int4=True)
    model = build_model(ckpt, EngineConfig(context_length=CONTEXT))
    assert sum(isinstance(m, SlicedExperts) for m in model.modules()) == 2  # the sparse layers
    ids = prompt(SEQ, VOCAB)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    whole, stepped = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5])
    err = max((g - expected).abs().max().item() for g in (whole, stepped))
    print(f"glm4_moe_lite {qtype} experts as codes: max abs logit error {err:.2e}")
    assert err < 2e-3  # the kernels round activations to 8 bits (4e-4 here, |logits| ≤ 4.3)


def test_quantised_k_b_v_b_gguf_matches_transformers(root):
    """``attn_k_b``/``attn_v_b`` in Q8_0 (as real files carry them), dequantised on load with
    and without ``keep_int4``: exact against transformers on the same rounded ``kv_b_proj``.
    nope = v = rank = 32: whole Q8_0 blocks along both halves' rows."""
    cls, extra = CASES["glm4_moe_lite"]
    ref = moe_model(getattr(transformers, cls)(**{
        **DIMS, **extra, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "v_head_dim": 32}))
    round_kv_b_like_gguf(ref, Q.Q8_0)
    path = write_mla_gguf(root / "glm4_moe_lite-kvb-q8.gguf", ref, kv_b_qtype=Q.Q8_0)
    ids = prompt(SEQ, VOCAB)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    for keep in (False, True):
        ckpt = load_checkpoint(path, keep_int4=keep)
        model = build_model(ckpt, EngineConfig(context_length=CONTEXT))
        whole, stepped = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5])
        torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(stepped, expected, atol=ATOL, rtol=0)


def test_legacy_unsplit_kv_b_gguf_matches_transformers(root):
    compare("glm4_moe_lite", gguf_file(root, "glm4_moe_lite", split=False),
            "glm4_moe_lite (GGUF deepseek2, attn_kv_b)")


@pytest.mark.parametrize("name", ["glm4_moe_lite", "glm4_moe"])
@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_checkpoint_with_mtp_layer_loads_without_it(root, name, source):
    """GLM's multi-token-prediction layer (HF ``model.layers.3.*``; llama.cpp ``blk.3.*`` +
    ``blk.3.nextn.*``, ``block_count`` 4) is dropped on load: three layers, same logits."""
    if source == "hf":
        path = folder(root, name, mtp=True)
    elif name == "glm4_moe":
        plain = write_moe_gguf(root / "glm4_moe.gguf", reference(name), "glm4moe")
        path = with_gguf_mtp(plain, root / "glm4_moe-mtp.gguf", config(name))
    else:
        path = gguf_file(root, name, mtp=True)
    ckpt = load_checkpoint(path)
    assert ckpt.args.num_layers == 3
    assert not any(k.startswith("model.layers.3.") for k in ckpt.weights)
    compare(name, path, f"{name} ({source} with an MTP layer)")


@pytest.mark.parametrize("name", GGUF_CASES)
def test_absorbed_attention_equals_expanded(root, name):
    """Latent-space attention (W_UK folded into q, W_UV after) = the reference's expanded K/V,
    for a prefill and for chunks over a cached context."""
    ckpt, model = ours(folder(root, name))
    ids = prompt(SEQ, VOCAB, seed=4)
    runs = {}
    for mode in ("never", "always"):
        for m in model.modules():
            if isinstance(m, MLAttention):
                m.absorb = mode
        runs[mode] = paged_logits(model, ckpt.args, ids, [7, 20])
    for a, b in zip(runs["never"], runs["always"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", GGUF_CASES)
def test_engine_greedy_equals_generate(root, name):
    ckpt, model = ours(gguf_file(root, name) if name == "glm4_moe_lite" else folder(root, name))
    ids = prompt(SEQ - 8, VOCAB, seed=2)
    with torch.no_grad():
        expected = reference(name).generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    assert engine_tokens(model, ckpt, CONTEXT, ids, 6) == expected


def test_bf16_engine_runs(root):
    """bfloat16 weights and cache through the engine (the sigmoid router weighs in float32: the
    experts' sum used to meet a bfloat16 accumulator and fail); finite logits, 6 tokens."""
    ckpt = load_checkpoint(gguf_file(root, "glm4_moe_lite"))
    model = build_model(ckpt, EngineConfig(context_length=CONTEXT, dtype=torch.bfloat16))
    ids = prompt(SEQ, VOCAB)
    whole, stepped = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5])
    assert torch.isfinite(whole).all() and torch.isfinite(stepped).all()
    assert len(engine_tokens(model, ckpt, CONTEXT, ids[:20], 6)) == 6


def test_family_declares_a_latent_cache_and_no_uniform_paths():
    args = family("glm4_moe_lite").args_from_hf(config("glm4_moe_lite").to_dict())
    layout = family("glm4_moe_lite").cache_layout(args)
    assert layout == (PagedKV(1, 16 + 8, 0),) * 3 and layout[0].latent
    assert layout[0].token_elements() == 24  # vs 4 heads × (24 + 12) expanded
    fast = family("glm4_moe_lite").fast_paths(args, CONTEXT)
    assert not (fast.paged_kernels or fast.cuda_graphs or fast.cpu_decoder or fast.cpu_fused_mlp)
