"""Tests that try to break the server, bounded for CI.

- fuzz: ~1500 generated bad and odd requests over real HTTP on loopback (the real app and a
  scripted engine): never a 5xx, every error in the Anthropic envelope, the server alive after;
- soak: concurrent streams on the real engine (tiny model) with clients leaving mid-stream:
  every stream that ends is well formed, and the KV pool is whole again at the end.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from pensieve.api import ApiConfig, create_app
from pensieve.chat import PromptRenderer
from tests.helpers.api_fakes import CharTokenizer, ScriptedEngine, text_script
from tests.helpers.fuzz_cases import VALID, case as _case, check_response as _check_response
from tests.helpers.server import serve_app_in_thread


def test_fuzz_never_5xx_always_the_envelope_server_alive():
    rng = random.Random(1234)
    engine = ScriptedEngine(text_script("ok", "!"))
    app = create_app(ApiConfig(model_id="tiny-model", context_length=4096), engine,
                     PromptRenderer(CharTokenizer(), None))
    deadline = time.monotonic() + 60
    statuses: dict[int, int] = {}
    with serve_app_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for i in range(1500):
            method, path, raw, headers = _case(rng)
            r = client.request(method, path, content=raw, headers=headers)
            _check_response(r, (i, method, path, raw[:200]))
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if time.monotonic() > deadline:
                break
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/messages", json=VALID)
        assert ok.status_code == 200 and ok.json()["content"][0]["text"] == "ok!"
    assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 100, statuses


async def _one_stream(url: str, rng: random.Random, leave_after: int | None) -> list[str] | None:
    body = {"model": "tiny-model", "max_tokens": rng.randint(1, 40), "stream": True,
            "temperature": rng.choice([0, 1e-40, 0.7, 1.0]),
            "messages": [{"role": "user", "content": "hello " * rng.randint(1, 30)}]}
    events: list[str] = []
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", f"{url}/v1/messages", json=body) as r:
            assert r.status_code in (200, 529), r.status_code
            if r.status_code != 200:
                return None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if leave_after is not None and len(events) >= leave_after:
                        return None  # leaves mid-stream
    return events


@pytest.mark.slow
def test_soak_concurrent_streams_with_disconnects_on_the_real_engine():
    from pensieve.engine.client import EngineClient
    from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

    engine = tiny_engine(num_kv_blocks=200)
    client = EngineClient(engine, "tiny-model")
    client.start()
    app = create_app(ApiConfig(model_id="tiny-model", context_length=512), client,
                     PromptRenderer(ByteTokenizer(), None))
    rng = random.Random(5)

    async def wave(url: str):
        jobs = [_one_stream(url, rng, rng.choice([None, None, 2, 4, 8])) for _ in range(24)]
        return await asyncio.gather(*jobs)

    try:
        with serve_app_in_thread(app) as url:
            finished = []
            deadline = time.monotonic() + 40
            for _ in range(4):
                finished += [e for e in asyncio.run(wave(url)) if e is not None]
                if time.monotonic() > deadline:
                    break
            for events in finished:
                assert events[0] == "message_start", events
                assert events[-1] in ("message_stop", "error"), events[-5:]
                assert events.count("content_block_start") == events.count("content_block_stop")
            assert len(finished) > 20
            for _ in range(200):  # aborted requests free their KV within a step
                if engine.pool.num_free == engine.pool.num_blocks and not engine.has_work():
                    break
                time.sleep(0.02)
            assert engine.pool.num_free == engine.pool.num_blocks
            assert httpx.get(f"{url}/health").status_code == 200
    finally:
        client.shutdown()
