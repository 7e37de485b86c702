"""What ``POST /v1/messages`` returns: ``Message`` and its content blocks, ``Usage``."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field

from pensieve.protocol.base import ResponseModel
from pensieve.protocol.context_management import (
    BetaContextManagementResponse,
    BetaCountTokensContextManagementResponse,
)

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


class CacheCreation(ResponseModel):
    """``cache_creation_input_tokens`` split by the lifetime the request asked for."""

    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class OutputTokensDetails(ResponseModel):
    """Of ``output_tokens``, those generated while thinking (markers included)."""

    thinking_tokens: int


class ServerToolUsage(ResponseModel):
    web_fetch_requests: int = 0
    web_search_requests: int = 0


class Usage(ResponseModel):
    """Token counts. As in the API, ``input_tokens`` excludes tokens read from the cache.
    ``server_tool_use`` is always null: no server tools run here."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = 0
    cache_read_input_tokens: int | None = 0
    cache_creation: CacheCreation | None = None
    output_tokens_details: OutputTokensDetails | None = None
    server_tool_use: ServerToolUsage | None = None


class MessageDeltaUsage(ResponseModel):
    """Cumulative counts sent with ``message_delta``; they overwrite those of message_start."""

    output_tokens: int
    input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation: CacheCreation | None = None  # not in the SDK's delta type: raw clients see it
    output_tokens_details: OutputTokensDetails | None = None
    server_tool_use: ServerToolUsage | None = None


class RefusalStopDetails(ResponseModel):
    """Why a ``refusal`` stopped the answer. Never produced: no classifier runs here."""

    type: Literal["refusal"] = "refusal"
    category: str | None = None
    explanation: str | None = None


class Message(ResponseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ContentBlock]
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    stop_details: RefusalStopDetails | None = None
    usage: Usage
    # only where the request asked for context management (absent otherwise, as in the API)
    context_management: BetaContextManagementResponse | None = Field(default=None, exclude_if=lambda v: v is None)


class MessageTokensCount(ResponseModel):
    """Body returned by ``POST /v1/messages/count_tokens``."""

    input_tokens: int
    context_management: BetaCountTokensContextManagementResponse | None = Field(
        default=None, exclude_if=lambda v: v is None)
