"""The start-up warm-up (run on CUDA by ``pensieve serve``): it leaves nothing behind."""

from __future__ import annotations

import pytest

from pensieve.engine.warm_up import warm_up
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine
from tests.unit.test_engine import GREEDY, run_all


@pytest.mark.parametrize("overlap", [False, True])
def test_warm_up_leaves_the_engine_as_new(overlap):
    engine = tiny_engine(async_scheduling=overlap, max_num_batched_tokens=512)
    seen = []
    inner = engine.runner.run
    engine.runner.run = lambda chunks, *carry: seen.append(sum(c.num_tokens for c in chunks)) or inner(chunks, *carry)
    steps, _ = warm_up(engine)
    assert steps >= len(seen) >= 15  # async: some steps only read the last one's tokens
    assert max(seen) >= 300 and 1 in seen and any(16 < n <= 40 for n in seen)  # eager, decode, chunk shapes
    # a follow-up turn's shape: short chunks alone over a long cached prefix, then two at once
    assert {41, 32, 151} <= set(seen), seen
    assert engine.pool.num_free == engine.pool.num_blocks and engine.pool.num_cached == 0
    assert not engine.has_work() and not engine._requests
    engine.runner.run = inner
    prompts = {"a": "after the warm-up", "b": "a second one"}
    assert run_all(engine, prompts) == run_all(tiny_engine(), prompts)


def test_warm_up_fits_a_small_context():
    engine = tiny_engine(context_length=64)
    steps, _ = warm_up(engine)
    assert steps > 0 and engine.pool.num_free == engine.pool.num_blocks
    tok = ByteTokenizer()
    engine.add_request("x", tok.encode("still serves"), GREEDY)
    while engine.has_work():
        engine.step()
