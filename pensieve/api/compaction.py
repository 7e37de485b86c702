"""Compaction (the compaction beta): the conversation summarised by the served model and
returned as a ``compaction`` block, which later requests send back in place of what it
summarises (``chat/context_edits.drop_before_compaction``).

Two ways in, as in the SDK's types:
- top-level ``compaction: {"type": "summarize", "instructions"?}`` — the request *is* a
  compaction: the response holds the ``compaction`` block alone, ``stop_reason: "compaction"``;
- a ``compact_20260112`` edit in ``context_management.edits`` — once the prompt reaches its
  ``trigger`` (default 150,000 input tokens) the conversation is summarised first; with
  ``pause_after_compaction`` the response ends there (``stop_reason: "compaction"``), otherwise
  the answer follows in the same response, generated from the summary and the last user turn.

Streams carry the block as ``content_block_start`` (content null), one ``compaction_delta``
with the summary, ``content_block_stop``. An empty summary gives ``content: null`` (a failed
compaction, a no-op when sent back). ``usage`` is the answer's; the summary's own tokens are
not added to it (the API reports them apart, in ``usage.iterations``, which is not reported
here).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi.responses import Response, StreamingResponse
from pydantic import Field

from pensieve.api.errors import invalid_request
from pensieve.api.generation import (
    PreparedGeneration,
    new_message_id,
    prepare_generation,
    render_prompt,
    start_deltas,
)
from pensieve.api.responses import json_response
from pensieve.api.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_stream
from pensieve.api.state import Services
from pensieve.chat import collect_message, message_events
from pensieve.chat.context_edits import context_management_of, continuation_request, summarization_request
from pensieve.protocol import MessageCreateParams
from pensieve.protocol.base import ResponseModel
from pensieve.protocol.context_management import (
    DEFAULT_COMPACTION_TRIGGER_TOKENS,
    BetaCompact20260112EditParam,
    BetaContextManagementResponse,
)
from pensieve.protocol.events import (
    RawContentBlockStopEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
)
from pensieve.protocol.responses import ContentBlock, Message, MessageDeltaUsage, Usage


class CompactionBlock(ResponseModel):
    type: Literal["compaction"] = "compaction"
    content: str | None = None


class CompactionContentBlockDelta(ResponseModel):
    type: Literal["compaction_delta"] = "compaction_delta"
    content: str | None = None


class CompactionBlockStartEvent(ResponseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: CompactionBlock


class CompactionBlockDeltaEvent(ResponseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: CompactionContentBlockDelta


class CompactionMessageDelta(ResponseModel):
    stop_reason: Literal["compaction"] = "compaction"
    stop_sequence: None = None


class CompactionMessageDeltaEvent(ResponseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: CompactionMessageDelta = Field(default_factory=CompactionMessageDelta)
    usage: MessageDeltaUsage
    context_management: BetaContextManagementResponse | None = Field(default=None, exclude_if=lambda v: v is None)


class CompactedMessage(Message):
    """A ``Message`` whose content opens with a ``compaction`` block."""

    content: list[CompactionBlock | ContentBlock]  # type: ignore[assignment]
    stop_reason: str | None = None  # type: ignore[assignment]  # "compaction" too


@dataclass(frozen=True)
class CompactionPlan:
    instructions: str | None
    pause: bool  # the response ends after the compaction block


async def compaction_plan(services: Services, body: MessageCreateParams) -> CompactionPlan | None:
    """How ``body`` compacts, or None when it does not (no compaction asked, trigger not reached)."""
    top = (body.model_extra or {}).get("compaction")
    config = context_management_of(body)
    if top is not None:
        if config is not None:
            raise invalid_request("compaction: cannot be combined with context_management")
        if not isinstance(top, dict) or top.get("type") != "summarize":
            raise invalid_request('compaction.type: must be "summarize"')
        instructions = top.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise invalid_request("compaction.instructions: must be a string")
        return CompactionPlan(instructions, pause=True)
    edit = next((e for e in (config.edits if config else ()) if isinstance(e, BetaCompact20260112EditParam)), None)
    if edit is None:
        return None
    trigger = edit.trigger.value if edit.trigger is not None else DEFAULT_COMPACTION_TRIGGER_TOKENS
    prompt = await render_prompt(services, body)
    if prompt.num_tokens < trigger:
        return None
    return CompactionPlan(edit.instructions, pause=edit.pause_after_compaction)


async def compaction_response(services: Services, body: MessageCreateParams, request_id: str,
                              priority: int = 0) -> Response | None:
    """The whole response of a request that compacts; None when ``body`` does not compact.
    ``priority``: the engine's scheduling class for both generations (batches run lower)."""
    plan = await compaction_plan(services, body)
    if plan is None:
        return None
    raw = body.model_dump(mode="json", by_alias=True, exclude_none=True)
    summary_body = MessageCreateParams.model_validate(summarization_request(raw, plan.instructions))
    prepared = _at(await prepare_generation(services, summary_body, f"{request_id}-compaction"), priority)
    summary_message = await collect_message(message_events(await start_deltas(services.engine, prepared),
                                                           prepared.event_builder()))
    text = "".join(getattr(b, "text", "") for b in summary_message.content).strip() or None
    if plan.pause:
        return _paused(body, text, summary_message)
    answer = MessageCreateParams.model_validate(continuation_request(raw, text))
    prepared = _at(await prepare_generation(services, answer, request_id), priority)
    events = message_events(await start_deltas(services.engine, prepared), prepared.event_builder())
    if body.stream:
        stream = sse_stream(_continued_events(events, text), request_id)
        return StreamingResponse(stream, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    message = await collect_message(events)
    fields = message.model_dump(exclude={"content"})
    return json_response(CompactedMessage(**fields, content=[CompactionBlock(content=text), *message.content]))


def _at(prepared: PreparedGeneration, priority: int) -> PreparedGeneration:
    return prepared if priority == 0 else replace(prepared, params=replace(prepared.params, priority=priority))


def _paused(body: MessageCreateParams, text: str | None, summary: Message) -> Response:
    usage = Usage(input_tokens=summary.usage.input_tokens, output_tokens=summary.usage.output_tokens,
                  cache_read_input_tokens=summary.usage.cache_read_input_tokens,
                  cache_creation_input_tokens=summary.usage.cache_creation_input_tokens)
    message = CompactedMessage(id=new_message_id(), content=[CompactionBlock(content=text)], model=body.model,
                               stop_reason="compaction", usage=usage)
    if not body.stream:
        return json_response(message)
    start = Message(id=message.id, content=[], model=body.model,
                    usage=usage.model_copy(update={"output_tokens": 0}))
    events: list[ResponseModel] = [
        RawMessageStartEvent(message=start), *_block_events(0, text),
        CompactionMessageDeltaEvent(usage=MessageDeltaUsage(**usage.model_dump(include={
            "output_tokens", "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}))),
        RawMessageStopEvent(),
    ]
    return StreamingResponse(sse_stream(_iterate(events), message.id), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


def _block_events(index: int, text: str | None) -> list[ResponseModel]:
    return [CompactionBlockStartEvent(index=index, content_block=CompactionBlock()),
            CompactionBlockDeltaEvent(index=index, delta=CompactionContentBlockDelta(content=text)),
            RawContentBlockStopEvent(index=index)]


async def _iterate(events: list[ResponseModel]) -> AsyncIterator[Any]:
    for event in events:
        yield event


async def _continued_events(events: AsyncIterator[Any], text: str | None) -> AsyncIterator[Any]:
    """The answer's events after the compaction block: its content blocks move up one index."""
    async for event in events:
        yield event.model_copy(update={"index": event.index + 1}) if hasattr(event, "index") else event
        if isinstance(event, RawMessageStartEvent):
            for block_event in _block_events(0, text):
                yield block_event
