"""Every family against transformers: tiny random models saved as HF folders and written as
llama.cpp GGUFs, loaded through ``load_checkpoint`` + ``build_model``, logits compared for a
whole prefill and for chunked prefill + decodes over a shuffled paged cache (past the sliding
window where there is one), the real engine's greedy tokens against ``generate``, and each
family's declared fast paths against what the runner and the q4 MLP fusion take."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pensieve.backends.cpu_quant import load_kernels  # noqa: E402
from pensieve.backends.cpu_quant.mlp import Q4MLP  # noqa: E402
from pensieve.backends.torch_backend import build_model, torch_engine  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.loaders.registry import load_checkpoint  # noqa: E402
from tests.helpers.paged_run import BLOCK, engine_tokens, paged_logits, prompt  # noqa: E402
from tests.helpers.tiny_families import (  # noqa: E402
    VOCAB, Q, hf_model, quantize_like_gguf, save_hf, write_gguf,
)

ATOL = 1e-4
DIMS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 12.0],
            "original_max_position_embeddings": 64, "partial_rotary_factor": 0.75}
GEMMA_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}


@dataclass(frozen=True)
class Case:
    config: str  # transformers config class
    kwargs: dict[str, Any]
    context: int = 64  # the served context (EngineConfig.context_length)
    seq: int = 40  # tokens of the compared sequence
    gguf: str | None = None  # llama.cpp architecture, where the case has a GGUF twin
    gguf_kwargs: dict[str, Any] = field(default_factory=dict)  # config changes a GGUF cannot hold
    swa_pattern: int | list[bool] | None = None


def rope(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


PHI3_LONGROPE = dict(rope_parameters=LONGROPE, original_max_position_embeddings=64)
GEMMA_LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
CASES = {
    "llama": Case("LlamaConfig", dict(rope_parameters=rope(500.0)), gguf="llama"),
    # Llama 3.1's RoPE: rope_scaling in config.json, a rope_freqs tensor in the GGUF
    "llama3": Case("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), gguf="llama"),
    "qwen2": Case("Qwen2Config", dict(rope_parameters=rope(1000.0), tie_word_embeddings=False),
                  gguf="qwen2"),
    "qwen3": Case("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False,
                                      rope_parameters=rope(1000.0)), gguf="qwen3"),
    # llama.cpp writes Mistral as ``llama`` (Q/K permuted) and keeps no window
    "mistral": Case("MistralConfig", dict(head_dim=24, sliding_window=12,
                                          rope_parameters=rope(1000.0)),
                    gguf="llama", gguf_kwargs=dict(sliding_window=None)),
    # LongRoPE: short factors while the served context is within the trained one, else long
    "phi3_short": Case("Phi3Config", PHI3_LONGROPE, context=64, seq=40, gguf="phi3"),
    "phi3_long": Case("Phi3Config", PHI3_LONGROPE, context=256, seq=80, gguf="phi3"),
    "phi3_window": Case("Phi3Config", dict(sliding_window=16, original_max_position_embeddings=256,
                                           rope_parameters=rope(1000.0)), gguf="phi3"),
    # a GGUF holds no query_pre_attn_scalar: llama.cpp scales by head_dim
    "gemma3": Case("Gemma3TextConfig", dict(
        num_hidden_layers=4, layer_types=GEMMA_LAYERS, sliding_window=8, head_dim=32,
        query_pre_attn_scalar=24, rope_parameters=GEMMA_ROPE),
        gguf="gemma3", gguf_kwargs=dict(query_pre_attn_scalar=32), swa_pattern=3),
    # a window as long as the context masks nothing: the compiled paged kernels serve it
    "gemma3_wide": Case("Gemma3TextConfig", dict(
        num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
        sliding_window=64, head_dim=32, query_pre_attn_scalar=24, rope_parameters=GEMMA_ROPE)),
}
GGUF_CASES = [name for name, c in CASES.items() if c.gguf]


def config(case: Case, **changes: Any):
    return getattr(transformers, case.config)(**{**DIMS, **case.kwargs, **changes})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@cache
def hf_case(root: Path, name: str) -> tuple[torch.nn.Module, Path]:
    ref = hf_model(config(CASES[name]))
    return ref, save_hf(root / f"hf-{name}", ref)


@cache
def gguf_case(root: Path, name: str, qtype: Q = Q.F32) -> tuple[torch.nn.Module, Path]:
    """The reference and its GGUF (projections in ``qtype``, the reference's weights rounded
    through it)."""
    case = CASES[name]
    ref = hf_model(config(case, **case.gguf_kwargs))
    if qtype != Q.F32:
        quantize_like_gguf(ref, qtype)
    path = root / f"{name}-{qtype.name}.gguf"
    return ref, write_gguf(path, ref, case.gguf, qtype=qtype, swa_pattern=case.swa_pattern)


def ours(path: Path, context: int, **load: Any):
    ckpt = load_checkpoint(path, **load)
    return ckpt, build_model(ckpt, EngineConfig(context_length=context))


def reference_logits(ref: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def compare(ref: torch.nn.Module, path: Path, case: Case, label: str) -> float:
    ckpt, model = ours(path, case.context)
    ids = prompt(case.seq, VOCAB)
    expected = reference_logits(ref, ids)
    whole, stepped = paged_logits(model, ckpt.args, ids, [case.seq // 3, case.seq - 5])
    err = max((whole - expected).abs().max().item(), (stepped - expected).abs().max().item())
    print(f"{label}: max abs logit error {err:.2e} (|logits| ≤ {expected.abs().max():.1f})")
    torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(stepped, expected, atol=ATOL, rtol=0)
    return err


@pytest.mark.parametrize("name", CASES)
def test_hf_folder_matches_transformers(root, name):
    ref, folder = hf_case(root, name)
    compare(ref, folder, CASES[name], f"{name} (safetensors)")


@pytest.mark.parametrize("name", GGUF_CASES)
def test_gguf_matches_transformers(root, name):
    ref, path = gguf_case(root, name)
    compare(ref, path, CASES[name], f"{name} (GGUF F32)")


QUANTISED = {"llama": Q.Q4_0, "qwen2": Q.Q8_0, "qwen3": Q.Q4_0, "phi3_short": Q.Q8_0,
             "gemma3": Q.Q4_0}


@pytest.mark.parametrize("name", QUANTISED)
def test_quantised_gguf_matches_transformers_on_dequantised_weights(root, name):
    ref, path = gguf_case(root, name, QUANTISED[name])
    compare(ref, path, CASES[name], f"{name} (GGUF {QUANTISED[name].name})")


@pytest.mark.parametrize("name, source", [
    *((name, "hf") for name in CASES), ("gemma3", "gguf"), ("phi3_long", "gguf"),
])
def test_engine_greedy_equals_generate(root, name, source):
    case = CASES[name]
    ref, path = (hf_case if source == "hf" else gguf_case)(root, name)
    ckpt, model = ours(path, case.context)
    ids = prompt(case.seq - 8, VOCAB, seed=2)  # a prompt past the window; generation goes further
    steps = 6
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert engine_tokens(model, ckpt, case.context, ids, steps) == expected


KERNELS = load_kernels()


@pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")
@pytest.mark.parametrize("name, decoder, fused_mlp", [
    ("qwen2", True, True), ("llama", True, True), ("qwen3", False, True),
    ("phi3_window", False, True), ("gemma3", False, False),
])
def test_declared_fast_paths_are_the_ones_taken(root, name, decoder, fused_mlp):
    """q4 weights on the CPU: the one-call decoder only where the family declared it (never
    Gemma 3's sandwich norms and GELU, Qwen3's q/k norms, a window that masks), the SiLU
    ``Q4MLP`` only for SiLU MLPs."""
    case = CASES[name]
    _, path = gguf_case(root, name, Q.Q4_0)
    ckpt, model = ours(path, case.context, keep_int4=True)
    assert ckpt.int4, "the q4 projections stay codes"
    assert model.fast_paths.cpu_decoder is decoder
    mlps = [type(layer.mlp) is Q4MLP for layer in model.model.layers]
    assert all(mlps) if fused_mlp else not any(mlps)
    engine = torch_engine(model, ckpt.args, ckpt.tokenizer, EngineConfig(
        context_length=case.context, block_size=BLOCK, max_num_seqs=2))
    assert (engine.runner.cpu_decoder is not None) is decoder
