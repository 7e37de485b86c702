"""Admission and deadlines: an overloaded engine answers 529 with retry-after before the body is
even parsed; a request past its deadline is stopped with timeout_error (an error event when
streaming) and its KV freed; a waiting side request ages past a stream of session requests."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from pensieve.engine.client import EngineClient
from pensieve.engine.types import FinishReason, SamplingParams
from tests.helpers.api_fakes import ScriptedEngine, fake_server, text_script
from tests.helpers.tiny_engine import tiny_engine

HI = [{"role": "user", "content": "hi"}]
BODY = {"model": "claude-x", "max_tokens": 20, "messages": HI}


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


@pytest.mark.parametrize("body", [b"{this is not json", json.dumps(BODY).encode()])
def test_an_overloaded_engine_is_refused_before_the_body_is_parsed(body):
    engine = ScriptedEngine(text_script("ok"))
    engine.overloaded = "70 requests are waiting, the limit is 64"
    with fake_server(engine) as url:
        response = httpx.post(f"{url}/v1/messages", content=body, timeout=10,
                              headers={"content-type": "application/json"})
        assert response.status_code == 529
        assert response.headers["retry-after"] == "2"
        error = response.json()["error"]
        assert error["type"] == "overloaded_error" and "70 requests are waiting" in error["message"]
        assert engine.calls == []
        engine.overloaded = None  # the load is gone: served again
        assert httpx.post(f"{url}/v1/messages", json=BODY, timeout=10).status_code == 200


def test_engine_client_reports_a_long_queue_and_full_kv():
    engine = tiny_engine()
    client = EngineClient(engine, "tiny", max_waiting=2)  # not started: requests stay queued
    assert client.overload() is None
    params = SamplingParams(max_tokens=4)
    engine.add_request("a", [1, 2, 3], params)
    assert client.overload() is None
    engine.add_request("b", [1, 2, 3], params)
    assert "2 requests are waiting, the limit is 2" in client.overload()
    engine.abort("b")
    held = engine.pool.allocate(engine.pool.num_free)  # every block in use
    assert "the KV cache is full and 1 request(s) wait" in client.overload()
    engine.pool.release(held)
    assert client.overload() is None


def test_a_stream_past_its_deadline_ends_with_a_timeout_error_event():
    engine = ScriptedEngine(text_script("a", "b", "c", "d", "e", delay_s=0.3))
    with fake_server(engine, request_timeout_s=0.8) as url:
        with httpx.stream("POST", f"{url}/v1/messages", json={**BODY, "stream": True}, timeout=10) as r:
            assert r.status_code == 200
            events = sse_events(r)
    names = [name for name, _ in events if name != "ping"]
    assert names[0] == "message_start" and names[-1] == "error"
    assert events[-1][1]["error"]["type"] == "timeout_error"
    assert "deadline" in events[-1][1]["error"]["message"]
    assert "message_stop" not in names
    assert engine.calls[0].aborted.wait(5)  # the engine request was stopped


def test_a_message_past_its_deadline_is_a_504_timeout_error():
    engine = ScriptedEngine(text_script("a", "b", "c", delay_s=0.5))
    with fake_server(engine, request_timeout_s=0.4) as url:
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/messages", json=BODY, timeout=10)
    assert response.status_code == 504 and time.monotonic() - started < 1.4
    assert response.json()["error"]["type"] == "timeout_error"
    assert engine.calls[0].aborted.wait(5)


def test_the_deadline_frees_the_real_engines_kv(monkeypatch):
    engine = tiny_engine()
    original_step = engine.step

    def slow_step():
        time.sleep(0.02)
        return original_step()

    monkeypatch.setattr(engine, "step", slow_step)
    monkeypatch.setattr(engine.tokenizer, "eos_token_ids", frozenset())  # it never ends its turn
    client = EngineClient(engine, "tiny")
    client.start()
    try:
        with fake_server(client, request_timeout_s=0.5, context_length=512) as url:
            body = {**BODY, "max_tokens": 400, "temperature": 0.0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=10) as r:
                events = sse_events(r)
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "timeout_error"
        for _ in range(200):
            if not engine.has_work():
                break
            time.sleep(0.02)
        assert not engine.has_work() and engine.pool.num_free == engine.pool.num_blocks
    finally:
        client.shutdown()


def test_a_waiting_side_request_ages_past_a_stream_of_session_requests():
    engine = tiny_engine(max_num_seqs=1, aging_steps=6)
    side = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    session = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, retain_prefix=True)
    engine.add_request("s0", [5, 6, 7], session)
    engine.add_request("side", [8, 9], side)
    first_token_step = None
    for step in range(1, 60):
        engine.add_request(f"s{step}", [5, 6, 7, step % 200], session)  # always one more waiting
        if any(d.request_id == "side" and d.token_ids for d in engine.step()):
            first_token_step = step
            break
    assert first_token_step is not None, "the side request starved"
    assert first_token_step <= 6 + 4  # admitted once aged, within a request's length


def test_serve_flags_for_admission_deadline_and_grammar_timeout():
    from pensieve.cli.main import build_parser
    from pensieve.cli.settings import settings_from_args

    def settings(*flags: str):
        return settings_from_args(build_parser().parse_args(["serve", "--device", "cpu", *flags]), {})

    default = settings()
    assert default.engine.max_waiting == 64 and default.request_timeout_s == 3600.0
    assert default.engine.max_num_seqs == 8  # the CPU's steps grow with their rows
    assert settings("--device", "cuda").engine.max_num_seqs == 32
    assert settings("--device", "cuda", "--max-num-seqs", "4").engine.max_num_seqs == 4
    assert default.engine.kv_cache_bytes is None and default.engine.host_kv_bytes == 1 << 30
    sized = settings("--kv-cache-gb", "2.5").engine
    assert sized.kv_cache_bytes == sized.host_kv_bytes == int(2.5 * 2**30)
    from pensieve.backends.model_runner import kv_budget

    assert kv_budget(sized) == int(2.5 * 2**30) and kv_budget(default.engine) == 1 << 30
    assert default.engine.grammar_timeout_s == 5.0
    custom = settings("--max-waiting", "8", "--request-timeout", "0", "--grammar-timeout", "0.5")
    assert custom.engine.max_waiting == 8 and custom.request_timeout_s is None
    assert custom.engine.grammar_timeout_s == 0.5
    for bad in (["--max-waiting", "0"], ["--request-timeout", "-1"], ["--grammar-timeout", "0"],
                ["--kv-cache-gb", "0"]):
        with pytest.raises(ValueError, match=bad[0]):
            settings(*bad)
