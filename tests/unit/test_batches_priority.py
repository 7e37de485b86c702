"""Batch requests run at a lower priority than interactive ones (engine scheduler)."""

from __future__ import annotations

from pensieve.engine.types import BACKGROUND_PRIORITY, SamplingParams
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

INTERACTIVE = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
BACKGROUND = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, priority=BACKGROUND_PRIORITY)


def _drain(engine) -> tuple[list[str], dict[str, list[int]]]:
    finished: list[str] = []
    outputs: dict[str, list[int]] = {}
    while engine.has_work():
        for d in engine.step():
            outputs.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finish_reason:
                finished.append(d.request_id)
    return finished, outputs


def test_waiting_interactive_request_is_admitted_before_older_background_ones():
    engine = tiny_engine(max_num_seqs=1)
    tok = ByteTokenizer()
    for i in range(3):
        engine.add_request(f"batch{i}", tok.encode(f"batch request {i}"), BACKGROUND)
    engine.add_request("chat", tok.encode("interactive turn"), INTERACTIVE)
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["chat"]
    finished, _ = _drain(engine)
    assert finished[0] == "chat"
    assert sorted(finished) == ["batch0", "batch1", "batch2", "chat"]


def test_interactive_request_preempts_a_running_background_request_and_both_stay_exact():
    tok = ByteTokenizer()
    alone = tiny_engine(max_num_seqs=1)
    alone.add_request("batch", tok.encode("a background prompt"), BACKGROUND)
    _, reference = _drain(alone)

    engine = tiny_engine(max_num_seqs=1)
    engine.add_request("batch", tok.encode("a background prompt"), BACKGROUND)
    early = [t for _ in range(2) for d in engine.step() for t in d.token_ids]
    assert early  # the background request is decoding, holding the only seat
    assert [r.request_id for r in engine.scheduler.running] == ["batch"]
    engine.add_request("chat", tok.encode("interactive turn"), INTERACTIVE)
    third = engine.step()
    early += [t for d in third for t in d.token_ids if d.request_id == "batch"]
    assert [r.request_id for r in engine.scheduler.running] == ["chat"]
    finished, outputs = _drain(engine)
    outputs["batch"] = early + outputs["batch"]
    outputs["chat"] = [t for d in third for t in d.token_ids if d.request_id == "chat"] + outputs["chat"]
    assert finished == ["chat", "batch"]
    assert outputs["batch"] == reference["batch"]  # recomputed after preemption, same tokens
    assert len(outputs["chat"]) == 3
    assert engine.pool.num_free == engine.pool.num_blocks


def test_background_requests_never_preempt_each_other_or_interactive_ones():
    engine = tiny_engine(max_num_seqs=1)
    tok = ByteTokenizer()
    engine.add_request("chat", tok.encode("interactive turn"), INTERACTIVE)
    engine.step()
    engine.add_request("batch", tok.encode("background"), BACKGROUND)
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["chat"]
    finished, _ = _drain(engine)
    assert finished == ["chat", "batch"]


def test_under_async_scheduling_a_request_is_preempted_only_once_its_token_landed():
    """A step in flight holds a token of the running background request: the interactive
    request's seat is taken only after that token is read (never by preempting a request whose
    sampled id the host has not seen), and both outputs stay exact."""
    tok = ByteTokenizer()
    alone = tiny_engine(max_num_seqs=1, async_scheduling=True)
    alone.add_request("batch", tok.encode("a background prompt"), BACKGROUND)
    _, reference = _drain(alone)

    engine = tiny_engine(max_num_seqs=1, async_scheduling=True)
    in_flight_at_preemption: list[int] = []
    preempt = engine.scheduler._preempt

    def spy(req):
        in_flight_at_preemption.append(req.num_inflight)
        preempt(req)

    engine.scheduler._preempt = spy
    engine.add_request("batch", tok.encode("a background prompt"), BACKGROUND)
    outputs: dict[str, list[int]] = {}
    finished: list[str] = []
    for step in range(40):
        if step == 3:
            engine.add_request("chat", tok.encode("interactive turn"), INTERACTIVE)
        for d in engine.step():
            outputs.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finish_reason:
                finished.append(d.request_id)
        if not engine.has_work():
            break
    assert in_flight_at_preemption and set(in_flight_at_preemption) == {0}
    assert finished == ["chat", "batch"]
    assert outputs["batch"] == reference["batch"] and len(outputs["chat"]) == 3
    assert engine.pool.num_free == engine.pool.num_blocks
