"""Mixture-of-experts families against transformers: tiny random Qwen3-MoE, Qwen2-MoE, Mixtral
and GLM-4.5 models saved as HF folders (per-expert matrices as ``save_pretrained`` writes them,
and 3-D expert tensors as transformers 5 holds them) and written as llama.cpp GGUFs, loaded
through ``load_checkpoint`` + ``build_model``; logits compared for a whole prefill and for
chunked prefill + decodes over a shuffled paged cache, the engine's greedy tokens against
``generate``, router ties (equal router rows, an all-zero router) against transformers' choice,
and the fast paths an MoE model declares."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType

transformers = pytest.importorskip("transformers")

from pensieve.backends.torch_backend import build_model  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.loaders.registry import load_checkpoint  # noqa: E402
from pensieve.models.moe import Router  # noqa: E402
from pensieve.models.registry import family_for_gguf, family_for_hf  # noqa: E402
from tests.helpers.paged_run import engine_tokens, paged_logits, prompt  # noqa: E402
from tests.helpers.tiny_families import VOCAB, save_hf  # noqa: E402
from tests.helpers.tiny_moe import (  # noqa: E402
    quantize_experts_like_gguf, moe_model, save_fused_hf, write_moe_gguf,
)

ATOL = 1e-4
CONTEXT, SEQ = 64, 36
DIMS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0})


@dataclass(frozen=True)
class Case:
    config: str
    kwargs: dict[str, Any]
    gguf: str  # llama.cpp architecture


CASES = {
    "qwen3_moe": Case("Qwen3MoeConfig", dict(
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=32,
        norm_topk_prob=True, tie_word_embeddings=False), "qwen3moe"),
    "qwen2_moe": Case("Qwen2MoeConfig", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=False), "qwen2moe"),
    "mixtral": Case("MixtralConfig", dict(
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=48), "llama"),
    "glm4_moe": Case("Glm4MoeConfig", dict(
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=32,
        n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
        routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                         "partial_rotary_factor": 0.5}), "glm4moe"),
}


def config(case: Case):
    return getattr(transformers, case.config)(**{**DIMS, **case.kwargs})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


@cache
def reference(name: str, tie: bool = False) -> torch.nn.Module:
    model = moe_model(config(CASES[name]))
    if tie:
        tie_routers(model)
    return model


@cache
def folder(root: Path, name: str, layout: str = "experts", tie: bool = False) -> Path:
    save = save_hf if layout == "experts" else save_fused_hf
    return save(root / f"{name}-{layout}-{tie}", reference(name, tie))


@cache
def gguf_file(root: Path, name: str) -> Path:
    return write_moe_gguf(root / f"{name}.gguf", reference(name), CASES[name].gguf)


def tie_routers(model: torch.nn.Module) -> None:
    """Every sparse layer's router ties: experts 1 and 2 share a row (and a correction bias) in
    the first such layer, every row is zero (all experts tie) in the others."""
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    with torch.no_grad():
        gates[0].weight[2] = gates[0].weight[1]
        if hasattr(gates[0], "e_score_correction_bias"):
            gates[0].e_score_correction_bias[2] = gates[0].e_score_correction_bias[1]
        for gate in gates[1:]:
            gate.weight.zero_()
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.zero_()


def ours(path: Path, **load: Any):
    ckpt = load_checkpoint(path, **load)
    return ckpt, build_model(ckpt, EngineConfig(context_length=CONTEXT))


def compare(ref: torch.nn.Module, path: Path, label: str, **load: Any) -> float:
    ckpt, model = ours(path, **load)
    ids = prompt(SEQ, VOCAB)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    whole, stepped = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5])
    err = max((whole - expected).abs().max().item(), (stepped - expected).abs().max().item())
    print(f"{label}: max abs logit error {err:.2e} (|logits| ≤ {expected.abs().max():.1f})")
    torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(stepped, expected, atol=ATOL, rtol=0)
    return err


@pytest.mark.parametrize("name", CASES)
def test_hf_folder_matches_transformers(root, name):
    compare(reference(name), folder(root, name), f"{name} (safetensors, per-expert)")


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_hf_folder_with_3d_experts_matches_transformers(root, name):
    compare(reference(name), folder(root, name, "fused"), f"{name} (safetensors, 3-D experts)")


@pytest.mark.parametrize("name", CASES)
def test_gguf_matches_transformers(root, name):
    compare(reference(name), gguf_file(root, name), f"{name} (GGUF F32)")


@pytest.mark.parametrize("name, qtype", [("qwen3_moe", "Q8_0"), ("glm4_moe", "Q4_0")])
def test_quantised_expert_gguf_matches_transformers_on_dequantised_weights(root, name, qtype):
    """3-D quantised expert tensors: with ``keep_int4`` they stay codes on the CPU kernels
    (``FastPaths.cpu_moe_codes``; int16-quantised activations: the dense codes models' relative
    1e-3, tests/unit/test_cpu_moe_codes.py), else they are dequantised on load (exact)."""
    ref = moe_model(config(CASES[name]))
    kind = getattr(GGMLQuantizationType, qtype)
    quantize_experts_like_gguf(ref, kind)
    path = write_moe_gguf(root / f"{name}-{qtype}.gguf", ref, CASES[name].gguf, expert_qtype=kind)
    compare(ref, path, f"{name} (GGUF {qtype} experts)")
    ckpt, model = ours(path, keep_int4=True)
    ids = prompt(SEQ, VOCAB)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    whole, stepped = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5])
    for got in (whole, stepped):
        assert ((got - expected).norm() / expected.norm()).item() < 1e-3


@pytest.mark.parametrize("name", CASES)
def test_router_ties_pick_what_transformers_picks(root, name):
    ref = reference(name, tie=True)
    compare(ref, folder(root, name, tie=True), f"{name} (tied routers)")


@pytest.mark.parametrize("gating, extra", [
    ("softmax", dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=8)),
    ("sigmoid", dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=8,
                     n_group=4, topk_group=2)),
])
def test_router_choices_equal_transformers_on_ties(gating, extra):
    """The experts chosen (as sets) and their weights, rows with many ties included."""
    name = "qwen3_moe" if gating == "softmax" else "glm4_moe"
    cfg = getattr(transformers, CASES[name].config)(
        **{**DIMS, **CASES[name].kwargs, **extra})
    hf_router = reference_router(cfg)
    args = family_for_hf(cfg.model_type).args_from_hf(cfg.to_dict())
    router = Router(args)
    router.load_state_dict(hf_router.state_dict())
    x = torch.randn(64, DIMS["hidden_size"], generator=torch.Generator().manual_seed(3))
    x[::2] = x[1::2]  # repeated rows
    x[:8] = 0.0  # every expert ties
    _, ref_w, ref_ids = hf_router(x)
    w, ids = router(x)
    order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), atol=0, rtol=0)


def reference_router(cfg) -> torch.nn.Module:
    model = moe_model(cfg)
    gate = next(m for n, m in model.named_modules() if n.endswith("mlp.gate"))
    with torch.no_grad():
        gate.weight[3] = gate.weight[5]
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias[3] = gate.e_score_correction_bias[5]
    return gate


@pytest.mark.parametrize("name, source", [
    ("qwen3_moe", "hf"), ("qwen2_moe", "gguf"), ("mixtral", "gguf"), ("glm4_moe", "hf"),
])
def test_engine_greedy_equals_generate(root, name, source):
    ref = reference(name)
    ckpt, model = ours(folder(root, name) if source == "hf" else gguf_file(root, name))
    ids = prompt(SEQ - 8, VOCAB, seed=2)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert engine_tokens(model, ckpt, CONTEXT, ids, 6) == expected


@pytest.mark.parametrize("name, paged", [
    ("qwen3_moe", True), ("mixtral", True), ("glm4_moe", False),
])
def test_moe_declares_only_the_kernels_its_blocks_take(root, name, paged):
    """The one-call CPU decoder, the CPU fused MLPs and CUDA graphs serve the Llama block only
    (the CUDA expert kernels turn graphs on for themselves); the fused CUDA layers switch exact
    classes only (the MoE block's add + norm, q/k-normed attentions, dense/shared MLPs), so
    SiLU experts declare them; the paged attention kernels serve whole-head RoPE (not GLM's
    half)."""
    ckpt, model = ours(gguf_file(root, name))
    fast = model.fast_paths
    assert (fast.cpu_decoder, fast.cpu_fused_mlp, fast.cuda_graphs, fast.cuda_fused_layers) == (
        False, False, False, ckpt.args.hidden_act == "silu")
    assert fast.paged_kernels is paged
    assert ckpt.args.architecture == name


def test_dense_llama_gguf_stays_llama(root):
    """``llama`` GGUFs without experts are the Llama family's, with them Mixtral's."""
    assert family_for_gguf("llama", {}).name == "llama"
    assert family_for_gguf("llama", {"llama.expert_count": 8}).name == "mixtral"
