"""gpt-oss against transformers: a tiny random model (3 layers: windowed 8 / full / windowed,
sinks, YaRN untruncated, 4 biased clamped-SwiGLU experts, top-2) saved as an HF folder (float,
and with MXFP4 experts as the released checkpoints hold them, read back by transformers itself)
and written as llama.cpp GGUFs (F32 and MXFP4 experts), loaded through ``load_checkpoint`` +
``build_model``. Logits of a 36-token prompt (past the window) for a whole prefill and for
chunked prefill + decodes over a shuffled paged cache; the engine's greedy tokens against
``generate``; the cache layout and fast paths the family declares."""

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
from pensieve.models.registry import family  # noqa: E402
from tests.helpers.paged_run import engine_tokens, paged_logits, prompt  # noqa: E402
from tests.helpers.tiny_families import VOCAB, save_hf  # noqa: E402
from tests.helpers.tiny_gpt_oss import (  # noqa: E402
    config, gpt_oss_model, round_experts_mxfp4, save_mxfp4_hf, write_gpt_oss_gguf,
)

ATOL = 1e-4
CONTEXT, SEQ = 64, 36


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpt_oss")


@cache
def reference(mxfp4: bool = False) -> torch.nn.Module:
    model = gpt_oss_model(config())
    if mxfp4:
        round_experts_mxfp4(model)
    return model


@cache
def checkpoint(root: Path, kind: str) -> Path:
    if kind == "hf":
        return save_hf(root / "hf", reference())
    if kind == "hf-mxfp4":
        return save_mxfp4_hf(root / "hf-mxfp4", reference(mxfp4=True))
    if kind == "gguf":
        return write_gpt_oss_gguf(root / "f32.gguf", reference())
    return write_gpt_oss_gguf(root / "mxfp4.gguf", reference(mxfp4=True), mxfp4=True)


def ours(path: Path, **load: Any):
    ckpt = load_checkpoint(path, **load)
    return ckpt, build_model(ckpt, EngineConfig(context_length=CONTEXT))


def reference_logits(ref: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("kind", ["hf", "hf-mxfp4", "gguf", "gguf-mxfp4"])
def test_logits_match_transformers(root, kind):
    """Whole prefill, and chunks of 12 and 19 then 5 decodes, each within ATOL of transformers."""
    path = checkpoint(root, kind)
    if kind == "hf-mxfp4":  # transformers reads the MXFP4 folder itself (dequantising)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32,
            quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    else:
        ref = reference(mxfp4=kind.endswith("mxfp4"))
    ckpt, model = ours(path, keep_int4=kind.startswith("gguf"))
    ids = prompt(SEQ, VOCAB)
    expected = reference_logits(ref, ids)
    whole, stepped = paged_logits(model, ckpt.args, ids, [12, 31])
    err = max((whole - expected).abs().max().item(), (stepped - expected).abs().max().item())
    print(f"gpt-oss {kind}: max abs logit error {err:.2e} "
          f"(|logits| ≤ {expected.abs().max():.1f})")
    torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(stepped, expected, atol=ATOL, rtol=0)


def test_the_test_exercises_windows_sinks_and_the_clamp(root):
    """What the logits test would miss if it were not so: the window masks (a model without it
    differs), the sinks matter, and gate/up values reach past the ±7 clamp."""
    ref = reference()
    ids = prompt(SEQ, VOCAB)
    expected = reference_logits(ref, ids)
    seen: list[torch.Tensor] = []
    hook = ref.model.layers[0].mlp.experts.register_forward_hook(
        lambda m, a, out: seen.append(a[0] @ m.gate_up_proj[0] + m.gate_up_proj_bias[0]))
    reference_logits(ref, ids)
    hook.remove()
    assert seen[0].abs().max() > 7.0
    unwindowed = gpt_oss_model(config(sliding_window=256))
    assert (reference_logits(unwindowed, ids) - expected).abs().max() > 1e-2
    sinkless = gpt_oss_model(config())
    with torch.no_grad():
        for layer in sinkless.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert (reference_logits(sinkless, ids) - expected).abs().max() > 1e-2


def test_yarn_is_untruncated_in_both_formats(root):
    for kind in ("hf", "gguf"):
        scaling = load_checkpoint(checkpoint(root, kind)).args.rope_scaling
        assert scaling["rope_type"] == "yarn" and scaling["truncate"] is False
        assert scaling["factor"] == 4.0 and scaling["original_max_position_embeddings"] == 64


@pytest.mark.parametrize("kind", ["hf", "gguf-mxfp4"])
def test_engine_greedy_equals_generate(root, kind):
    ref = reference(mxfp4=kind.endswith("mxfp4"))
    ckpt, model = ours(checkpoint(root, kind))
    ids = prompt(SEQ - 8, VOCAB, seed=2)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert engine_tokens(model, ckpt, CONTEXT, ids, 8) == expected


def test_cache_layout_windows_and_no_fast_paths(root):
    """Windowed layers declare their window (the KV manager frees blocks past it); no compiled
    path is declared (none computes sinks)."""
    ckpt, model = ours(checkpoint(root, "gguf"))
    layout = family("gpt_oss").cache_layout(ckpt.args)
    assert layout == (PagedKV(2, 16, 16, 8), PagedKV(2, 16, 16, None), PagedKV(2, 16, 16, 8))
    fast = model.fast_paths
    assert not any((fast.cpu_decoder, fast.cpu_fused_mlp, fast.paged_kernels, fast.cuda_graphs,
                    fast.cuda_fused_layers))


def test_layer_types_from_config():
    fam = family("gpt_oss")
    types = ["full_attention", "sliding_attention", "full_attention"]
    args = fam.args_from_hf(config(layer_types=types).to_dict())
    assert [args.window(i) for i in range(3)] == [None, 8, None]
    default = fam.args_from_hf(config(num_hidden_layers=4).to_dict())
    assert [default.window(i) for i in range(4)] == [8, None, 8, None]


def test_router_ties_pick_what_transformers_picks(root):
    """Experts 1 and 2 share a router row and bias in layer 0; every logit ties in layer 1."""
    ref = gpt_oss_model(config())
    routers = [layer.mlp.router for layer in ref.model.layers]
    with torch.no_grad():
        routers[0].weight[2], routers[0].bias[2] = routers[0].weight[1], routers[0].bias[1]
        routers[1].weight.zero_()
        routers[1].bias.zero_()
    ckpt, model = ours(save_hf(root / "ties", ref))
    ids = prompt(SEQ, VOCAB, seed=3)
    whole, stepped = paged_logits(model, ckpt.args, ids, [12, 31])
    expected = reference_logits(ref, ids)
    torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(stepped, expected, atol=ATOL, rtol=0)


# gpt-oss-20b's config.json as released (openai/gpt-oss-20b), without its quantization_config
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
    "attention_dropout": 0.0, "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "output_router_logits": False, "pad_token_id": 199999, "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
    "swiglu_limit": 7.0, "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
}


def test_the_released_20b_config_and_mxfp4_headers_validate():
    """The real config parses as the reference reads it, and the released checkpoint's tensor
    headers (MXFP4 ``*_blocks``/``*_scales`` experts) plan into exactly the expected weights."""
    from pensieve.loaders import hf_experts
    from pensieve.loaders.architectures import validate_shapes

    fam = family("gpt_oss")
    args = fam.args_from_hf(GPT_OSS_20B)
    assert (args.num_layers, args.num_heads, args.num_kv_heads, args.head_dim) == (24, 64, 8, 64)
    assert (args.moe.num_experts, args.moe.top_k, args.moe.expert_size) == (32, 4, 2880)
    assert args.rope_theta == 150000.0 and args.rope_scaling == {
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4096, "truncate": False}
    assert [args.window(i) for i in range(4)] == [128, None, 128, None]
    headers = {"model.embed_tokens.weight": (201088, 2880), "model.norm.weight": (2880,),
               "lm_head.weight": (201088, 2880)}
    for i in range(24):
        p = f"model.layers.{i}."
        headers.update({
            p + "input_layernorm.weight": (2880,), p + "post_attention_layernorm.weight": (2880,),
            p + "self_attn.q_proj.weight": (4096, 2880), p + "self_attn.q_proj.bias": (4096,),
            p + "self_attn.k_proj.weight": (512, 2880), p + "self_attn.k_proj.bias": (512,),
            p + "self_attn.v_proj.weight": (512, 2880), p + "self_attn.v_proj.bias": (512,),
            p + "self_attn.o_proj.weight": (2880, 4096), p + "self_attn.o_proj.bias": (2880,),
            p + "self_attn.sinks": (64,),
            p + "mlp.router.weight": (32, 2880), p + "mlp.router.bias": (32,),
            p + "mlp.experts.gate_up_proj_blocks": (32, 5760, 90, 16),
            p + "mlp.experts.gate_up_proj_scales": (32, 5760, 90),
            p + "mlp.experts.gate_up_proj_bias": (32, 5760),
            p + "mlp.experts.down_proj_blocks": (32, 2880, 90, 16),
            p + "mlp.experts.down_proj_scales": (32, 2880, 90),
            p + "mlp.experts.down_proj_bias": (32, 2880),
        })
    _, shapes = hf_experts.plan(headers, fam.hf_renames, fam.hf_expert_layout)
    validate_shapes(fam.expected_shapes(args), shapes, "gpt-oss-20b")


def run_engine(engine, rid: str, ids: list[int], steps: int):  # noqa: ANN001, ANN201
    """Greedy tokens, the last delta, and the most blocks each KV pool held meanwhile."""
    from pensieve.engine.types import SamplingParams

    engine.add_request(rid, ids, SamplingParams(max_tokens=steps, temperature=0.0,
                                                ignore_eos=True))
    tokens, last, most = [], None, [0] * len(engine.kv.pools)
    while engine.has_work():
        for d in engine.step():
            tokens.extend(d.token_ids)
            last = d
        most = [max(m, p.num_blocks - p.num_free) for m, p in zip(most, engine.kv.pools)]
    return tokens, last, most


def test_engine_frees_window_blocks_and_a_follow_up_hits_the_prefix_cache(root):
    """Through the KV manager over layer groups: the windowed layers hold about a window of
    blocks, and a follow-up turn that extends the first prompt reads its prefix from the cache;
    both turns' tokens equal ``generate``."""
    from pensieve.backends.torch_backend import torch_engine

    ref = reference()
    ckpt = load_checkpoint(checkpoint(root, "gguf"))
    config_ = EngineConfig(context_length=128, block_size=4, max_num_seqs=2,
                           max_num_batched_tokens=16)
    engine = torch_engine(build_model(ckpt, config_), ckpt.args, ckpt.tokenizer, config_)
    first = prompt(70, VOCAB, seed=4)
    follow = first + prompt(9, VOCAB, seed=5)
    for rid, ids in (("turn1", first), ("turn2", follow)):
        tokens, last, most = run_engine(engine, rid, ids, 6)
        with torch.no_grad():
            expected = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert tokens == expected, rid
        assert most[0] == -(-(len(ids) + 6 - 1) // 4)  # full attention keeps every block
        assert most[1] <= 8 // 4 + 16 // 4 + 1  # the window + one chunk (seen: 3)
    assert [g.kind for g in engine.kv.groups] == ["full", "window"]
    assert last.num_cached_tokens >= 64  # of the follow-up's 79 (seen: 68)


def test_bfloat16_runs_close_to_float32(root):
    """The sink paths, router and experts in bf16 (what a GPU serves): within bf16's noise of
    the float32 logits (seen ≤ 0.16 of |logits| ≤ 4)."""
    ckpt = load_checkpoint(checkpoint(root, "gguf-mxfp4"))
    ids = prompt(SEQ, VOCAB)
    exact = paged_logits(build_model(ckpt, EngineConfig(context_length=CONTEXT)), ckpt.args,
                         ids, [12, 31])[0]
    model = build_model(ckpt, EngineConfig(context_length=CONTEXT, dtype=torch.bfloat16))
    for got in paged_logits(model, ckpt.args, ids, [12, 31]):
        assert got.dtype == torch.float32 and (got - exact).abs().max() < 0.4
