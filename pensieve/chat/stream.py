"""Engine deltas → Anthropic stream events, and events → a complete ``Message``.

There is one path: ``message_events`` produces the events; a streaming response sends
them, a non-streaming one is ``collect_message`` over the same events. The generated text
goes through a ``Segmenter`` (text | thinking | tool calls, per the prompt's plans); each
segment kind is a content block, opened at its first segment and closed when another kind
starts. A thinking block ends with a ``signature_delta`` (HMAC of its text); a tool call is a
``tool_use`` block whose arguments stream as ``input_json_delta``s.

``stop_reason`` is ``tool_use`` when the turn ended (end of turn, or the segmenter ending it
after the last call allowed) with at least one complete call in it;
``model_context_window_exceeded`` when the output filled the context window before the
request's ``max_tokens`` (the engine's limit was clamped to what the context left). ``pause_turn``
and ``refusal`` are never produced (no server tools run, no classifier), so ``stop_details``
is always null. Usage as the API reports it: ``cache_creation`` splits the tokens written to
the cache by the lifetime the request asked for (``cache_ttl``), ``output_tokens_details``
counts the tokens generated inside thinking (markers included) when the request thinks on a
reasoning model, ``server_tool_use`` is null.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from pensieve.chat.segmenter import Segmenter
from pensieve.chat.segments import (
    Segment,
    TextSegment,
    ThinkingSegment,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from pensieve.chat.thinking import ThinkingPlan, ThinkingSigner
from pensieve.chat.tool_parsers import make_tool_parser
from pensieve.chat.tool_parsers.harmony import HARMONY_THINKING, HarmonyParser
from pensieve.chat.tools_prompt import ToolsPlan
from pensieve.engine.types import FinishReason, GenerationDelta
from pensieve.protocol.context_management import BetaContextManagementResponse
from pensieve.protocol import (
    CacheCreation,
    ContentBlock,
    ErrorEvent,
    ErrorObject,
    ErrorType,
    InputJSONDelta,
    Message,
    MessageDelta,
    MessageDeltaUsage,
    OutputTokensDetails,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    SignatureDelta,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)

log = logging.getLogger(__name__)

STOP_REASONS: dict[FinishReason, StopReason] = {
    FinishReason.EOS: "end_turn",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
    FinishReason.MAX_TOKENS: "max_tokens",
    FinishReason.CONTEXT: "model_context_window_exceeded",
}
TOOL_USE_ID_PREFIX = "toolu_"
_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_use_id() -> str:
    return TOOL_USE_ID_PREFIX + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def make_segmenter(tools: ToolsPlan | None, thinking: ThinkingPlan | None) -> Segmenter:
    """The segmenter for a prompt's plans: no tools offered → no tool parsing at all (but a
    harmony model's message headers are always read: they frame its text too)."""
    parser = make_tool_parser(tools.format, tools.schemas()) if tools else None
    if parser is None and thinking is not None and thinking.markers == HARMONY_THINKING:
        parser = HarmonyParser()
    return Segmenter(
        tool_parser=parser,
        thinking=thinking.markers if thinking else None,
        start_in_thinking=bool(thinking and thinking.starts_open),
        max_calls=tools.max_calls if tools else None,
    )


class GenerationFailed(Exception):
    """The stream ended with an ``error`` event (raised by ``collect_message``)."""

    def __init__(self, error: ErrorObject) -> None:
        super().__init__(error.message)
        self.error = error


class MessageEventBuilder:
    """The state of one message being streamed: the segmenter, the open block, counts.

    ``tools``/``thinking`` come from the ``RenderedPrompt``; ``thinking_key`` is the
    renderer's (so signatures verify when the thinking comes back). ``context_limited``: the
    engine's max_tokens was clamped to the context, so reaching it means the window is full.
    ``cache_ttl``: ``"5m"`` or ``"1h"``, where tokens written to the cache are counted.
    """

    def __init__(
        self,
        *,
        message_id: str,
        model: str,
        input_tokens: int,
        tools: ToolsPlan | None = None,
        thinking: ThinkingPlan | None = None,
        thinking_key: bytes | None = None,
        context_limited: bool = False,
        cache_ttl: str = "5m",
        context_management: BetaContextManagementResponse | None = None,
    ) -> None:
        self.context_management = context_management  # reported in message_delta
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self.tools = tools
        self.segmenter = make_segmenter(tools, thinking)
        self._signer = ThinkingSigner(thinking_key or secrets.token_bytes(32))
        self._open: str | None = None  # the open block's type
        self._open_index = 0
        self._num_blocks = 0
        self._thinking: list[str] = []  # the open thinking block's text
        self.tool_calls = 0  # complete tool_use blocks
        self.finished = False
        self.context_limited = context_limited
        self.cache_ttl = cache_ttl
        self.counts_thinking = bool(thinking and thinking.enabled)
        self.omit_thinking = bool(thinking and thinking.omitted)
        # gpt-oss reasons whatever the request says: a request that did not ask for thinking
        # gets no thinking block (its tokens still count as output)
        self.drop_thinking = bool(thinking and thinking.markers == HARMONY_THINKING and not thinking.requested)
        self.thinking_tokens = 0
        self._undecided = 0  # output tokens not yet known to be thinking or not

    def start(self) -> RawMessageStartEvent:
        message = Message(
            id=self.message_id,
            content=[],
            model=self.model,
            usage=Usage(input_tokens=self.input_tokens, output_tokens=0),
        )
        return RawMessageStartEvent(message=message)

    def on_delta(self, delta: GenerationDelta) -> list[StreamEvent]:
        """Events for one engine delta; after a final delta the builder is ``finished`` (also
        when the segmenter ended the turn early: the caller then stops the generation)."""
        events: list[StreamEvent] = []
        new_tokens = max(0, delta.num_output_tokens - self.output_tokens)
        self.output_tokens = max(self.output_tokens, delta.num_output_tokens)
        was_thinking = self.segmenter.in_thinking
        segments = self.segmenter.feed(delta.text) if delta.text else []
        self._count_thinking(new_tokens, segments, was_thinking)
        events.extend(self._segments(segments))
        if delta.finish_reason is not None:
            if delta.finish_reason in STOP_REASONS:
                events.extend(self._segments(self.segmenter.finish()))
            events.extend(self._finish(delta))
        elif self.segmenter.done:
            events.extend(self._finish(delta))
        return events

    def _count_thinking(self, tokens: int, segments: list[Segment], was_thinking: bool) -> None:
        """Attribute ``tokens`` to thinking when they were generated inside it (the close
        marker's included). Tokens the segmenter held back (an open marker still incomplete)
        wait for what their text turns out to be."""
        if not self.counts_thinking:
            return
        if was_thinking or self.segmenter.in_thinking or any(isinstance(s, ThinkingSegment) for s in segments):
            self.thinking_tokens += tokens + self._undecided
            self._undecided = 0
        elif segments:
            self._undecided = 0
        else:
            self._undecided += tokens

    def fail(self, error_type: ErrorType, message: str) -> ErrorEvent:
        self.finished = True
        return ErrorEvent(error=ErrorObject(type=error_type, message=message))

    # -- blocks ---------------------------------------------------------------------------

    def _segments(self, segments: list[Segment]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for segment in segments:
            if isinstance(segment, TextSegment):
                if self._open != "text":
                    events += self._start_block(TextBlock(text=""))
                events.append(self._delta(TextDelta(text=segment.text)))
            elif isinstance(segment, ThinkingSegment):
                if self.drop_thinking:
                    continue
                if self._open != "thinking":
                    events += self._start_block(ThinkingBlock(thinking="", signature=""))
                self._thinking.append(segment.text)
                if not self.omit_thinking:
                    events.append(self._delta(ThinkingDelta(thinking=segment.text)))
            elif isinstance(segment, ToolCallStart):
                events += self._start_block(self._tool_use_block(segment.name))
            elif isinstance(segment, ToolCallDelta) and self._open == "tool_use":
                events.append(self._delta(InputJSONDelta(partial_json=segment.partial_json)))
            elif isinstance(segment, ToolCallEnd) and self._open == "tool_use":
                self.tool_calls += segment.complete
                events += self._close_block()
        return events

    def _tool_use_block(self, name: str) -> ToolUseBlock:
        if self.tools is not None and name not in self.tools.names:
            log.warning("the model called %r, which the request did not offer", name)
        return ToolUseBlock(id=new_tool_use_id(), name=name, input={})

    def _start_block(self, block: ContentBlock) -> list[StreamEvent]:
        events = self._close_block()
        self._open, self._open_index = block.type, self._num_blocks
        self._num_blocks += 1
        events.append(RawContentBlockStartEvent(index=self._open_index, content_block=block))
        return events

    def _delta(self, delta: Any) -> RawContentBlockDeltaEvent:
        return RawContentBlockDeltaEvent(index=self._open_index, delta=delta)

    def _close_block(self) -> list[StreamEvent]:
        if self._open is None:
            return []
        events: list[StreamEvent] = []
        if self._open == "thinking":
            text = "".join(self._thinking)
            signature = self._signer.seal(text) if self.omit_thinking else self._signer.sign(text)
            events.append(self._delta(SignatureDelta(signature=signature)))
            self._thinking = []
        events.append(RawContentBlockStopEvent(index=self._open_index))
        self._open = None
        return events

    def _finish(self, delta: GenerationDelta) -> list[StreamEvent]:
        reason = delta.finish_reason
        if reason is not None and reason not in STOP_REASONS:  # ERROR, ABORTED
            detail = delta.error or f"generation ended: {reason.value}"
            return [self.fail("api_error", detail)]
        events = self._close_block()
        ended_turn = reason in (None, FinishReason.EOS)  # None: the segmenter ended it
        stop_reason = STOP_REASONS[reason or FinishReason.EOS]
        if ended_turn and self.tool_calls:
            stop_reason = "tool_use"
        elif reason is FinishReason.MAX_TOKENS and self.context_limited:
            stop_reason = "model_context_window_exceeded"
        stop_sequence = delta.stop_sequence if reason is FinishReason.STOP_SEQUENCE else None
        events.append(
            RawMessageDeltaEvent(
                delta=MessageDelta(stop_reason=stop_reason, stop_sequence=stop_sequence),
                usage=self._final_usage(delta),
                context_management=self.context_management,
            )
        )
        events.append(RawMessageStopEvent())
        self.finished = True
        return events

    def _final_usage(self, delta: GenerationDelta) -> MessageDeltaUsage:
        # As in the API, input_tokens excludes what was read from or written to the cache;
        # the three add up to the prompt length that message_start (and count_tokens) reported.
        prompt = delta.num_prompt_tokens or self.input_tokens
        cached = min(delta.num_cached_tokens, prompt)
        created = min(delta.num_new_cached_tokens, prompt - cached)
        return MessageDeltaUsage(
            output_tokens=self.output_tokens,
            input_tokens=prompt - cached - created,
            cache_creation_input_tokens=created,
            cache_read_input_tokens=cached,
            cache_creation=self.cache_creation(created),
            output_tokens_details=self.output_details(),
        )

    def output_details(self) -> OutputTokensDetails | None:
        if not self.counts_thinking:
            return None
        return OutputTokensDetails(thinking_tokens=min(self.thinking_tokens, self.output_tokens))

    def cache_creation(self, created: int) -> CacheCreation:
        if self.cache_ttl == "1h":
            return CacheCreation(ephemeral_1h_input_tokens=created)
        return CacheCreation(ephemeral_5m_input_tokens=created)


async def close_iterator(iterator: Any) -> None:
    """``aclose()`` an async generator (or anything with ``aclose``); no-op otherwise.

    Consumers here close what they consumed when they stop early, so an abandoned engine
    stream is aborted now rather than when the garbage collector finds it.
    """
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def message_events(
    deltas: AsyncIterable[GenerationDelta], builder: MessageEventBuilder
) -> AsyncIterator[StreamEvent]:
    """``message_start``, the events of every delta, and an ``error`` event if the engine
    stops without a final delta. Exceptions from ``deltas`` propagate; ``deltas`` is closed
    when this generator ends, however it ends."""
    try:
        yield builder.start()
        async for delta in deltas:
            for event in builder.on_delta(delta):
                yield event
            if builder.finished:
                return
        yield builder.fail("api_error", "generation ended without a finish reason")
    finally:
        await close_iterator(deltas)


async def collect_message(events: AsyncIterable[StreamEvent]) -> Message:
    """The ``Message`` the events describe — what the SDK's stream accumulator builds.

    Raises ``GenerationFailed`` on an ``error`` event.
    """
    message: Message | None = None
    parts: dict[int, list[str]] = {}
    try:
        async for event in events:
            if isinstance(event, ErrorEvent):
                raise GenerationFailed(event.error)
            if isinstance(event, RawMessageStartEvent):
                message = event.message.model_copy(deep=True)
            elif message is None:
                raise RuntimeError(f"{event.type} before message_start")
            elif isinstance(event, RawContentBlockStartEvent):
                message.content.append(event.content_block.model_copy(deep=True))
                parts[event.index] = []
            elif isinstance(event, RawContentBlockDeltaEvent):
                _apply_block_delta(message.content[event.index], parts[event.index], event.delta)
            elif isinstance(event, RawMessageDeltaEvent):
                _apply_message_delta(message, event)
    finally:
        await close_iterator(events)
    if message is None:
        raise RuntimeError("no message_start event")
    for index, pieces in parts.items():
        _complete_block(message.content[index], "".join(pieces))
    return message


def _apply_block_delta(block: ContentBlock, pieces: list[str], delta: Any) -> None:
    if isinstance(delta, TextDelta):
        pieces.append(delta.text)
    elif isinstance(delta, ThinkingDelta):
        pieces.append(delta.thinking)
    elif isinstance(delta, InputJSONDelta):
        pieces.append(delta.partial_json)
    elif isinstance(delta, SignatureDelta) and isinstance(block, ThinkingBlock):
        block.signature = delta.signature


def _complete_block(block: ContentBlock, joined: str) -> None:
    if isinstance(block, TextBlock):
        block.text += joined
    elif isinstance(block, ThinkingBlock):
        block.thinking += joined
    elif isinstance(block, ToolUseBlock) and joined:
        block.input = json.loads(joined)


def _apply_message_delta(message: Message, event: RawMessageDeltaEvent) -> None:
    message.stop_reason = event.delta.stop_reason
    if event.context_management is not None:
        message.context_management = event.context_management
    message.stop_sequence = event.delta.stop_sequence
    usage = event.usage
    message.usage.output_tokens = usage.output_tokens
    if usage.input_tokens is not None:
        message.usage.input_tokens = usage.input_tokens
    if usage.cache_creation_input_tokens is not None:
        message.usage.cache_creation_input_tokens = usage.cache_creation_input_tokens
    if usage.cache_read_input_tokens is not None:
        message.usage.cache_read_input_tokens = usage.cache_read_input_tokens
    if usage.cache_creation is not None:
        message.usage.cache_creation = usage.cache_creation
    if usage.output_tokens_details is not None:
        message.usage.output_tokens_details = usage.output_tokens_details
