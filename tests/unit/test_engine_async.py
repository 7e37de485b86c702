"""Async scheduling (a step launched on the previous step's ids still on the device): the same
tokens as synchronous steps, in every way a request can end, with exact block accounting.

On CPU the model runs synchronously, but the engine takes the same path as on CUDA: the next
step's input ids come from the previous step's sampled-id tensor before the host reads them.
"""

from __future__ import annotations

import random

import pytest

from pensieve.engine.types import FinishReason, SamplingParams
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine
from tests.unit.test_engine import GREEDY, _check_block_accounting, run_all


def _engines(**overrides):
    return tiny_engine(async_scheduling=False, **overrides), tiny_engine(async_scheduling=True, **overrides)


def _count_carried(engine) -> list[int]:
    """Count the steps that ran on carried (device-side) ids."""
    calls = [0]
    run = engine.runner.run

    def spy(chunks, carried=None, carried_rows=()):
        calls[0] += carried is not None
        return run(chunks, carried, carried_rows)

    engine.runner.run = spy
    return calls


PROMPTS = {f"r{i}": f"prompt number {i} " * (i + 1) for i in range(5)}


def test_async_gives_the_same_tokens_as_sync_and_chains_steps():
    sync, overlapped = _engines()
    carried = _count_carried(overlapped)
    a, fa = run_all(sync, PROMPTS)
    b, fb = run_all(overlapped, PROMPTS)
    assert a == b and all(len(v) == 12 for v in b.values())
    assert {k: f.finish_reason for k, f in fa.items()} == {k: f.finish_reason for k, f in fb.items()}
    assert carried[0] >= 8  # most decode steps ran on ids the host had not read
    assert overlapped.pool.num_free == overlapped.pool.num_blocks and not overlapped.has_work()


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=7, temperature=0.0),  # may end on EOS
    SamplingParams(max_tokens=30, temperature=0.0, stop_sequences=["e"]),
])
def test_async_matches_sync_for_sampling_and_stops(params):
    sync, overlapped = _engines()
    a, fa = run_all(sync, PROMPTS, params)
    b, fb = run_all(overlapped, PROMPTS, params)
    assert a == b and any(a.values())
    assert [(f.finish_reason, f.stop_sequence, f.num_output_tokens) for f in fa.values()] == \
        [(f.finish_reason, f.stop_sequence, f.num_output_tokens) for f in fb.values()]
    assert overlapped.pool.num_free == overlapped.pool.num_blocks


def test_async_request_ending_on_a_late_read_token_wastes_only_that_row():
    """A stop sequence found on a token read one step late: the text ends there, the extra
    row's token is dropped, and the other requests go on unchanged."""
    sync, overlapped = _engines()
    params = {"stops": SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_sequences=["r"]),
              "runs": GREEDY}
    tok = ByteTokenizer()
    results = []
    for engine in (sync, overlapped):
        for rid, p in params.items():
            engine.add_request(rid, tok.encode("a prompt for " + rid), p)
        texts, ends = {r: "" for r in params}, {}
        while engine.has_work():
            for d in engine.step():
                texts[d.request_id] += d.text
                if d.finish_reason:
                    ends[d.request_id] = (d.finish_reason, d.num_output_tokens)
        results.append((texts, ends))
    assert results[0] == results[1]
    assert results[1][1]["runs"] == (FinishReason.MAX_TOKENS, 12)


def test_async_preemption_and_context_limit():
    prompts = {f"p{i}": f"request {i} with some text" for i in range(4)}
    reference, _ = run_all(tiny_engine(async_scheduling=False), prompts)
    engine = tiny_engine(async_scheduling=True, num_kv_blocks=24, context_length=96)
    squeezed, final = run_all(engine, prompts)
    assert squeezed == reference
    assert engine.pool.num_free == engine.pool.num_blocks
    engine = tiny_engine(async_scheduling=True, context_length=40)
    _, final = run_all(engine, {"c": "x" * 30}, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert final["c"].finish_reason is FinishReason.CONTEXT and final["c"].num_output_tokens == 10


def test_async_abort_while_a_step_is_in_flight():
    engine = tiny_engine(async_scheduling=True)
    tok = ByteTokenizer()
    engine.add_request("x", tok.encode("hello there"), GREEDY)
    engine.add_request("y", tok.encode("general kenobi"), GREEDY)
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None  # a decode step is in flight
    assert engine.abort("x").finish_reason is FinishReason.ABORTED
    _check_block_accounting(engine)
    out = []
    while engine.has_work():
        out += engine.step()
    assert {d.request_id for d in out} == {"y"} and out[-1].finish_reason is FinishReason.MAX_TOKENS
    assert engine.abort("y") is None
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_work()
    engine.add_request("z", tok.encode("alone"), GREEDY)
    for _ in range(3):
        engine.step()
    engine.abort("z")  # the only request of the step in flight: nothing is left to run
    assert not engine.has_work() and engine.pool.num_free == engine.pool.num_blocks


def test_async_random_requests_never_leak_blocks():
    """300 random requests with arrivals and aborts between steps: the accounting holds after
    every step, and the outputs of the requests that ran to the end match a synchronous run."""
    rng = random.Random(11)
    engine = tiny_engine(async_scheduling=True, num_kv_blocks=40, context_length=160, max_num_batched_tokens=32)
    tok, live, outputs, ended = ByteTokenizer(), set(), {}, {}
    for i in range(300):
        rid = f"q{i}"
        text = rng.choice(["shared stem ", ""]) + "".join(rng.choice("abcdef ") for _ in range(rng.randint(1, 30)))
        engine.add_request(rid, tok.encode(text), SamplingParams(max_tokens=rng.randint(1, 10), temperature=0))
        live.add(rid)
        outputs[rid] = (text, [])
        if rng.random() < 0.15:
            gone = rng.choice(sorted(live))
            engine.abort(gone)
            live.discard(gone)
        for _ in range(rng.randint(1, 3)):
            for d in engine.step():
                outputs[d.request_id][1].extend(d.token_ids)
                if d.finish_reason:
                    live.discard(d.request_id)
                    ended[d.request_id] = d.finish_reason
            _check_block_accounting(engine)
    while engine.has_work():
        for d in engine.step():
            outputs[d.request_id][1].extend(d.token_ids)
            if d.finish_reason:
                ended[d.request_id] = d.finish_reason
        _check_block_accounting(engine)
    assert engine.pool.num_free == engine.pool.num_blocks
    finished = [r for r, why in ended.items() if why is not FinishReason.ABORTED]
    assert len(finished) > 150
    for rid in rng.sample(finished, 10):
        text, got = outputs[rid]
        max_tokens = len(got)
        alone, _ = run_all(tiny_engine(async_scheduling=False),
                           {rid: text}, SamplingParams(max_tokens=max_tokens, temperature=0))
        assert alone[rid] == got
