"""Per-request isolation: one request's sampling numerics, processors or detokenizer fail
that request alone; the others in its batch finish as if it had never been there."""

from __future__ import annotations

import pytest
import torch

from pensieve.engine.logits_processors import LogitsProcessor
from pensieve.engine.sampler import GREEDY_BELOW, SamplingError, sample, sample_rows
from pensieve.engine.types import FinishReason, SamplingParams
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine
from tests.unit.test_engine import GREEDY, run_all

PROMPTS = {"a": "the first prompt", "b": "another prompt here", "c": "third"}


@pytest.mark.parametrize("temperature", [1e-40, 1e-38, 1e-30, 1e-6, 5e-324])
def test_tiny_temperatures_are_greedy(temperature):
    logits = torch.tensor([[0.0, 3.0, 1.0], [50.0, -1e30, 49.0]])
    params = SamplingParams(temperature=temperature)
    assert sample(logits, [params, params], [None, None]) == [1, 0]


def test_huge_logits_at_the_greedy_bound_do_not_raise():
    logits = torch.tensor([[3e38, -3e38, 1.0]])
    assert sample(logits, [SamplingParams(temperature=GREEDY_BELOW)], [None]) == [0]


def test_non_finite_rows_fail_alone():
    logits = torch.tensor([[0.0, 2.0, 1.0], [float("nan"), 0.0, 1.0], [float("inf"), 0.0, 0.0],
                           [float("-inf")] * 3, [1.0, 0.0, 5.0]])
    params = [SamplingParams(temperature=t) for t in (0.0, 1.0, 0.0, 0.7, 1.0)]
    gens = [torch.Generator().manual_seed(0) for _ in params]
    rows = sample_rows(logits, params, gens)
    assert set(rows.failed) == {1, 2, 3}
    assert rows.ids[0] == 1 and rows.ids[4] in (0, 1, 2)
    with pytest.raises(SamplingError):
        sample(logits, params, gens)


def _expected(prompts=PROMPTS, params=GREEDY):
    out, final = run_all(tiny_engine(), prompts, params)
    return out, final


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_tiny_temperature_request_runs_greedy_beside_others(async_scheduling):
    engine = tiny_engine(async_scheduling=async_scheduling)
    tok = ByteTokenizer()
    engine.add_request("tiny", tok.encode("the first prompt"),
                       SamplingParams(max_tokens=12, temperature=1e-40, ignore_eos=True))
    for rid in ("b", "c"):
        engine.add_request(rid, tok.encode(PROMPTS[rid]), GREEDY)
    out, final = _drive(engine)
    expected, _ = _expected()
    assert all(d.finish_reason is FinishReason.MAX_TOKENS for d in final.values())
    assert out["tiny"] == expected["a"] and out["b"] == expected["b"] and out["c"] == expected["c"]


def _drive(engine, max_steps=2000):
    out, final = {}, {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for d in engine.step():
            out.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finish_reason:
                final[d.request_id] = d
    return out, final


def _poison_row_of(engine, request_id: str, after_steps: int = 0):
    """Make the model's logits NaN for ``request_id``'s row from step ``after_steps`` on."""
    run, steps = engine.runner.run, [0]

    def poisoned(chunks, *args):
        logits = run(chunks, *args)
        steps[0] += 1
        sampled = [c.request.request_id for c in chunks if c.completes]
        if request_id in sampled and steps[0] > after_steps:
            logits = logits.clone()
            logits[sampled.index(request_id)] = float("nan")
        return logits

    engine.runner.run = poisoned


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("after_steps", [0, 4])
def test_nan_logits_fail_only_their_request(async_scheduling, after_steps):
    engine = tiny_engine(async_scheduling=async_scheduling)
    _poison_row_of(engine, "a", after_steps)
    out, final = run_all(engine, PROMPTS, SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True))
    expected, _ = run_all(tiny_engine(async_scheduling=async_scheduling), PROMPTS,
                          SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True))
    assert final["a"].finish_reason is FinishReason.ERROR and "non-finite" in final["a"].error
    for rid in ("b", "c"):
        assert final[rid].finish_reason is FinishReason.MAX_TOKENS and out[rid] == expected[rid]
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_work()


class _Exploding(LogitsProcessor):
    def __init__(self, where: str) -> None:
        self.where = where

    def apply(self, logits: torch.Tensor) -> None:
        if self.where == "apply":
            raise RuntimeError("grammar state corrupt")

    def accept(self, token_id: int) -> None:
        if self.where == "accept":
            raise RuntimeError("token rejected by the grammar")


@pytest.mark.parametrize("where", ["apply", "accept"])
def test_a_failing_processor_ends_only_its_request(where):
    engine = tiny_engine()
    tok = ByteTokenizer()
    for rid, text in PROMPTS.items():
        engine.add_request(rid, tok.encode(text), GREEDY)
    engine._processors["b"] = [_Exploding(where)]
    out, final = _drive(engine)
    expected, _ = _expected()
    assert final["b"].finish_reason is FinishReason.ERROR and "grammar" in final["b"].error
    assert out["a"] == expected["a"] and out["c"] == expected["c"]
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_failing_detokenizer_ends_only_its_request():
    engine = tiny_engine()
    tok = ByteTokenizer()
    for rid, text in PROMPTS.items():
        engine.add_request(rid, tok.encode(text), GREEDY)

    def broken(token):
        raise UnicodeError("cannot decode")

    engine._requests["c"].detokenizer.add = broken
    out, final = _drive(engine)
    expected, _ = _expected()
    assert final["c"].finish_reason is FinishReason.ERROR and "UnicodeError" in final["c"].error
    assert out["a"] == expected["a"] and out["b"] == expected["b"]
