"""Context length and RoPE scaling from `pensieve serve` flags (settings.plan_context)."""

from __future__ import annotations

import math

import pytest
import torch

from pensieve.cli.main import build_parser
from pensieve.cli.serve_torch import kv_bytes_per_token
from pensieve.cli.settings import ContextPlan, plan_context, settings_from_args
from pensieve.models.args import ModelArgs
from pensieve.models.rope import RotaryEmbedding, rope_inv_freq

SMOL = ModelArgs(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                 num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                 max_position_embeddings=8192, tie_word_embeddings=True)


def test_within_the_trained_length_nothing_is_scaled():
    assert plan_context(SMOL, None, None) == ContextPlan(8192)
    assert plan_context(SMOL, 4096, None) == ContextPlan(4096)
    assert plan_context(SMOL, 8192, None) == ContextPlan(8192)
    assert plan_context(SMOL, None, 1.0) == ContextPlan(8192)
    assert plan_context(SMOL, None, None).apply(SMOL) is SMOL


def test_context_above_trained_applies_yarn_with_the_needed_factor():
    plan = plan_context(SMOL, 32768, None)
    assert plan.context_length == 32768
    assert plan.rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 8192}
    assert "exceeds the trained 8192" in plan.note and "yarn" in plan.note
    args = plan.apply(SMOL)
    assert args.rope_scaling == plan.rope_scaling and args.max_position_embeddings == 32768
    assert args.num_layers == SMOL.num_layers and SMOL.rope_scaling is None  # a copy


def test_fractional_factor_when_the_context_is_not_a_multiple():
    plan = plan_context(SMOL, 20000, None)
    assert plan.context_length == 20000
    assert math.isclose(plan.rope_scaling["factor"], 20000 / 8192)


def test_rope_scale_sets_the_context_unless_given():
    plan = plan_context(SMOL, None, 4.0)
    assert plan.context_length == 32768 and plan.rope_scaling["factor"] == 4.0
    plan = plan_context(SMOL, 16384, 4.0, "linear")
    assert plan.context_length == 16384
    assert plan.rope_scaling == {"rope_type": "linear", "factor": 4.0,
                                 "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("requested, scale, rope_type, message", [
    (40000, 4.0, "yarn", "exceeds 8192 × --rope-scale 4"),
    (None, 0.5, "yarn", "--rope-scale must be at least 1"),
    (None, 2.0, "ntk", "--rope-type must be one of yarn, linear"),
])
def test_inconsistent_flags_are_refused(requested, scale, rope_type, message):
    with pytest.raises(ValueError, match=message.replace("×", ".")):
        plan_context(SMOL, requested, scale, rope_type)


def test_a_model_that_already_scales_its_rope_is_not_scaled_again():
    llama31 = ModelArgs(**{**SMOL.__dict__, "max_position_embeddings": 131072, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}})
    assert plan_context(llama31, 65536, None) == ContextPlan(65536)
    with pytest.raises(ValueError, match="already uses llama3 RoPE scaling to reach 131072"):
        plan_context(llama31, 262144, None)


def test_an_architecture_without_rope_scaling_support_is_refused():
    other = ModelArgs(**{**SMOL.__dict__, "architecture": "mamba"})
    assert plan_context(other, 8192, None) == ContextPlan(8192)
    with pytest.raises(ValueError, match="not supported for architecture 'mamba'"):
        plan_context(other, 16384, None)


def test_serve_flags_reach_the_settings():
    ns = build_parser().parse_args(["serve", "--model", "/m.gguf", "--context-length", "32768",
                                    "--rope-scale", "4", "--rope-type", "linear"])
    settings = settings_from_args(ns, {})
    assert (settings.context_length, settings.rope_scale, settings.rope_type) == (32768, 4.0, "linear")
    assert settings.context_plan(SMOL).rope_scaling["rope_type"] == "linear"
    ns = build_parser().parse_args(["serve", "--model", "/m.gguf", "--rope-scale", "0.5"])
    with pytest.raises(ValueError, match="at least 1"):
        settings_from_args(ns, {})


def test_yarn_plan_keeps_short_range_positions_and_stretches_long_ones():
    """The plan's scaling, through rope.py: high frequencies (local order) untouched, the
    lowest stretched by the factor, and the tables cover the whole new context."""
    scaling = plan_context(SMOL, 32768, None).rope_scaling
    base, _ = rope_inv_freq(64, SMOL.rope_theta, None)
    scaled, attention_factor = rope_inv_freq(64, SMOL.rope_theta, scaling)
    assert torch.equal(scaled[:4], base[:4])
    assert torch.allclose(scaled[-1], base[-1] / 4)
    assert attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    rotary = RotaryEmbedding(64, 32768, SMOL.rope_theta, scaling)
    assert rotary.cos.shape == (32768, 64)


def test_kv_bytes_per_token_of_smollm2():
    # 2 (K and V) × 30 layers × 3 KV heads × 64 dims × 4 bytes = 45 KiB per token in fp32
    assert kv_bytes_per_token(SMOL, torch.float32) == 46080
    assert kv_bytes_per_token(SMOL, torch.bfloat16) == 23040


@pytest.mark.parametrize("context, rope_type", [(32768, "yarn"), (20000, "yarn"), (16384, "linear")])
def test_planned_scaling_matches_transformers(context, rope_type):
    """transformers as the oracle: the HF-shaped block the plan writes means the same
    frequencies and attention factor there as in pensieve/models/rope.py."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    plan = plan_context(SMOL, context, None if rope_type == "yarn" else context / 8192, rope_type)
    config = transformers.LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=plan.context_length, rope_theta=SMOL.rope_theta,
        rope_scaling=dict(plan.rope_scaling))
    theirs, their_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    ours, our_factor = rope_inv_freq(64, SMOL.rope_theta, plan.rope_scaling)
    assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(their_factor)


def test_step_token_budget_flag_default_and_bad_values() -> None:
    from pensieve.cli.main import build_parser

    def settings(*flags: str):
        return settings_from_args(build_parser().parse_args(["serve", "--device", "cpu", *flags]), {})

    assert settings().engine.max_num_batched_tokens == 512  # CPU
    assert settings("--max-num-batched-tokens", "2048").engine.max_num_batched_tokens == 2048
    assert settings("--max-num-seqs", "3").engine.max_num_seqs == 3
    for flags in (("--max-num-batched-tokens", "0"), ("--max-num-seqs", "0")):
        with pytest.raises(ValueError, match="must be at least 1"):
            settings(*flags)


def test_async_scheduling_flag() -> None:
    from pensieve.cli.main import build_parser

    def engine(*flags: str):
        return settings_from_args(build_parser().parse_args(["serve", "--device", "cpu", *flags]), {}).engine

    assert engine().async_scheduling is None and not engine().overlap_steps  # auto: off on the CPU
    assert engine("--async-scheduling", "on").overlap_steps
    assert not engine("--async-scheduling", "off").overlap_steps
    with pytest.raises(SystemExit):
        engine("--async-scheduling", "maybe")
