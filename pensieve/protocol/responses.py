"""What ``POST /v1/messages`` returns: ``Message`` and its content blocks, ``Usage``."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field

from pensieve.protocol.base import ResponseModel

StopReason = Literal[
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "tool_use",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
]


class TextBlock(ResponseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlock(ResponseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str


class RedactedThinkingBlock(ResponseModel):
    type: Literal["redacted_thinking"] = "redacted_thinking"
    data: str


class ToolUseBlock(ResponseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = Annotated[
    Union[TextBlock, ThinkingBlock, RedactedThinkingBlock, ToolUseBlock],
    Field(discriminator="type"),
]


class Usage(ResponseModel):
    """Token counts. As in the API, ``input_tokens`` excludes tokens read from the cache."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = 0
    cache_read_input_tokens: int | None = 0


class MessageDeltaUsage(ResponseModel):
    """Cumulative counts sent with ``message_delta``; they overwrite those of message_start."""

    output_tokens: int
    input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class Message(ResponseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ContentBlock]
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


class MessageTokensCount(ResponseModel):
    """Body returned by ``POST /v1/messages/count_tokens``."""

    input_tokens: int
