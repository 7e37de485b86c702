"""POST /v1/messages over a real uvicorn server, driven by the official anthropic SDK
(sync and async) and by raw HTTP where the wire itself is checked."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest

from pensieve.engine.errors import EngineOverloadedError, PromptTooLongError
from pensieve.engine.types import FinishReason, GenerationDelta
from tests.helpers.api_fakes import (
    CharTokenizer,
    ScriptedEngine,
    fake_server,
    text_script,
)

MODEL = "claude-sonnet-5"
HI = [{"role": "user", "content": "hi"}]


def client(base_url: str, **kw: object) -> anthropic.Anthropic:
    # An explicit timeout lets non-streaming calls ask for max_tokens=32000 as Claude Code does.
    return anthropic.Anthropic(base_url=base_url, api_key="test-key", max_retries=0, timeout=30, **kw)


def raw_sse(base_url: str, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """(event name, data) pairs of a streamed response, read off the wire."""
    events: list[tuple[str, dict]] = []
    with httpx.stream("POST", f"{base_url}/v1/messages", json={**body, "stream": True},
                      headers=headers or {}, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                assert name is not None
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                events.append((name, data))
                name = None
    return events


def test_create_returns_the_generated_message() -> None:
    engine = ScriptedEngine(text_script("Hel", "lo"))
    with fake_server(engine) as url:
        sdk = client(url)
        message = sdk.messages.create(model=MODEL, max_tokens=50, messages=HI)
        count = sdk.messages.count_tokens(model=MODEL, messages=HI)
    assert message.content[0].type == "text" and message.content[0].text == "Hello"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.model == MODEL and message.id.startswith("msg_")
    assert message.usage.input_tokens == count.input_tokens == len(engine.calls[0].prompt_ids)
    assert message.usage.output_tokens == 3


def test_stop_sequence_is_reported_with_its_string() -> None:
    engine = ScriptedEngine(text_script("a", "b", finish=FinishReason.STOP_SEQUENCE, stop_sequence="###"))
    with fake_server(engine) as url:
        sdk = client(url)
        message = sdk.messages.create(model=MODEL, max_tokens=50, messages=HI, stop_sequences=["###"])
        with sdk.messages.stream(model=MODEL, max_tokens=50, messages=HI, stop_sequences=["###"]) as stream:
            streamed = stream.get_final_message()
    for m in (message, streamed):
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == "###"
    assert engine.calls[0].params.stop_sequences == ("###",)


def test_sdk_stream_accumulates_a_valid_message() -> None:
    engine = ScriptedEngine(text_script("Hello", ", ", "world", finish=FinishReason.MAX_TOKENS))
    with fake_server(engine) as url:
        with client(url).messages.stream(model=MODEL, max_tokens=3, messages=HI) as stream:
            texts = list(stream.text_stream)
            message = stream.get_final_message()
    assert texts == ["Hello", ", ", "world"]
    assert message.content[0].text == "Hello, world"  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 4


async def test_async_client_create_and_stream() -> None:
    engine = ScriptedEngine(text_script("async", " ok"))
    with fake_server(engine) as url:
        sdk = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        message = await sdk.messages.create(model=MODEL, max_tokens=20, messages=HI)
        async with sdk.messages.stream(model=MODEL, max_tokens=20, messages=HI) as stream:
            final = await stream.get_final_message()
        raw = await sdk.messages.create(model=MODEL, max_tokens=20, messages=HI, stream=True)
        types = [event.type async for event in raw]
    assert message.content[0].text == final.content[0].text == "async ok"  # type: ignore[union-attr]
    assert types[0] == "message_start" and types[-1] == "message_stop"


def test_sse_events_come_in_the_api_order() -> None:
    engine = ScriptedEngine(text_script("a", "b", "c"))
    with fake_server(engine) as url:
        events = raw_sse(url, {"model": MODEL, "max_tokens": 20, "messages": HI})
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "a"}
    assert events[6][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None, "stop_details": None}
    assert events[6][1]["usage"]["output_tokens"] == 4


def test_empty_answer_streams_a_valid_message() -> None:
    engine = ScriptedEngine(text_script())
    with fake_server(engine) as url:
        events = raw_sse(url, {"model": MODEL, "max_tokens": 20, "messages": HI})
        with client(url).messages.stream(model=MODEL, max_tokens=20, messages=HI) as stream:
            message = stream.get_final_message()
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert message.content == [] and message.stop_reason == "end_turn"


def test_pings_are_sent_while_the_engine_is_silent() -> None:
    engine = ScriptedEngine(text_script("slow", " answer", delay_s=0.35))
    with fake_server(engine, ping_interval_s=0.1) as url:
        events = raw_sse(url, {"model": MODEL, "max_tokens": 20, "messages": HI})
        with client(url).messages.stream(model=MODEL, max_tokens=20, messages=HI) as stream:
            message = stream.get_final_message()
    names = [n for n, _ in events]
    first_block = names.index("content_block_start")
    assert names[0] == "message_start" and "ping" in names[1:first_block]  # during the "prefill"
    assert "ping" in names[first_block:]  # and between tokens
    assert [n for n in names if n != "ping"][-2:] == ["message_delta", "message_stop"]
    assert message.content[0].text == "slow answer"  # type: ignore[union-attr]


def test_engine_error_mid_stream_sends_an_error_event_and_the_server_goes_on() -> None:
    def script(prompt_ids: list[int], params: object, rid: str) -> list[GenerationDelta]:
        return [GenerationDelta(rid, text="par", num_output_tokens=1),
                GenerationDelta(rid, finish_reason=FinishReason.ERROR, error="out of KV blocks")]

    engine = ScriptedEngine(script)
    with fake_server(engine) as url:
        events = raw_sse(url, {"model": MODEL, "max_tokens": 20, "messages": HI})
        with pytest.raises(anthropic.APIStatusError, match="out of KV blocks"):
            with client(url).messages.stream(model=MODEL, max_tokens=20, messages=HI) as stream:
                stream.get_final_message()
        with pytest.raises(anthropic.InternalServerError, match="out of KV blocks"):
            client(url).messages.create(model=MODEL, max_tokens=20, messages=HI)
        engine.script = text_script("fine")
        assert client(url).messages.create(model=MODEL, max_tokens=20, messages=HI).content[0].text == "fine"  # type: ignore[union-attr]
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "out of KV blocks"}})


def test_engine_exception_mid_stream_is_an_error_event_without_internals() -> None:
    def script(prompt_ids: list[int], params: object, rid: str) -> list[object]:
        return [GenerationDelta(rid, text="x", num_output_tokens=1), RuntimeError("secret internals")]

    with fake_server(ScriptedEngine(script)) as url:  # type: ignore[arg-type]
        events = raw_sse(url, {"model": MODEL, "max_tokens": 20, "messages": HI})
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "api_error"
    assert "secret" not in json.dumps(data)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_too_long_is_the_message_claude_code_compacts_on(stream: bool) -> None:
    engine = ScriptedEngine(text_script("never"))
    long_text = "x" * 300
    with fake_server(engine, context_length=200) as url:
        with pytest.raises(anthropic.BadRequestError) as info:
            client(url).messages.create(model=MODEL, max_tokens=10, stream=stream,
                                        messages=[{"role": "user", "content": long_text}])
        count = client(url).messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": long_text}])
    assert info.value.body["error"]["message"] == f"prompt is too long: {count.input_tokens} tokens > 200 maximum"  # type: ignore[index]
    assert engine.calls == []


@pytest.mark.parametrize("stream", [False, True])
def test_errors_the_engine_raises_at_start_keep_their_status(stream: bool) -> None:
    with fake_server(ScriptedEngine(text_script(), start_error=EngineOverloadedError("queue full"))) as url:
        with pytest.raises(anthropic.OverloadedError, match="queue full"):
            client(url).messages.create(model=MODEL, max_tokens=10, messages=HI, stream=stream)
    with fake_server(ScriptedEngine(text_script(), start_error=PromptTooLongError(90, 64))) as url:
        with pytest.raises(anthropic.BadRequestError, match="prompt is too long: 90 tokens > 64 maximum"):
            client(url).messages.create(model=MODEL, max_tokens=10, messages=HI, stream=stream)


def test_max_tokens_beyond_the_context_is_clamped() -> None:
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine, context_length=300) as url:
        client(url).messages.create(model=MODEL, max_tokens=32000, messages=HI)
    call = engine.calls[0]
    assert call.params.max_tokens == 300 - len(call.prompt_ids)


def test_sampling_parameters_pass_through_the_body() -> None:
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine) as url:
        client(url).messages.create(model=MODEL, max_tokens=7, messages=HI, stop_sequences=["END", ""],
                                    extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 5})
        client(url).messages.create(model=MODEL, max_tokens=7, messages=HI)
    custom, default = engine.calls[0].params, engine.calls[1].params
    assert (custom.temperature, custom.top_p, custom.top_k, custom.max_tokens) == (0.2, 0.9, 5, 7)
    assert custom.stop_sequences == ("END",)
    assert (default.temperature, default.top_p, default.top_k, default.stop_sequences) == (1.0, 1.0, 0, ())


def test_server_default_temperature_applies_only_when_none_is_sent() -> None:
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine, default_temperature=0.0) as url:
        client(url).messages.create(model=MODEL, max_tokens=7, messages=HI)
        client(url).messages.create(model=MODEL, max_tokens=7, messages=HI, extra_body={"temperature": 0.7})
    assert [c.params.temperature for c in engine.calls] == [0.0, 0.7]


@pytest.mark.parametrize(("extra", "field"), [({"temperature": 1.5}, "temperature"), ({"top_p": 2}, "top_p"),
                                              ({"top_k": -1}, "top_k"), ({"max_tokens": -5}, "max_tokens")])
def test_out_of_range_parameters_are_400_naming_the_field(extra: dict, field: str) -> None:
    with fake_server(ScriptedEngine(text_script())) as url:
        with pytest.raises(anthropic.BadRequestError) as info:
            client(url).messages.create(model=MODEL, max_tokens=7, messages=HI, extra_body=extra)
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert info.value.body["error"]["message"].startswith(f"{field}: ")  # type: ignore[index]


def test_what_claude_code_sends_is_accepted() -> None:
    engine = ScriptedEngine(text_script("done"))
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>r</system-reminder>"},
                                     {"type": "text", "text": "go", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "t", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py"},
                                     {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}},
                                     {"type": "a_block_from_2027", "x": 1}]},
        {"role": "system", "content": "mid-conversation system text"},
    ]
    with fake_server(engine) as url:
        message = client(url).beta.messages.create(
            model="claude-opus-4-8", max_tokens=32000, messages=messages,  # type: ignore[arg-type]
            system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3.abc;"},
                    {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            tools=[{"name": "Bash", "description": "run", "input_schema": {"type": "object", "properties": {}}}],
            metadata={"user_id": "u"}, thinking={"type": "adaptive"},
            betas=["claude-code-20250219", "interleaved-thinking-2025-05-14", "context-management-2025-06-27"],
            extra_body={"context_management": {"edits": []}, "output_config": {"effort": "max"},
                        "cache_control": {"type": "ephemeral"}, "brand_new_field": {"a": 1}},
            extra_headers={"anthropic-beta": "mid-conversation-system,effort-2025-11-24"},
        )
    assert message.content[0].text == "done"  # type: ignore[union-attr]
    prompt = CharTokenizer().decode(engine.calls[0].prompt_ids)
    assert "mid-conversation system text" in prompt and "billing-header" not in prompt
    assert "You are Claude Code." in prompt and "a.py" in prompt


def test_trailing_assistant_message_is_continued() -> None:
    engine = ScriptedEngine(text_script("B)"))
    with fake_server(engine) as url:
        message = client(url).messages.create(model=MODEL, max_tokens=5, messages=[
            {"role": "user", "content": "A or B?"}, {"role": "assistant", "content": "The answer is ("}])
    assert CharTokenizer().decode(engine.calls[0].prompt_ids).endswith("<|im_start|>assistant\nThe answer is (")
    assert message.content[0].text == "B)"  # type: ignore[union-attr]


def test_max_tokens_zero_generates_nothing() -> None:
    engine = ScriptedEngine(text_script("never"))
    with fake_server(engine) as url:
        message = client(url).messages.create(model=MODEL, max_tokens=0, messages=HI)
    assert message.content == [] and message.stop_reason == "max_tokens" and message.usage.output_tokens == 0
    assert engine.calls == []


def slow_script(prompt_ids: list[int], params: object, rid: str) -> list[object]:
    steps: list[object] = []
    for n in range(1, 200):
        steps += [GenerationDelta(rid, text=f"{n} ", num_output_tokens=n), 0.05]
    return steps


def test_client_disconnect_while_streaming_aborts_generation() -> None:
    engine = ScriptedEngine(slow_script)  # type: ignore[arg-type]
    with fake_server(engine, ping_interval_s=0.02) as url:
        with httpx.stream("POST", f"{url}/v1/messages", timeout=10,
                          json={"model": MODEL, "max_tokens": 500, "messages": HI, "stream": True}) as response:
            lines = response.iter_lines()
            while "content_block_delta" not in next(lines):
                pass
        assert engine.calls[0].aborted.wait(timeout=5), "generation went on after the client left"
        assert client(url).models.list().data[0].id == "tiny-model"  # still serving


def test_client_disconnect_while_waiting_for_a_whole_message_aborts_generation() -> None:
    engine = ScriptedEngine(slow_script)  # type: ignore[arg-type]
    with fake_server(engine) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/messages", timeout=0.5,
                       json={"model": MODEL, "max_tokens": 500, "messages": HI})
        started = time.monotonic()
        assert engine.calls[0].aborted.wait(timeout=5), "generation went on after the client left"
        assert time.monotonic() - started < 5
