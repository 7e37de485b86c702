"""Engine deltas → stream events → Message; the SDK's own accumulator is the oracle."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anthropic.types as sdk
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from pydantic import TypeAdapter

from pensieve.chat import (
    GenerationFailed,
    MessageEventBuilder,
    collect_message,
    message_events,
)
from pensieve.engine.types import FinishReason, GenerationDelta
from pensieve.protocol import StreamEvent

RID = "req_1"


def delta(text: str = "", n: int = 0, finish: FinishReason | None = None, **kw: object) -> GenerationDelta:
    return GenerationDelta(RID, text=text, finish_reason=finish, num_output_tokens=n, num_prompt_tokens=7, **kw)


async def deltas_of(items: Sequence[GenerationDelta]) -> AsyncIterator[GenerationDelta]:
    for item in items:
        yield item


def builder() -> MessageEventBuilder:
    return MessageEventBuilder(message_id="msg_1", model="claude-x", input_tokens=7)


async def events_of(items: Sequence[GenerationDelta]) -> list[StreamEvent]:
    return [e async for e in message_events(deltas_of(items), builder())]


def sdk_accumulate(events: Sequence[StreamEvent]) -> sdk.Message:
    adapter = TypeAdapter(sdk.RawMessageStreamEvent)
    snapshot = None
    for event in events:
        snapshot = accumulate_event(event=adapter.validate_python(event.model_dump(mode="json")),
                                    current_snapshot=snapshot, json_bufs={})
    assert snapshot is not None
    return snapshot


async def test_text_answer_event_order_and_final_message() -> None:
    items = [delta("Hel", 1), delta("lo", 2), delta("", 3, FinishReason.EOS)]
    events = await events_of(items)
    assert [e.type for e in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    message = await collect_message(message_events(deltas_of(items), builder()))
    assert message.content[0].text == "Hello"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 7 and message.usage.output_tokens == 3
    # collect_message builds what the SDK's accumulator builds from the same events.
    oracle = sdk_accumulate(events)
    for key in ("id", "model", "role", "type", "stop_reason", "stop_sequence"):
        assert getattr(oracle, key) == getattr(message, key)
    assert [b.model_dump(exclude_none=True) for b in oracle.content] == [b.model_dump() for b in message.content]
    assert (oracle.usage.input_tokens, oracle.usage.output_tokens) == (7, 3)


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [
        (FinishReason.EOS, "end_turn"),
        (FinishReason.MAX_TOKENS, "max_tokens"),
        (FinishReason.STOP_SEQUENCE, "stop_sequence"),
        (FinishReason.CONTEXT, "model_context_window_exceeded"),
    ],
)
async def test_finish_reasons_map_to_stop_reasons(finish: FinishReason, stop_reason: str) -> None:
    final = delta("x", 1, finish, stop_sequence="STOP" if finish is FinishReason.STOP_SEQUENCE else None)
    message = await collect_message(message_events(deltas_of([final]), builder()))
    assert message.stop_reason == stop_reason
    assert message.stop_sequence == ("STOP" if finish is FinishReason.STOP_SEQUENCE else None)


async def test_empty_answer_is_a_valid_message_without_blocks() -> None:
    events = await events_of([delta("", 1, FinishReason.EOS)])
    assert [e.type for e in events] == ["message_start", "message_delta", "message_stop"]
    assert sdk_accumulate(events).content == []


async def test_engine_error_becomes_an_error_event() -> None:
    events = await events_of([delta("par", 1), delta("", 1, FinishReason.ERROR, error="CUDA fell over")])
    assert [e.type for e in events][-1] == "error"
    assert events[-1].error.message == "CUDA fell over"  # type: ignore[union-attr]
    with pytest.raises(GenerationFailed, match="CUDA fell over"):
        await collect_message(message_events(deltas_of([delta("", 1, FinishReason.ERROR, error="CUDA fell over")]), builder()))


async def test_stream_ending_without_finish_reason_is_an_error() -> None:
    events = await events_of([delta("a", 1)])
    assert events[-1].type == "error"


async def test_cached_tokens_are_reported_like_the_api() -> None:
    final = delta("", 2, FinishReason.EOS, num_cached_tokens=5)
    message = await collect_message(message_events(deltas_of([delta("a", 1), final]), builder()))
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (2, 5, 0)


async def test_message_events_closes_the_delta_stream_when_closed_early() -> None:
    closed = []

    async def deltas() -> AsyncIterator[GenerationDelta]:
        try:
            yield delta("a", 1)
            yield delta("b", 2)
        finally:
            closed.append(True)

    events = message_events(deltas(), builder())
    assert (await anext(events)).type == "message_start"
    assert (await anext(events)).type == "content_block_start"
    await events.aclose()
    assert closed == [True]
