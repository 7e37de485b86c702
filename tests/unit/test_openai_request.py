"""OpenAI chat requests → the Anthropic request the chat layer renders
(``api/openai_request.py``), and Anthropic events/messages → OpenAI chunks and completions
(``api/openai_stream.py``)."""

from __future__ import annotations

import json

import pytest

from pensieve.api.errors import ApiError, openai_error_body
from pensieve.api.openai_request import openai_sampling, to_message_params
from pensieve.api.openai_stream import ChunkWriter, chat_completion
from pensieve.engine.types import SamplingParams
from pensieve.protocol import (
    InputJSONDelta,
    Message,
    MessageDelta,
    MessageDeltaUsage,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    TextBlock,
    ToolUseBlock,
    Usage,
)
from pensieve.protocol.openai import ChatCompletionCreateParams

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def convert(**body):
    return to_message_params(ChatCompletionCreateParams.model_validate({"model": "m", **body}))


def test_roles_become_the_anthropic_conversation():
    req = convert(messages=[
        {"role": "developer", "content": "rules"},
        {"role": "system", "content": [{"type": "text", "text": "more"}]},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
        {"role": "user", "content": "next"},
        {"role": "system", "content": "late"},
    ], tools=[TOOL], max_completion_tokens=7, stop="END", parallel_tool_calls=False)
    assert [b.text for b in req.system] == ["rules", "more"]
    roles = [m.role for m in req.messages]
    assert roles == ["user", "assistant", "user", "system"]  # the late system message stays in place
    calls = req.messages[1].content
    assert [(c.id, c.input) for c in calls] == [("c1", {"a": 1}), ("c2", {})]
    results = req.messages[2].content
    assert [b.type for b in results] == ["tool_result", "tool_result", "text"]
    assert results[1].tool_use_id == "c2" and results[2].text == "next"
    assert req.max_tokens == 7 and req.stop_sequences == ["END"]
    assert req.tools[0].name == "f" and req.tool_choice.type == "auto"
    assert req.tool_choice.disable_parallel_tool_use is True


def test_tool_choice_and_response_format():
    assert convert(messages=[{"role": "user", "content": "x"}], tools=[TOOL], tool_choice="required").tool_choice.type == "any"
    named = convert(messages=[{"role": "user", "content": "x"}], tools=[TOOL],
                    tool_choice={"type": "function", "function": {"name": "f"}}).tool_choice
    assert named.type == "tool" and named.name == "f"
    fmt = convert(messages=[{"role": "user", "content": "x"}], response_format={
        "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "required": ["a"]}}})
    assert fmt.output_config.format.schema_ == {"type": "object", "required": ["a"]}


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
    ({"messages": [{"role": "system", "content": "only"}]}, "messages"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as info:
        convert(**{"messages": [{"role": "user", "content": "x"}], **body})
    assert info.value.status == 400 and info.value.param == param
    envelope = openai_error_body(info.value)["error"]
    assert envelope["type"] == "invalid_request_error" and envelope["param"] == param and envelope["message"]


def test_sampling_beyond_the_anthropic_ranges():
    body = ChatCompletionCreateParams.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                      "temperature": 1.7, "seed": 9})
    params = openai_sampling(SamplingParams(temperature=0.2, top_p=0.9, top_k=40), body)
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.7, 0.9, 40, 9)


def test_events_become_chunks_with_tool_call_indexes_and_usage():
    writer = ChunkWriter("chatcmpl-1", "m", include_usage=True)
    start = RawMessageStartEvent(message=Message(id="msg", content=[], model="m",
                                                 usage=Usage(input_tokens=5, output_tokens=0)))
    events = [
        start,
        RawContentBlockStartEvent(index=0, content_block=TextBlock(text="")),
        RawContentBlockStartEvent(index=1, content_block=ToolUseBlock(id="toolu_1", name="f", input={})),
        RawContentBlockDeltaEvent(index=1, delta=InputJSONDelta(partial_json='{"a"')),
        RawContentBlockDeltaEvent(index=1, delta=InputJSONDelta(partial_json=": 1}")),
        RawMessageDeltaEvent(delta=MessageDelta(stop_reason="tool_use"), usage=MessageDeltaUsage(
            output_tokens=4, input_tokens=2, cache_read_input_tokens=3, cache_creation_input_tokens=0)),
    ]
    chunks = [c for e in events for c in writer.on_event(e)]
    assert chunks[0].choices[0].delta.role == "assistant"
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0].id == "toolu_1" and calls[0].function.name == "f" and calls[0].index == 0
    assert "".join(c.function.arguments for c in calls) == '{"a": 1}'
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (5, 4)
    assert usage.prompt_tokens_details.cached_tokens == 3
    wire = json.loads(chunks[2].model_dump_json(exclude_none=True))
    assert wire["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}


def test_message_becomes_a_chat_completion():
    message = Message(id="msg", model="m", stop_reason="max_tokens",
                      content=[TextBlock(text="hi "), ToolUseBlock(id="toolu_2", name="f", input={"b": [1]})],
                      usage=Usage(input_tokens=1, output_tokens=3, cache_read_input_tokens=8))
    done = chat_completion(message, "chatcmpl-2", "m")
    choice = done.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == "hi "
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"b": [1]}
    assert (done.usage.prompt_tokens, done.usage.prompt_tokens_details.cached_tokens) == (9, 8)
