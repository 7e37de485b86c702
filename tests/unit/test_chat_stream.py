"""Engine deltas → stream events → Message; the SDK's own accumulator is the oracle."""

from __future__ import annotations

import re
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
from pensieve.chat.segmenter import ThinkingMarkers
from pensieve.chat.thinking import ThinkingPlan, ThinkingSigner
from pensieve.chat.tools_prompt import ToolsPlan
from pensieve.protocol import StreamEvent, ToolParam

RID = "req_1"


def delta(text: str = "", n: int = 0, finish: FinishReason | None = None, **kw: object) -> GenerationDelta:
    return GenerationDelta(RID, text=text, finish_reason=finish, num_output_tokens=n, num_prompt_tokens=7, **kw)


async def deltas_of(items: Sequence[GenerationDelta]) -> AsyncIterator[GenerationDelta]:
    for item in items:
        yield item


def builder(**kw: object) -> MessageEventBuilder:
    return MessageEventBuilder(message_id="msg_1", model="claude-x", input_tokens=7, **kw)  # type: ignore[arg-type]


async def events_of(items: Sequence[GenerationDelta]) -> list[StreamEvent]:
    return [e async for e in message_events(deltas_of(items), builder())]


def sdk_accumulate(events: Sequence[StreamEvent]) -> sdk.Message:
    adapter = TypeAdapter(sdk.RawMessageStreamEvent)
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for event in events:
        snapshot = accumulate_event(event=adapter.validate_python(event.model_dump(mode="json")),
                                    current_snapshot=snapshot, json_bufs=json_bufs)
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


# -- tool calls and thinking ---------------------------------------------------------------

BASH = ToolParam(name="Bash", input_schema={"type": "object", "properties": {"command": {"type": "string"}}})
TOOLS = ToolsPlan("hermes", (BASH,))
THINKING = ThinkingPlan(requested=True, markers=ThinkingMarkers())
KEY = b"stream-key"
TOOL_ID = re.compile(r"toolu_[A-Za-z0-9]{24}")


def pieces(text: str, size: int = 3) -> list[GenerationDelta]:
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    return [delta(c, n) for n, c in enumerate(chunks, start=1)]


async def run_both(items: list[GenerationDelta], **kw: object) -> tuple[list[StreamEvent], sdk.Message]:
    """The events, and the collected message, which must equal the SDK's accumulation."""
    events = [e async for e in message_events(deltas_of(items), builder(**kw))]
    message = await collect_message(message_events(deltas_of(items), builder(**kw)))
    oracle = sdk_accumulate(events)
    assert oracle.stop_reason == message.stop_reason
    got = [b.model_dump() for b in message.content]
    want = [b.model_dump(exclude_none=True) for b in oracle.content]
    for g, w in zip(got, want):  # ids are random per run
        g.pop("id", None), w.pop("id", None)
    assert got == want
    return events, oracle


async def test_tool_call_becomes_a_tool_use_block_with_streamed_input() -> None:
    text = 'Checking.\n<tool_call>\n{"name": "Bash", "arguments": {"command": "ls -la /tmp"}}\n</tool_call>'
    events, message = await run_both([*pieces(text), delta("", 99, FinishReason.EOS)], tools=TOOLS)
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Checking."
    call = message.content[1]
    assert TOOL_ID.fullmatch(call.id) and call.name == "Bash" and call.input == {"command": "ls -la /tmp"}
    assert message.stop_reason == "tool_use"
    json_deltas = [e.delta.partial_json for e in events
                   if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(json_deltas) > 3 and "".join(json_deltas) == '{"command": "ls -la /tmp"}'


async def test_parallel_calls_are_several_blocks() -> None:
    one = '<tool_call>\n{"name": "Bash", "arguments": {"command": "%s"}}\n</tool_call>\n'
    _, message = await run_both([*pieces(one % "a" + one % "b", 5), delta("", 9, FinishReason.EOS)], tools=TOOLS)
    assert [(b.type, b.input) for b in message.content] == [("tool_use", {"command": "a"}), ("tool_use", {"command": "b"})]
    assert len({b.id for b in message.content}) == 2 and message.stop_reason == "tool_use"


async def test_disable_parallel_ends_the_turn_after_the_first_call() -> None:
    one = '<tool_call>{"name": "Bash", "arguments": {"command": "a"}}</tool_call>'
    closed = []

    async def endless() -> AsyncIterator[GenerationDelta]:
        try:
            for n, d in enumerate(pieces(one + one + "never ends " * 100), start=1):
                yield d
        finally:
            closed.append(True)

    plan = ToolsPlan("hermes", (BASH,), parallel=False)
    message = await collect_message(message_events(endless(), builder(tools=plan)))
    assert [b.type for b in message.content] == ["tool_use"] and message.stop_reason == "tool_use"
    assert closed == [True]


async def test_call_cut_by_max_tokens_is_repaired_and_says_max_tokens() -> None:
    text = '<tool_call>{"name": "Bash", "arguments": {"command": "echo hel'
    _, message = await run_both([*pieces(text), delta("", 9, FinishReason.MAX_TOKENS)], tools=TOOLS)
    assert message.content[0].input == {"command": "echo hel"} and message.stop_reason == "max_tokens"


async def test_unknown_tool_is_still_a_tool_use(caplog: pytest.LogCaptureFixture) -> None:
    text = '<tool_call>{"name": "Nope", "arguments": {}}</tool_call>'
    _, message = await run_both([*pieces(text), delta("", 9, FinishReason.EOS)], tools=TOOLS)
    assert message.content[0].name == "Nope" and message.stop_reason == "tool_use"
    assert "did not offer" in caplog.text


async def test_malformed_call_and_unoffered_tools_come_back_as_text() -> None:
    bad = "<tool_call>{not json}</tool_call>"
    _, message = await run_both([*pieces(bad), delta("", 9, FinishReason.EOS)], tools=TOOLS)
    assert [(b.type, b.text) for b in message.content] == [("text", bad)] and message.stop_reason == "end_turn"
    good = '<tool_call>{"name": "Bash", "arguments": {}}</tool_call>'
    _, message = await run_both([*pieces(good), delta("", 9, FinishReason.EOS)])  # no tools offered
    assert [(b.type, b.text) for b in message.content] == [("text", good)]


async def test_thinking_block_is_signed_and_the_signature_verifies() -> None:
    text = "<think>\nFirst, 2+2.\n</think>\n\nIt is 4."
    events, message = await run_both([*pieces(text, 4), delta("", 9, FinishReason.EOS)],
                                     thinking=THINKING, thinking_key=KEY)
    assert [b.type for b in message.content] == ["thinking", "text"]
    thinking = message.content[0]
    assert thinking.thinking == "First, 2+2." and ThinkingSigner(KEY).verify(thinking.thinking, thinking.signature)
    kinds = [e.delta.type for e in events if e.type == "content_block_delta" and e.index == 0]
    assert kinds[-1] == "signature_delta" and set(kinds[:-1]) == {"thinking_delta"}


async def test_thinking_then_call_interleaved() -> None:
    plan = ThinkingPlan(requested=True, markers=ThinkingMarkers(), starts_open=True)
    text = 'plan it</think><tool_call>{"name": "Bash", "arguments": {"command": "x"}}</tool_call>'
    _, message = await run_both([*pieces(text), delta("", 9, FinishReason.EOS)], tools=TOOLS, thinking=plan,
                                thinking_key=KEY)
    assert [b.type for b in message.content] == ["thinking", "tool_use"] and message.stop_reason == "tool_use"
