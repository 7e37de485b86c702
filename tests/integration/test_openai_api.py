"""The OpenAI API (``/v1/chat/completions``, ``/v1/completions``) on the real server with the
default SmolLM2 model, driven by the official ``openai`` SDK; and the conversion that makes
both APIs render the same prompt tokens."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

openai = pytest.importorskip("openai")

from pensieve.api.openai_request import to_message_params  # noqa: E402
from pensieve.protocol import MessageCreateParams  # noqa: E402
from pensieve.protocol.openai import ChatCompletionCreateParams  # noqa: E402
from tests.helpers.real_server import pensieve_server  # noqa: E402

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one word."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                         "unit": {"type": "string", "enum": ["C", "F"]}},
                       "required": ["city", "unit"]},
    },
}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def base_url():
    with pensieve_server() as url:
        yield url


MODEL = "claude-sonnet-5"  # any claude-* name reaches the served model, as from Claude Code


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="local", max_retries=0)


def test_chat_answers_paris(client):
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": QUESTION}])
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens


def test_stream_matches_non_stream_and_reports_usage(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12, messages=messages)
    chunks = list(client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12,
                                                 messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the same prompt again: the prefix cache serves it
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_forced_tool_call_has_schema_valid_arguments(client):
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        reply = client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=200, tools=[WEATHER], tool_choice=choice,
            messages=[{"role": "user", "content": "What's the weather in Paris?"}])
        msg = reply.choices[0]
        assert msg.finish_reason == "tool_calls", msg
        call = msg.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_streamed_tool_call_and_tool_result_turn(client):
    stream = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=200, tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for d in chunk.choices[0].delta.tool_calls or ():
            entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather" and calls[0]["id"]
    args = json.loads(calls[0]["arguments"])
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    follow = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0]["id"], "type": "function",
             "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "12 degrees, rain"},
    ])
    assert follow.choices[0].message.content or follow.choices[0].message.tool_calls


def test_json_schema_response_format(client):
    reply = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    obj = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=40, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give me a JSON object about Paris."}])
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_completions_prompt_string_and_token_ids(client):
    done = client.completions.create(model=MODEL, prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.choices[0].text.strip()
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == done.choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=4,
                                       temperature=0)
    assert by_ids.usage.prompt_tokens == 5 and by_ids.choices[0].text


def test_openai_shaped_errors(client, base_url):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, n=2, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["param"] == "n" and "n=2" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    raw = httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL})
    assert raw.status_code == 400
    body = raw.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and "messages" in body["error"]["message"]
    # the Anthropic routes keep their own envelope
    assert httpx.post(f"{base_url}/v1/messages", json={"model": MODEL}).json()["type"] == "error"


def test_openai_and_anthropic_render_the_same_prompt():
    from pensieve.chat import PromptRenderer
    from pensieve.loaders.default_model import default_model_path
    from pensieve.loaders.registry import load_checkpoint

    ckpt = load_checkpoint(default_model_path(), tensors=False)
    renderer = PromptRenderer(ckpt.tokenizer, ckpt.chat_template)
    args = '{"city": "Oslo", "unit": "C"}'
    oai = ChatCompletionCreateParams.model_validate({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees"},
        {"role": "user", "content": "And in Paris?"},
    ]})
    anth = MessageCreateParams.model_validate({"model": "m", "max_tokens": 10, "system": [
        {"type": "text", "text": "Be brief."}], "tools": [
        {"name": "get_weather", "description": "Current weather of a city",
         "input_schema": WEATHER["function"]["parameters"]}], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "call_1", "name": "get_weather",
                                           "input": {"city": "Oslo", "unit": "C"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "12 degrees"},
                                     {"type": "text", "text": "And in Paris?"}]},
    ]})
    mine = renderer.render(to_message_params(oai))
    theirs = renderer.render(anth)
    assert mine.token_ids == theirs.token_ids and "12 degrees" in mine.text and "Oslo" in mine.text


def test_client_leaving_a_stream_stops_its_generation(base_url):
    import time

    body = {"model": MODEL, "stream": True, "max_tokens": 3000, "temperature": 0.9,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as res:
        assert res.status_code == 200
        lines = res.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        running = httpx.get(f"{base_url}/v1/status").json()["running"]
        assert [r["route"] for r in running] == ["chat.completions"]
    deadline = time.monotonic() + 30
    while httpx.get(f"{base_url}/v1/status").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{base_url}/v1/status").json()["running"] == []
    engine = next(iter(httpx.get(f"{base_url}/v1/status").json()["engines"].values()))
    assert engine["running"] == 0 and engine["kv_blocks_free"] == engine["kv_blocks_total"]


def test_stop_and_seed(client):
    ask = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    full = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, messages=ask)
    text = full.choices[0].message.content
    assert "5" in text, text
    cut = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, messages=ask, stop=["5"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.index("5")]
    sampled = [client.chat.completions.create(model=MODEL, temperature=1.3, top_p=0.95, seed=1234, max_tokens=24,
                                              messages=[{"role": "user", "content": "Tell me a story."}])
               for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content
    assert sampled[0].choices[0].message.content
