"""Engine deltas → Anthropic stream events, and events → a complete ``Message``.

There is one path: ``message_events`` produces the events; a streaming response sends
them, a non-streaming one is ``collect_message`` over the same events. For now the answer
is one text block, opened with its first text (an empty answer has no block).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from pensieve.engine.types import FinishReason, GenerationDelta
from pensieve.protocol import (
    ErrorEvent,
    ErrorObject,
    ErrorType,
    Message,
    MessageDelta,
    MessageDeltaUsage,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    Usage,
)

STOP_REASONS: dict[FinishReason, StopReason] = {
    FinishReason.EOS: "end_turn",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
    FinishReason.MAX_TOKENS: "max_tokens",
    FinishReason.CONTEXT: "model_context_window_exceeded",
}


class GenerationFailed(Exception):
    """The stream ended with an ``error`` event (raised by ``collect_message``)."""

    def __init__(self, error: ErrorObject) -> None:
        super().__init__(error.message)
        self.error = error


class MessageEventBuilder:
    """The state of one message being streamed: which block is open, counts so far."""

    def __init__(self, *, message_id: str, model: str, input_tokens: int) -> None:
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self._open_index: int | None = None
        self._num_blocks = 0
        self.finished = False

    def start(self) -> RawMessageStartEvent:
        message = Message(
            id=self.message_id,
            content=[],
            model=self.model,
            usage=Usage(input_tokens=self.input_tokens, output_tokens=0),
        )
        return RawMessageStartEvent(message=message)

    def on_delta(self, delta: GenerationDelta) -> list[StreamEvent]:
        """Events for one engine delta; after a final delta the builder is ``finished``."""
        events: list[StreamEvent] = []
        self.output_tokens = max(self.output_tokens, delta.num_output_tokens)
        if delta.text:
            events.extend(self._text(delta.text))
        if delta.finish_reason is not None:
            events.extend(self._finish(delta))
        return events

    def fail(self, error_type: ErrorType, message: str) -> ErrorEvent:
        self.finished = True
        return ErrorEvent(error=ErrorObject(type=error_type, message=message))

    def _text(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._open_index is None:
            self._open_index = self._num_blocks
            self._num_blocks += 1
            events.append(RawContentBlockStartEvent(index=self._open_index, content_block=TextBlock(text="")))
        events.append(RawContentBlockDeltaEvent(index=self._open_index, delta=TextDelta(text=text)))
        return events

    def _finish(self, delta: GenerationDelta) -> list[StreamEvent]:
        reason = delta.finish_reason
        if reason not in STOP_REASONS:  # ERROR, ABORTED
            detail = delta.error or f"generation ended: {reason.value if reason else 'unknown'}"
            return [self.fail("api_error", detail)]
        events: list[StreamEvent] = []
        if self._open_index is not None:
            events.append(RawContentBlockStopEvent(index=self._open_index))
            self._open_index = None
        stop_sequence = delta.stop_sequence if reason is FinishReason.STOP_SEQUENCE else None
        events.append(
            RawMessageDeltaEvent(
                delta=MessageDelta(stop_reason=STOP_REASONS[reason], stop_sequence=stop_sequence),
                usage=self._final_usage(delta),
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
        )


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
    texts: dict[int, list[str]] = {}
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
                texts[event.index] = []
            elif isinstance(event, RawContentBlockDeltaEvent) and isinstance(event.delta, TextDelta):
                texts[event.index].append(event.delta.text)
            elif isinstance(event, RawMessageDeltaEvent):
                _apply_message_delta(message, event)
    finally:
        await close_iterator(events)
    if message is None:
        raise RuntimeError("no message_start event")
    for index, parts in texts.items():
        block = message.content[index]
        if isinstance(block, TextBlock):
            block.text += "".join(parts)
    return message


def _apply_message_delta(message: Message, event: RawMessageDeltaEvent) -> None:
    message.stop_reason = event.delta.stop_reason
    message.stop_sequence = event.delta.stop_sequence
    usage = event.usage
    message.usage.output_tokens = usage.output_tokens
    if usage.input_tokens is not None:
        message.usage.input_tokens = usage.input_tokens
    if usage.cache_creation_input_tokens is not None:
        message.usage.cache_creation_input_tokens = usage.cache_creation_input_tokens
    if usage.cache_read_input_tokens is not None:
        message.usage.cache_read_input_tokens = usage.cache_read_input_tokens
