"""EngineClient: the async bridge — streaming, aborts, and attaching identical requests."""

from __future__ import annotations

import asyncio

import pytest

from pensieve.engine.client import EngineClient
from pensieve.engine.types import SamplingParams
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture
def client():
    c = EngineClient(tiny_engine(), "tiny")
    added = []
    original = c.engine.add_request
    c.engine.add_request = lambda rid, ids, p: (added.append(rid), original(rid, ids, p))[1]
    c.added = added
    c.start()
    yield c
    c.shutdown()


async def collect(client, rid, prompt="same prompt", stop_after=None):
    text, n = "", 0
    async for d in client.generate(ByteTokenizer().encode(prompt), PARAMS, rid):
        text += d.text
        n += 1
        if stop_after is not None and n >= stop_after:
            break
    return text


async def test_identical_in_flight_requests_share_one_generation(client):
    a, b = await asyncio.gather(collect(client, "a"), collect(client, "b"))
    assert a == b and len(a) > 0
    assert client.added == ["a"]
    c = await collect(client, "c")  # after it finished, a new identical request runs afresh
    assert c == a and client.added == ["a", "c"]


async def test_one_watcher_leaving_does_not_abort_the_other(client):
    full, partial = await asyncio.gather(collect(client, "x"), collect(client, "y", stop_after=2))
    assert len(full) > len(partial) and full.startswith(partial)
    assert client.added == ["x"]


async def test_leaving_alone_aborts_and_frees_blocks(client):
    await collect(client, "z", prompt="something else", stop_after=1)
    for _ in range(100):
        if client.engine.pool.num_free == client.engine.pool.num_blocks and not client.engine.has_work():
            break
        await asyncio.sleep(0.01)
    assert client.engine.pool.num_free == client.engine.pool.num_blocks


async def test_identical_unseeded_sampling_requests_each_get_their_own_sample(client):
    params = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)

    async def run(rid):
        text = ""
        async for d in client.generate(ByteTokenizer().encode("same prompt"), params, rid):
            text += d.text
        return text

    await asyncio.gather(run("u1"), run("u2"))
    assert client.added == ["u1", "u2"]  # two generations, not one shared sample
