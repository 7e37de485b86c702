"""Part of every step's token budget is kept for waiting requests: a short request sent
during a long prefill gets its first token within a step or two, not after the prefill."""

from __future__ import annotations

from pensieve.engine.types import SamplingParams
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_a_short_request_is_not_held_behind_a_long_prefill():
    engine = tiny_engine(max_num_batched_tokens=64, context_length=512)
    tok = ByteTokenizer()
    engine.add_request("long", tok.encode("x" * 480), GREEDY)
    engine.step()  # the long prefill is under way
    engine.add_request("short", tok.encode("hi"), GREEDY)
    first = {}
    for step in range(1, 50):
        for d in engine.step():
            if d.token_ids:
                first.setdefault(d.request_id, step)
        if "short" in first:
            break
    assert first["short"] <= 2, first  # the long prefill alone needs 7 more steps
    while engine.has_work():
        engine.step()
    assert engine.pool.num_free == engine.pool.num_blocks
