"""Engine liveness: a dead engine loop ends every caller at once and says so; a stuck step
is reported by the watchdog; /health answers 503 with the reason."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from pensieve.engine.client import MAX_FAILED_STEPS, EngineClient
from pensieve.engine.errors import EngineDeadError
from pensieve.engine.types import FinishReason, SamplingParams
from tests.helpers.api_fakes import ScriptedEngine, fake_server, text_script
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


async def _until_finished(client, rid, prompt="a prompt", params=LONG, timeout=5.0):
    deltas = []

    async def run():
        async for d in client.generate(ByteTokenizer().encode(prompt), params, rid):
            deltas.append(d)

    await asyncio.wait_for(run(), timeout)
    return deltas


async def _eventually(condition, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


@pytest.fixture
def deaths():
    return []


@pytest.fixture
def client(deaths):
    c = EngineClient(tiny_engine(), "tiny", on_death=deaths.append)
    c.start()
    yield c
    c.shutdown()


async def test_a_loop_failure_outside_step_ends_every_caller_and_reports(client, deaths):
    """Old code: the thread died silently and every caller waited forever."""
    started = asyncio.Event()
    original = client.engine.has_work

    def has_work():
        if started.is_set():
            raise RuntimeError("scheduler state corrupt")
        return original()

    client.engine.has_work = has_work

    async def first_then_break(rid, prompt):
        deltas = []
        async for d in client.generate(ByteTokenizer().encode(prompt), LONG, rid):
            deltas.append(d)
            if len(deltas) == 2:
                started.set()
        return deltas

    a, b = await asyncio.wait_for(asyncio.gather(first_then_break("a", "one"), first_then_break("b", "two")), 5)
    for deltas in (a, b):
        assert deltas[-1].finish_reason is FinishReason.ERROR
        assert "scheduler state corrupt" in deltas[-1].error
    assert client.dead_reason is not None and "scheduler state corrupt" in client.dead_reason
    await _eventually(lambda: deaths)  # on_death runs after the callers were ended
    assert deaths == [client.dead_reason]
    with pytest.raises(EngineDeadError):
        await _until_finished(client, "late")


async def test_repeated_step_failures_declare_the_engine_dead(client, deaths):
    def broken_step():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    client.engine.step = broken_step
    for i in range(MAX_FAILED_STEPS):
        deltas = await _until_finished(client, f"r{i}", prompt=f"prompt {i}")
        assert deltas[-1].finish_reason is FinishReason.ERROR
    await _eventually(lambda: deaths)
    assert deaths and "illegal memory access" in client.dead_reason


async def test_one_failed_step_does_not_kill_the_engine(client, deaths):
    step, calls = client.engine.step, [0]

    def flaky():
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("transient")
        return step()

    client.engine.step = flaky
    assert (await _until_finished(client, "x"))[-1].finish_reason is FinishReason.ERROR
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert (await _until_finished(client, "y", params=short))[-1].finish_reason is FinishReason.MAX_TOKENS
    assert client.dead_reason is None and not deaths


async def test_watchdog_reports_a_stuck_step(caplog):
    c = EngineClient(tiny_engine(), "tiny", watchdog_s=0.2)
    step = c.engine.step

    def slow():
        time.sleep(0.8)
        return step()

    c.engine.step = slow
    c.start()
    try:
        with caplog.at_level(logging.WARNING, logger="pensieve.engine.client"):
            short = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            await _until_finished(c, "s", params=short)
    finally:
        c.shutdown()
    assert any("watchdog" in r.getMessage() for r in caplog.records)


async def test_drain_ends_streams_and_refuses_new_requests(client, deaths):
    async def drain_soon():
        await asyncio.sleep(0.1)
        client.drain("the server is shutting down")

    deltas, _ = await asyncio.gather(_until_finished(client, "d"), drain_soon())
    assert deltas[-1].finish_reason is FinishReason.ERROR and "shutting down" in deltas[-1].error
    assert client.drained and not deaths
    with pytest.raises(EngineDeadError):
        await _until_finished(client, "after")


def test_health_is_503_with_the_reason_once_the_engine_died():
    engine = ScriptedEngine(text_script("hi"))
    with fake_server(engine) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        engine.dead_reason = "RuntimeError: boom"
        r = httpx.get(f"{url}/health")
    assert r.status_code == 503
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "RuntimeError: boom" in body["error"]["message"]
