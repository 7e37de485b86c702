"""The real server with the real SmolLM2 GGUF, driven by the official anthropic SDK."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re

import anthropic
import httpx
import pytest

from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def base_url():
    with pensieve_server() as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="local", max_retries=0)


def test_paris_at_temperature_zero(client):
    msg = client.messages.create(model="claude-sonnet-5", max_tokens=24, messages=QUESTION,
                                 extra_body=GREEDY)
    assert msg.type == "message" and msg.role == "assistant"
    assert "Paris" in msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    u = msg.usage
    assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens > 10
    assert u.output_tokens > 0


def test_stream_rebuilds_same_message_as_non_stream(client):
    kwargs = dict(model="claude-haiku-4-5-20251001", max_tokens=40, extra_body=GREEDY,
                  messages=[{"role": "user", "content": "Name three colours."}])
    plain = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_delta" in events
    assert final.content[0].text == plain.content[0].text and final.content[0].text
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_count_tokens_equals_message_start_input_tokens(client):
    body = dict(model="claude-opus-4-8", system=[{"type": "text", "text": "Be terse."}],
                messages=[{"role": "user", "content": "Hello there"},
                          {"role": "assistant", "content": "Hi."},
                          {"role": "user", "content": [{"type": "text", "text": "Capital of Italy?"}]}])
    counted = client.messages.count_tokens(**body).input_tokens
    with client.messages.stream(max_tokens=5, **body) as stream:
        start = next(e for e in stream if e.type == "message_start")
        stream.until_done()
    assert counted == start.message.usage.input_tokens > 10


def test_stop_sequence_is_reported_and_not_in_text(client):
    probe = client.messages.create(model="claude-sonnet-5", max_tokens=30, messages=QUESTION,
                                   extra_body=GREEDY).content[0].text
    word = probe.split()[2]  # a word the greedy answer is known to contain
    msg = client.messages.create(model="claude-sonnet-5", max_tokens=30, messages=QUESTION,
                                 extra_body={**GREEDY, "stop_sequences": [word]})
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == word
    assert word not in msg.content[0].text and probe.startswith(msg.content[0].text)


def test_max_tokens_stop_reason(client):
    msg = client.messages.create(model="claude-sonnet-5", max_tokens=3, extra_body=GREEDY,
                                 messages=[{"role": "user", "content": "Write a long story."}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3


def test_async_client_create_and_stream(base_url):
    async def go():
        aclient = anthropic.AsyncAnthropic(base_url=base_url, api_key="local", max_retries=0)
        msg = await aclient.messages.create(model="claude-sonnet-5", max_tokens=24,
                                            messages=QUESTION, extra_body=GREEDY)
        async with aclient.messages.stream(model="claude-sonnet-5", max_tokens=24,
                                           messages=QUESTION, extra_body=GREEDY) as s:
            final = await s.get_final_message()
        return msg, final

    msg, final = asyncio.run(go())
    assert "Paris" in msg.content[0].text and final.content[0].text == msg.content[0].text


def test_concurrent_requests_all_answer(client):
    def ask(i: int) -> str:
        return client.messages.create(
            model="claude-sonnet-5", max_tokens=16, extra_body=GREEDY,
            messages=[{"role": "user", "content": f"What is {i} plus {i}?"}]).content[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert all(a.strip() for a in answers)


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert len(models) == 1 and "SmolLM2" in models[0].id
    assert client.models.retrieve(models[0].id).id == models[0].id
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-model")


def test_errors_are_anthropic_shaped_and_server_keeps_serving(client, base_url):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="gpt-4o", max_tokens=5, messages=QUESTION)
    with pytest.raises(anthropic.BadRequestError) as too_long:
        client.messages.create(model="claude-sonnet-5", max_tokens=5,
                               messages=[{"role": "user", "content": "word " * 9000}])
    assert re.search(r"prompt is too long: \d+ tokens > 8192 maximum", str(too_long.value))
    r = httpx.post(f"{base_url}/v1/messages", json={"model": "claude-sonnet-5", "max_tokens": 5})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error" and r.headers.get("request-id")
    assert "Paris" in client.messages.create(model="claude-sonnet-5", max_tokens=24,
                                             messages=QUESTION, extra_body=GREEDY).content[0].text


def test_client_disconnect_mid_stream_then_serves(client, base_url):
    with httpx.stream("POST", f"{base_url}/v1/messages", json={
            "model": "claude-sonnet-5", "max_tokens": 400, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long essay about rivers."}]}) as r:
        for line in r.iter_lines():
            if "content_block_delta" in line:
                break  # leave mid-generation
    health = httpx.get(f"{base_url}/health").json()
    assert health
    assert client.messages.create(model="claude-sonnet-5", max_tokens=8, messages=QUESTION,
                                  extra_body=GREEDY).content[0].text


def test_follow_up_turn_reads_the_shared_prefix_from_cache(client):
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3.a1f;"},
              {"type": "text", "text": "You are a geography tutor. " * 40,
               "cache_control": {"type": "ephemeral"}}]
    first = dict(model="claude-sonnet-5", system=system, messages=QUESTION)
    system2 = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3.b7c;"}, system[1]]
    second = dict(model="claude-sonnet-5", system=system2,
                  messages=QUESTION + [{"role": "assistant", "content": "Paris."},
                                       {"role": "user", "content": "And of Spain?"}])
    a = client.messages.create(max_tokens=4, extra_body=GREEDY, **first)
    b = client.messages.create(max_tokens=4, extra_body=GREEDY, **second)
    total = client.messages.count_tokens(**second).input_tokens
    assert a.usage.cache_creation_input_tokens > 0
    assert b.usage.cache_read_input_tokens >= total - 40  # all but the new turn, despite the header
    assert b.usage.input_tokens + b.usage.cache_read_input_tokens + b.usage.cache_creation_input_tokens == total
