"""Server-sent stream events, named as the SDK names them.

A message streams as ``message_start``, then per content block ``content_block_start``,
``content_block_delta``*, ``content_block_stop``, then ``message_delta`` (stop reason and
cumulative usage) and ``message_stop``. ``ping`` may appear anywhere; ``error`` ends a stream
that failed after its 200 was sent.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from pensieve.protocol.base import ResponseModel
from pensieve.protocol.context_management import BetaContextManagementResponse
from pensieve.protocol.errors import ErrorObject
from pensieve.protocol.responses import (
    ContentBlock,
    Message,
    MessageDeltaUsage,
    RefusalStopDetails,
    StopReason,
)


class TextDelta(ResponseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJSONDelta(ResponseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ThinkingDelta(ResponseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class SignatureDelta(ResponseModel):
    type: Literal["signature_delta"] = "signature_delta"
    signature: str


RawContentBlockDelta = Annotated[
    Union[TextDelta, InputJSONDelta, ThinkingDelta, SignatureDelta],
    Field(discriminator="type"),
]


class RawMessageStartEvent(ResponseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class RawContentBlockStartEvent(ResponseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class RawContentBlockDeltaEvent(ResponseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: RawContentBlockDelta


class RawContentBlockStopEvent(ResponseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(ResponseModel):
    """The ``delta`` of a ``message_delta`` event (the SDK calls this class ``Delta``)."""

    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    stop_details: RefusalStopDetails | None = None


class RawMessageDeltaEvent(ResponseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: MessageDeltaUsage
    context_management: BetaContextManagementResponse | None = Field(default=None, exclude_if=lambda v: v is None)


class RawMessageStopEvent(ResponseModel):
    type: Literal["message_stop"] = "message_stop"


class PingEvent(ResponseModel):
    type: Literal["ping"] = "ping"


class ErrorEvent(ResponseModel):
    type: Literal["error"] = "error"
    error: ErrorObject


RawMessageStreamEvent = Annotated[
    Union[
        RawMessageStartEvent,
        RawContentBlockStartEvent,
        RawContentBlockDeltaEvent,
        RawContentBlockStopEvent,
        RawMessageDeltaEvent,
        RawMessageStopEvent,
    ],
    Field(discriminator="type"),
]

# Everything that can go down an SSE stream.
StreamEvent = Union[
    RawMessageStartEvent,
    RawContentBlockStartEvent,
    RawContentBlockDeltaEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStopEvent,
    PingEvent,
    ErrorEvent,
]
