"""Prefix cache: hits reproduce cold outputs, count what they saved, and survive side requests."""

from __future__ import annotations

import random

from pensieve.engine.block_pool import BlockPool
from pensieve.engine.types import FinishReason, SamplingParams
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

TOK = ByteTokenizer()
PREFIX = "You are a careful assistant. Here are the tools you may use: " * 3


def generate(engine, rid, text, params=None):
    params = params or SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine.add_request(rid, TOK.encode(text), params)
    tokens, last = [], None
    while engine.has_work():
        for d in engine.step():
            if d.request_id == rid:
                tokens.extend(d.token_ids)
                last = d
    return tokens, last


def test_warm_turn_matches_cold_and_reports_cache_use():
    cold_engine = tiny_engine()
    cold, _ = generate(cold_engine, "cold", PREFIX + "Question two?")
    engine = tiny_engine()
    _, first = generate(engine, "t1", PREFIX + "Question one?")
    warm, second = generate(engine, "t2", PREFIX + "Question two?")
    assert warm == cold
    bs = engine.config.block_size
    shared = len(TOK.encode(PREFIX + "Question "))
    assert first.num_cached_tokens == 0 and first.num_new_cached_tokens > 0
    assert second.num_cached_tokens == (shared // bs) * bs
    assert second.num_cached_tokens + second.num_new_cached_tokens <= second.num_prompt_tokens


def test_identical_prompt_recomputes_only_its_last_token_block():
    engine = tiny_engine()
    text = PREFIX + "Same again."
    a, _ = generate(engine, "a", text)
    b, d = generate(engine, "b", text)
    n = len(TOK.encode(text))
    assert a == b and d.num_cached_tokens == ((n - 1) // engine.config.block_size) * engine.config.block_size


def _main_hit_after_side_requests(retain: bool) -> int:
    engine = tiny_engine(num_kv_blocks=96, context_length=384)
    main = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, retain_prefix=retain)
    side = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    generate(engine, "main1", PREFIX + "turn one", main)
    generate(engine, "side1", "s" * 150, side)
    generate(engine, "side2", "t" * 150, side)
    return generate(engine, "main2", PREFIX + "turn two", main)[1].num_cached_tokens


def test_side_requests_do_not_evict_a_retained_prefix():
    full = (len(TOK.encode(PREFIX + "turn t")) // 4) * 4
    assert _main_hit_after_side_requests(retain=True) == full
    assert _main_hit_after_side_requests(retain=False) < full  # plain LRU would lose it


def test_eviction_under_pressure_keeps_outputs_right():
    rng = random.Random(3)
    prompts = [PREFIX[: rng.randint(20, len(PREFIX))] + f" q{i}" for i in range(12)]
    reference = [generate(tiny_engine(), f"r{i}", p)[0] for i, p in enumerate(prompts)]
    engine = tiny_engine(num_kv_blocks=52, context_length=208)  # far too small to keep everything cached
    for i, p in enumerate(prompts):
        assert generate(engine, f"s{i}", p)[0] == reference[i]
    assert engine.pool.num_free == engine.pool.num_blocks


def test_concurrent_requests_share_prefix_blocks():
    engine = tiny_engine()
    generate(engine, "warm", PREFIX + "warm up")
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"c{i}", TOK.encode(PREFIX + f"concurrent {i}"), params)
    engine.step()
    shared = set(engine.scheduler.running[0].block_ids[:4])
    assert all(shared <= set(r.block_ids) for r in engine.scheduler.running)
    assert all(engine.pool.ref_count(b) == 3 for b in shared)
    while engine.has_work():
        engine.step()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_block_pool_lru_and_tiers():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.register(a[0], b"h0")
    pool.register(a[1], b"h1")
    pool.release([a[0]], retain=True)
    pool.release([a[1]])
    fresh = pool.allocate(3)  # two never-used blocks, then the ordinary cached one
    assert a[1] in fresh and pool.lookup(b"h1") is None and pool.lookup(b"h0") == a[0]
    pool.touch(a[0])
    assert pool.ref_count(a[0]) == 1 and pool.num_free == 0
