"""``pensieve serve``'s hybrid-cache flags reach the engine config, bad values are refused, and
the start log's KV bytes per token count what each layer caches."""

from __future__ import annotations

import pytest
import torch

from pensieve.cli.main import build_parser
from pensieve.cli.serve_torch import kv_bytes_per_token
from pensieve.cli.settings import settings_from_args
from pensieve.models.registry import family


def settings(*flags: str):  # noqa: ANN201
    return settings_from_args(build_parser().parse_args(["serve", "--device", "cpu", *flags]), {})


def test_checkpoint_flags_reach_the_engine_config():
    default = settings().engine
    assert (default.state_checkpoint_interval, default.state_checkpoints) == (512, None)
    engine = settings("--state-checkpoint-interval", "1024", "--state-checkpoints", "12").engine
    assert (engine.state_checkpoint_interval, engine.state_checkpoints) == (1024, 12)


@pytest.mark.parametrize("flags, message", [
    (("--state-checkpoint-interval", "100"), "multiple of block_size"),
    (("--state-checkpoint-interval", "-16"), "at least 0"),
    (("--state-checkpoints", "-1"), "state_checkpoints must be"),
])
def test_bad_checkpoint_flags_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        settings(*flags)


def test_kv_bytes_per_token_counts_what_each_layer_caches():
    from tests.helpers.tiny_hybrid import hybrid_config

    args = family("qwen3_5").args_from_hf(hybrid_config("qwen3_5").to_dict())
    # 4 layers, full_attention_interval 2: two attention layers of 2 KV heads × 16, K and V
    assert kv_bytes_per_token(args, torch.float32) == 2 * 2 * 2 * 16 * 4
