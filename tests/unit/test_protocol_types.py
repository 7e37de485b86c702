"""Protocol types: permissive requests, strict responses that the official SDK parses."""

from __future__ import annotations

from datetime import datetime, timezone

import anthropic.types as sdk
import pytest
from pydantic import TypeAdapter, ValidationError

from pensieve.protocol import (
    ErrorEvent,
    ErrorObject,
    ErrorResponse,
    ImageBlockParam,
    Message,
    MessageCountTokensParams,
    MessageCreateParams,
    MessageDelta,
    MessageDeltaUsage,
    ModelInfo,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RedactedThinkingBlockParam,
    SystemMessageParam,
    TextBlock,
    TextBlockParam,
    TextDelta,
    ThinkingBlockParam,
    ThinkingConfigAdaptiveParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
    UnknownBlockParam,
    UnknownToolParam,
    UnknownTypedParam,
    Usage,
)


def body(**overrides: object) -> dict:
    base: dict = {"model": "claude-sonnet-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    base.update(overrides)
    return base


CLAUDE_CODE_BODY = body(
    system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3.a1f;"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ],
    messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>x</system-reminder>"},
            {"type": "text", "text": "list files", "cache_control": {"type": "ephemeral"}},
        ]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a.py"}]},
        ]},
        {"role": "system", "content": "mid-conversation reminder"},
    ],
    tools=[
        {"name": "Bash", "description": "run", "input_schema": {"type": "object", "properties": {}}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
    ],
    metadata={"user_id": "u"},
    max_tokens=32000,
    thinking={"type": "adaptive"},
    context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    output_config={"effort": "xhigh", "format": {"type": "json_schema", "schema": {}}},
    cache_control={"type": "ephemeral"},
    service_tier="auto",
    container="c_1",
    mcp_servers=[{"type": "url", "url": "http://x"}],
    stream=True,
)


def test_claude_code_body_parses_into_typed_blocks() -> None:
    req = MessageCreateParams.model_validate(CLAUDE_CODE_BODY)
    assert isinstance(req.system, list) and isinstance(req.system[1], TextBlockParam)
    user, assistant, result, system = req.messages
    assert isinstance(assistant.content[0], ThinkingBlockParam)
    assert isinstance(assistant.content[1], RedactedThinkingBlockParam)
    assert isinstance(assistant.content[2], ToolUseBlockParam)
    assert assistant.content[2].input == {"command": "ls"}
    assert isinstance(result.content[0], ToolResultBlockParam)
    assert isinstance(system, SystemMessageParam)
    assert isinstance(req.tools[0], ToolParam) and isinstance(req.tools[1], UnknownToolParam)
    assert isinstance(req.thinking, ThinkingConfigAdaptiveParam)
    assert req.output_config is not None and req.output_config.effort == "xhigh"
    assert req.model_extra is not None and "context_management" in req.model_extra
    assert req.max_tokens == 32000 and req.stream is True


def test_unknown_block_types_fall_back_instead_of_failing() -> None:
    req = MessageCreateParams.model_validate(body(messages=[{"role": "user", "content": [
        {"type": "search_result", "source": "s", "title": "t", "content": []},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
        {"type": "container_upload", "file_id": "f"},
        {"type": "brand_new_block_2027", "whatever": 1},
    ]}]))
    blocks = req.messages[0].content
    assert isinstance(blocks[1], ImageBlockParam)
    assert [b.type for b in (blocks[0], blocks[2])] == ["search_result", "container_upload"]  # modelled since 2026
    assert type(blocks[3]) is UnknownBlockParam
    assert blocks[3].model_extra == {"whatever": 1}


def test_unknown_variants_of_thinking_and_tool_choice_are_kept() -> None:
    req = MessageCreateParams.model_validate(body(thinking={"type": "turbo"}, tool_choice={"type": "some"}))
    assert isinstance(req.thinking, UnknownTypedParam) and isinstance(req.tool_choice, UnknownTypedParam)


def test_count_tokens_body_needs_no_max_tokens() -> None:
    req = MessageCountTokensParams.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                   "tools": [{"name": "t", "input_schema": {}}]})
    assert len(req.tools or []) == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
    ],
)
def test_invalid_values_are_rejected(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        MessageCreateParams.model_validate(body(**overrides))
    assert info.value.errors()[0]["loc"][0] == field


def test_max_tokens_is_required() -> None:
    data = body()
    del data["max_tokens"]
    with pytest.raises(ValidationError):
        MessageCreateParams.model_validate(data)


def test_message_json_is_what_the_sdk_expects() -> None:
    message = Message(
        id="msg_1", model="m", stop_reason="stop_sequence", stop_sequence="END",
        content=[TextBlock(text="hi"), ToolUseBlock(id="toolu_1", name="Bash", input={"a": 1})],
        usage=Usage(input_tokens=3, output_tokens=2),
    )
    data = message.model_dump(mode="json")
    parsed = sdk.Message.model_validate(data)
    assert parsed.content[0].type == "text" and parsed.stop_sequence == "END"
    assert data["type"] == "message" and data["role"] == "assistant"


def test_responses_are_strict() -> None:
    with pytest.raises(ValidationError):
        Usage(input_tokens=1, output_tokens=1, surprise=3)  # type: ignore[call-arg]


def test_stream_events_validate_as_sdk_events() -> None:
    start = RawMessageStartEvent(message=Message(id="m", model="x", content=[], usage=Usage(input_tokens=1, output_tokens=0)))
    events = [
        start,
        RawContentBlockStartEvent(index=0, content_block=TextBlock(text="")),
        RawContentBlockDeltaEvent(index=0, delta=TextDelta(text="hi")),
        RawContentBlockStopEvent(index=0),
        RawMessageDeltaEvent(delta=MessageDelta(stop_reason="end_turn"), usage=MessageDeltaUsage(output_tokens=2)),
        RawMessageStopEvent(),
    ]
    adapter = TypeAdapter(sdk.RawMessageStreamEvent)
    for event in events:
        parsed = adapter.validate_python(event.model_dump(mode="json"))
        assert parsed.type == event.type
    assert start.model_dump(mode="json")["message"]["stop_reason"] is None


def test_error_envelope_and_model_info_shapes() -> None:
    envelope = ErrorResponse(error=ErrorObject(type="not_found_error", message="nope"), request_id="req_1")
    assert envelope.model_dump(mode="json") == {
        "type": "error", "error": {"type": "not_found_error", "message": "nope"}, "request_id": "req_1"}
    assert ErrorEvent(error=ErrorObject(type="api_error", message="x")).type == "error"
    info = ModelInfo(id="m", display_name="m", created_at=datetime(1970, 1, 1, tzinfo=timezone.utc))
    assert sdk.ModelInfo.model_validate(info.model_dump(mode="json")).lifecycle == "active"
