"""UpstreamClient over real loopback HTTP: Pensieve's app (the official anthropic SDK as the
client) in front of fake vLLM replicas (tests/helpers/vllm_fake.py). What goes upstream
(token ids, session headers), what comes back (text through Pensieve's detokenizer, stop
sequences, cached tokens), failover and cancellation. Real vLLM: tests/integration/
test_upstream_vllm.py."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anthropic
import pytest

from pensieve.api.app import create_app
from pensieve.api.config import ApiConfig
from pensieve.backends.upstream_client import UpstreamClient
from pensieve.backends.upstream_config import UpstreamConfig
from pensieve.chat.prompt import PromptRenderer
from pensieve.cli.serve_upstream import template_source
from pensieve.loaders.default_model import default_model_path
from tests.helpers.server import serve_app_in_thread
from tests.helpers.vllm_fake import FakeVllm

REPLY = "Hello there, friend."
TOOL = {"name": "Read", "description": "Read a file", "input_schema": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}


@pytest.fixture(scope="module")
def source():  # noqa: ANN201
    _, tokenizer, template, _ = template_source(default_model_path())
    return tokenizer, template


@pytest.fixture()
def replicas(source) -> Iterator[tuple[list[FakeVllm], list[str]]]:  # noqa: ANN001
    tokenizer, _ = source
    eos = min(tokenizer.eos_token_ids - {0}) if tokenizer.eos_token_ids - {0} else 0
    reply = tokenizer.encode(REPLY, special=False) + [eos]
    fakes = [FakeVllm(name, lambda body: (list(reply), "stop"), cached_tokens=16) for name in ("a", "b")]
    with serve_app_in_thread(fakes[0].app()) as url_a, serve_app_in_thread(fakes[1].app()) as url_b:
        yield fakes, [url_a, url_b]


def _pensieve(source, urls: list[str], **config: object):  # noqa: ANN001, ANN202
    tokenizer, template = source
    client = UpstreamClient(UpstreamConfig(tuple(urls), model="fake-model", health_interval_s=0.2,
                                           **config), tokenizer, 4096)
    client.start()
    app = create_app(ApiConfig(model_id="smol", context_length=4096), client,
                     PromptRenderer(tokenizer, template))
    return client, serve_app_in_thread(app)


def _ask(sdk: anthropic.Anthropic, session: str | None = None, **extra: object):  # noqa: ANN202
    headers = {"X-Claude-Code-Session-Id": session} if session else {}
    return sdk.messages.create(model="smol", max_tokens=50, extra_headers=headers,
                               messages=[{"role": "user", "content": "Say hello."}], **extra)


def test_text_round_trip_session_routing_and_cached_tokens(source, replicas) -> None:  # noqa: ANN001
    fakes, urls = replicas
    client, server = _pensieve(source, urls)
    with server as base:
        sdk = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        first = _ask(sdk, "session-1", tools=[TOOL])
        assert first.content[0].text == REPLY and first.stop_reason == "end_turn"
        assert first.usage.cache_read_input_tokens == 16
        assert first.usage.input_tokens + 16 == sdk.messages.count_tokens(
            model="smol", messages=[{"role": "user", "content": "Say hello."}], tools=[TOOL]).input_tokens
        for _ in range(3):
            _ask(sdk, "session-1", tools=[TOOL])
        _ask(sdk, "session-1")  # no tools: a side call (a title), under its own key
    client.shutdown()
    turns = [(f.name, h["x-session-id"]) for f in fakes for _, h in f.requests]
    main = {name for name, key in turns if key == "session-1"}
    assert len(main) == 1 and len(turns) == 5, "one session's turns must all reach one replica"
    assert [key for _, key in turns].count("session-1/side") == 1
    body, headers = next(f for f in fakes if f.name in main).requests[0]
    assert "structured_outputs" in body  # the tool-call grammar goes upstream
    assert body["return_token_ids"] is True and isinstance(body["prompt"][0], int)
    assert body["model"] == "fake-model" and body["stream"] is True


def test_sessions_spread_and_fail_over_when_a_replica_dies(source, replicas) -> None:  # noqa: ANN001
    fakes, urls = replicas
    client, server = _pensieve(source, urls)
    with server as base:
        sdk = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        for i in range(8):
            _ask(sdk, f"s{i}")
        assert all(f.requests for f in fakes), "eight sessions should land on both replicas"
        fakes[0].status = 503  # replica a refuses from now on
        fakes[0].healthy = False
        before = len(fakes[1].requests)
        for i in range(8):
            assert _ask(sdk, f"s{i}").content[0].text == REPLY
        assert len(fakes[1].requests) == before + 8
    client.shutdown()


def test_stop_sequence_and_cancel_close_the_upstream_stream(source, replicas) -> None:  # noqa: ANN001
    fakes, urls = replicas
    for fake in fakes:
        fake.pace_s = 0.05
    client, server = _pensieve(source, urls[:1])
    with server as base:
        sdk = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        reply = _ask(sdk, stop_sequences=["there"])
        assert reply.stop_reason == "stop_sequence" and reply.content[0].text == "Hello "
        with sdk.messages.stream(model="smol", max_tokens=50,
                                 messages=[{"role": "user", "content": "Say hello."}]) as stream:
            next(iter(stream.text_stream))
        deadline = time.monotonic() + 10
        while fakes[0].disconnects < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    client.shutdown()
    assert fakes[0].disconnects == 2  # both streams were closed before their end
    assert "stop" not in fakes[0].requests[0][0]  # stop strings are checked by Pensieve


def test_upstream_refusal_is_a_400_and_no_replica_is_a_529(source, replicas) -> None:  # noqa: ANN001
    fakes, urls = replicas
    fakes[0].status = 400
    client, server = _pensieve(source, urls[:1])
    with server as base:
        sdk = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        with pytest.raises(anthropic.BadRequestError, match="a refuses"):
            _ask(sdk)
        fakes[0].status, fakes[0].healthy = 503, False
        with pytest.raises(anthropic.APIStatusError) as err:
            _ask(sdk)
        assert err.value.status_code == 529
        assert err.value.body["error"]["type"] == "overloaded_error"
    client.shutdown()
