"""Engine.step(): batching, chunked prefill, preemption, stops and block accounting."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pensieve.engine.errors import PromptTooLongError
from pensieve.engine.types import FinishReason, SamplingParams
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def run_all(engine, prompts: dict[str, str], params=GREEDY, max_steps=10_000):
    tok = ByteTokenizer()
    for rid, text in prompts.items():
        engine.add_request(rid, tok.encode(text), params)
    out = {rid: [] for rid in prompts}
    final = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for d in engine.step():
            out[d.request_id].extend(d.token_ids)
            if d.finish_reason:
                final[d.request_id] = d
    return out, final


def test_batched_greedy_equals_one_at_a_time():
    prompts = {f"r{i}": f"prompt number {i} " * (i + 1) for i in range(5)}
    batched, _ = run_all(tiny_engine(), prompts)
    for rid, text in prompts.items():
        alone, _ = run_all(tiny_engine(max_num_seqs=1), {rid: text})
        assert alone[rid] == batched[rid]
    assert len({tuple(v) for v in batched.values()}) > 1  # not a constant output


def test_chunked_prefill_equals_whole_prefill():
    prompt = {"a": "a long prompt that spans many chunks " * 6}
    small, _ = run_all(tiny_engine(max_num_batched_tokens=7), prompt)
    big, _ = run_all(tiny_engine(max_num_batched_tokens=512), prompt)
    assert small == big and len(big["a"]) == 12


def test_preemption_keeps_outputs_and_frees_blocks():
    prompts = {f"p{i}": f"request {i} with some text" for i in range(4)}
    reference, _ = run_all(tiny_engine(), prompts)
    engine = tiny_engine(num_kv_blocks=24, context_length=96)  # too few for all four at once: forces preemption
    squeezed, final = run_all(engine, prompts)
    assert squeezed == reference
    assert all(f.finish_reason is FinishReason.MAX_TOKENS for f in final.values())
    assert engine.pool.num_free == engine.pool.num_blocks


def test_abort_frees_blocks_within_a_step():
    engine = tiny_engine()
    engine.add_request("x", ByteTokenizer().encode("hello there"), GREEDY)
    engine.step()
    assert engine.pool.num_free < engine.pool.num_blocks
    delta = engine.abort("x")
    assert delta.finish_reason is FinishReason.ABORTED
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_work()


def test_max_tokens_and_usage_counts():
    _, final = run_all(tiny_engine(), {"m": "count"}, SamplingParams(max_tokens=5, temperature=0))
    d = final["m"]
    assert d.num_output_tokens <= 5 and d.num_prompt_tokens == 5
    if d.finish_reason is FinishReason.MAX_TOKENS:
        assert d.num_output_tokens == 5


def test_context_full_finishes_with_context_reason():
    engine = tiny_engine(context_length=40)
    _, final = run_all(engine, {"c": "x" * 30}, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert final["c"].finish_reason is FinishReason.CONTEXT
    assert final["c"].num_prompt_tokens + final["c"].num_output_tokens == 40


def test_prompt_too_long_message():
    engine = tiny_engine(context_length=16)
    with pytest.raises(PromptTooLongError, match=r"prompt is too long: 20 tokens > 16 maximum"):
        engine.add_request("big", list(range(20)), GREEDY)


def test_seeded_sampling_is_reproducible_and_varies_with_seed():
    params = lambda s: SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True)
    a, _ = run_all(tiny_engine(), {"s": "seeded"}, params(1))
    b, _ = run_all(tiny_engine(), {"s": "seeded"}, params(1))
    c, _ = run_all(tiny_engine(), {"s": "seeded"}, params(2))
    assert a == b and a != c


def _check_block_accounting(engine) -> None:
    """Every block's ref count is the number of live requests holding it; free = unheld."""
    held = Counter(b for req in engine._requests.values() for b in req.block_ids)
    pool = engine.pool
    assert all(pool.ref_count(b) == held.get(b, 0) for b in range(pool.num_blocks)), held
    assert pool.num_free == pool.num_blocks - len(held)


def test_random_requests_never_leak_blocks():
    """1000 random requests (shared prefixes, session hints, aborts, preemption under a small
    pool): the accounting holds after every step, and everything is free at the end."""
    rng = random.Random(7)
    engine = tiny_engine(num_kv_blocks=40, context_length=160, max_num_batched_tokens=32)
    tok, live, n_done = ByteTokenizer(), set(), 0
    stems = ["shared system prompt one ", "another shared stem ", ""]
    for i in range(1000):
        rid = f"q{i}"
        text = rng.choice(stems) + "".join(rng.choice("abcdef ") for _ in range(rng.randint(1, 40)))
        params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=0,
                                retain_prefix=rng.random() < 0.3)
        engine.add_request(rid, tok.encode(text), params)
        live.add(rid)
        if rng.random() < 0.2 and live:
            engine.abort(rng.choice(sorted(live)))
        for d in engine.step():
            if d.finish_reason:
                live.discard(d.request_id)
                n_done += 1
        _check_block_accounting(engine)
    while engine.has_work():
        engine.step()
        _check_block_accounting(engine)
    assert engine.pool.num_free == engine.pool.num_blocks
    assert n_done > 400


def test_session_requests_are_admitted_before_side_requests():
    engine = tiny_engine(max_num_seqs=1)
    tok = ByteTokenizer()
    side = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    main = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, retain_prefix=True)
    engine.add_request("side", tok.encode("side request"), side)
    engine.add_request("main", tok.encode("main session turn"), main)
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["main"]
    finished = []
    while engine.has_work():
        finished += [d.request_id for d in engine.step() if d.finish_reason]
    assert finished == ["main", "side"]
