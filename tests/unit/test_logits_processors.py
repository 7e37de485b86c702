"""Logits processors: the thinking budget (forcing the close marker) and how processors chain."""

from __future__ import annotations

import pytest
import torch

from pensieve.engine.logits_processors import (
    LogitsProcessor,
    ThinkingBudgetProcessor,
    accept_token,
    apply_processors,
    force_token,
)
from pensieve.engine.types import FinishReason, SamplingParams, ThinkingBudget
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

V = 16
CLOSE = (7, 8, 9)
OPEN = (5, 6)


def run(processors, wants: list[int]) -> list[int]:
    """Greedy over scripted logits that prefer ``wants[i]`` at step i; the tokens chosen."""
    out = []
    for want in wants:
        logits = torch.zeros(V)
        logits[want] = 5.0
        apply_processors(processors, logits)
        token = int(logits.argmax())
        accept_token(processors, token)
        out.append(token)
    return out


class Recorder(LogitsProcessor):
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.applied = 0

    def apply(self, logits: torch.Tensor) -> None:
        self.applied += 1

    def accept(self, token_id: int) -> None:
        self.seen.append(token_id)


def test_force_token_leaves_one_finite_logit():
    row = torch.randn(V)
    force_token(row, 3)
    assert int(row.argmax()) == 3 and torch.isinf(row).sum() == V - 1


def test_budget_spent_forces_the_close_marker_then_lets_go():
    proc = ThinkingBudgetProcessor(ThinkingBudget(close_ids=CLOSE, budget_tokens=3, starts_open=True))
    assert run([proc], [1] * 9) == [1, 1, 1, 7, 8, 9, 1, 1, 1]
    assert not proc.is_open and proc.num_thinking_tokens == 6


def test_close_before_the_budget_forces_nothing():
    proc = ThinkingBudgetProcessor(ThinkingBudget(close_ids=CLOSE, budget_tokens=10, starts_open=True))
    assert run([proc], [1, 7, 8, 9, 2, 2]) == [1, 7, 8, 9, 2, 2]
    assert not proc.is_open


def test_a_half_written_close_marker_is_finished_not_restarted():
    proc = ThinkingBudgetProcessor(ThinkingBudget(close_ids=CLOSE, budget_tokens=3, starts_open=True))
    assert run([proc], [1, 1, 7, 1, 1, 1]) == [1, 1, 7, 8, 9, 1]


def test_budget_zero_closes_at_once():
    proc = ThinkingBudgetProcessor(ThinkingBudget(close_ids=CLOSE, budget_tokens=0, starts_open=True))
    assert run([proc], [1, 1, 1, 1]) == [7, 8, 9, 1]


def test_open_marker_starts_counting_and_the_budget_spans_the_answer():
    proc = ThinkingBudgetProcessor(ThinkingBudget(close_ids=CLOSE, budget_tokens=2, open_ids=OPEN))
    assert not proc.is_open
    first = run([proc], [1, 5, 6, 1, 1, 1, 1, 1])
    assert first == [1, 5, 6, 1, 1, 7, 8, 9]
    # the budget is spent: a second thinking section is closed at once
    assert run([proc], [5, 6, 1, 1]) == [5, 6, 7, 8]


def test_no_budget_tracks_thinking_without_forcing():
    proc = ThinkingBudgetProcessor(ThinkingBudget(close_ids=CLOSE, budget_tokens=None, starts_open=True))
    rec = Recorder()
    assert run([proc, rec], [1] * 20 + [7, 8, 9, 2]) == [1] * 20 + [7, 8, 9, 2]
    assert rec.seen == [2]


def test_a_holding_processor_pauses_the_ones_after_it():
    thinking = ThinkingBudgetProcessor(ThinkingBudget(close_ids=CLOSE, budget_tokens=2, starts_open=True))
    rec = Recorder()
    out = run([thinking, rec], [1, 1, 1, 1, 1, 2])
    assert out == [1, 1, 7, 8, 9, 2]
    assert rec.seen == [2]  # the close marker's last token still belongs to the thinking
    assert rec.applied == 1


class DoneAfter(Recorder):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    @property
    def done(self) -> bool:
        return len(self.seen) >= self.n


def test_accept_token_reports_done():
    proc = DoneAfter(2)
    assert not accept_token([proc], 1)
    assert accept_token([proc], 1)


def test_thinking_budget_validation():
    with pytest.raises(ValueError):
        ThinkingBudget(close_ids=(), budget_tokens=3)
    with pytest.raises(ValueError):
        ThinkingBudget(close_ids=CLOSE, budget_tokens=-1)


def test_engine_forces_the_close_marker_of_a_thinking_request():
    tok = ByteTokenizer()
    close = tuple(tok.encode("</t>"))
    budget = ThinkingBudget(close_ids=close, budget_tokens=5, starts_open=True)
    engine = tiny_engine()
    engine.add_request("t", tok.encode("think about it"),
                       SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, thinking_budget=budget))
    engine.add_request("u", tok.encode("think about it"),
                       SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    out: dict[str, list[int]] = {"t": [], "u": []}
    while engine.has_work():
        for delta in engine.step():
            out[delta.request_id].extend(delta.token_ids)
            if delta.request_id == "t" and delta.finish_reason is not None:
                assert delta.finish_reason is FinishReason.MAX_TOKENS
    assert out["t"][:5] == out["u"][:5]  # the same model, unforced until the budget is spent
    assert tuple(out["t"][5:9]) == close
    assert not engine._processors  # dropped with the finished request
