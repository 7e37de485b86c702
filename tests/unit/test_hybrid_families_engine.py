"""Qwen3-Next and Qwen3.5 (dense and MoE) through the real engine (``engine/kv_groups.py``: paged
K/V for the attention layers, a state slot and state checkpoints for the Gated DeltaNet layers):
greedy tokens equal transformers' ``generate`` for a prompt prefilled in chunks, two requests
decoding side by side, and a follow-up request that shares a long prefix resumes from a state
checkpoint (fewer tokens prefilled) and still equals ``generate``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pensieve.backends.torch_backend import build_model, torch_engine  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.engine.kv_groups import GroupedKVManager  # noqa: E402
from pensieve.engine.types import SamplingParams  # noqa: E402
from pensieve.loaders.registry import load_checkpoint  # noqa: E402
from tests.helpers.paged_run import prompt  # noqa: E402
from tests.helpers.tiny_families import VOCAB  # noqa: E402
from tests.helpers.tiny_hybrid import (  # noqa: E402
    CONFIGS, hybrid_config, hybrid_model, save_hybrid_hf, write_hybrid_gguf,
)

STEPS = 6
INTERVAL = 16


@cache
def reference(name: str) -> torch.nn.Module:
    return hybrid_model(hybrid_config(name))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hybrid-engine")


def engine_for(root: Path, name: str, source: str, **config):  # noqa: ANN003, ANN201
    path = (save_hybrid_hf(root / f"{name}-{source}", reference(name)) if source == "hf" else
            write_hybrid_gguf(root / f"{name}.gguf", reference(name), CONFIGS[name][2]))
    ckpt = load_checkpoint(path)
    cfg = EngineConfig(**{"context_length": 160, "block_size": 4, "max_num_seqs": 2,
                          "max_num_batched_tokens": 24, "state_checkpoint_interval": INTERVAL,
                          **config})
    engine = torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg)
    assert isinstance(engine.kv, GroupedKVManager)
    return engine


def generate(engine, prompts: dict[str, list[int]]) -> dict[str, tuple[list[int], int]]:  # noqa: ANN001
    """Each request's greedy tokens and its prompt tokens read from the cache."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, SamplingParams(max_tokens=STEPS, temperature=0.0,
                                                    ignore_eos=True))
    out = {rid: ([], 0) for rid in prompts}
    while engine.has_work():
        for d in engine.step():
            tokens, _ = out[d.request_id]
            tokens.extend(d.token_ids)
            out[d.request_id] = (tokens, d.num_cached_tokens)
    return out


def expected(name: str, ids: list[int]) -> list[int]:
    with torch.no_grad():
        return reference(name).generate(
            torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
            pad_token_id=0)[0, len(ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name, source", [("qwen3_next", "hf"), ("qwen3_5", "gguf"),
                                          ("qwen3_5_moe", "gguf")])
def test_greedy_tokens_equal_generate_and_a_follow_up_resumes(root, name, source):
    engine = engine_for(root, name, source)
    shared = prompt(70, VOCAB, seed=4)
    first, second = shared + prompt(9, VOCAB, seed=5), shared + prompt(11, VOCAB, seed=6)
    other = prompt(45, VOCAB, seed=7)
    together = generate(engine, {"a": first, "b": other})  # chunked, then decoding side by side
    assert together["a"][0] == expected(name, first)
    assert together["b"][0] == expected(name, other)
    tokens, cached = generate(engine, {"c": second})["c"]
    assert cached == len(shared) // INTERVAL * INTERVAL > 0  # resumed from a state checkpoint
    assert tokens == expected(name, second)
