"""Anthropic stream events (the one output path) → OpenAI chat and completion chunks.

The chat layer turns engine deltas into ``message_start`` / ``content_block_*`` /
``message_delta`` events; here each becomes what an OpenAI client reads: text deltas →
``delta.content``, thinking → ``delta.reasoning_content``, a ``tool_use`` block →
``delta.tool_calls[i]`` (id and name first, then the arguments as they stream), the stop
reason → ``finish_reason``, usage → ``CompletionUsage`` with ``cached_tokens``. A non-streaming
answer is converted from the ``Message`` the same events accumulate into.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from pensieve.api.errors import ERROR_TYPE_STATUS, ApiError, api_error_for, openai_error_body
from pensieve.chat.stream import close_iterator
from pensieve.protocol import (
    ErrorEvent,
    InputJSONDelta,
    Message,
    PingEvent,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawMessageDeltaEvent,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
)
from pensieve.protocol.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatFinishReason,
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionUsage,
    Function,
    PromptTokensDetails,
)

log = logging.getLogger(__name__)

FINISH_REASONS: dict[str, ChatFinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter",
    "pause_turn": "stop",
}


def new_completion_id(prefix: str = "chatcmpl-") -> str:
    return prefix + secrets.token_hex(12)


def finish_reason(stop_reason: StopReason | None) -> ChatFinishReason:
    return FINISH_REASONS.get(stop_reason or "end_turn", "stop")


def usage_of(input_tokens: int | None, cache_read: int | None, cache_creation: int | None,
             output_tokens: int) -> CompletionUsage:
    """OpenAI usage from the Anthropic figures: prompt tokens are all three input counts."""
    cached = cache_read or 0
    prompt = (input_tokens or 0) + cached + (cache_creation or 0)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=output_tokens,
                           total_tokens=prompt + output_tokens,
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


@dataclass
class ChunkWriter:
    """The state of one streamed chat completion: which content block is which tool call."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    include_usage: bool = False
    _calls: dict[int, int] = field(default_factory=dict)  # block index → tool call index
    _started: bool = False

    def chunk(self, delta: ChoiceDelta, reason: ChatFinishReason | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=reason)])

    def on_event(self, event: StreamEvent) -> list[ChatCompletionChunk]:
        out: list[ChatCompletionChunk] = []
        if not self._started:  # the first chunk names the role
            self._started = True
            out.append(self.chunk(ChoiceDelta(role="assistant", content="")))
        if isinstance(event, RawContentBlockStartEvent) and isinstance(event.content_block, ToolUseBlock):
            index = self._calls[event.index] = len(self._calls)
            block = event.content_block
            call = ChoiceDeltaToolCall(index=index, id=block.id, type="function",
                                       function=ChoiceDeltaToolCallFunction(name=block.name, arguments=""))
            out.append(self.chunk(ChoiceDelta(tool_calls=[call])))
        elif isinstance(event, RawContentBlockDeltaEvent):
            out.extend(self._delta(event))
        elif isinstance(event, RawMessageDeltaEvent):
            out.append(self.chunk(ChoiceDelta(), finish_reason(event.delta.stop_reason)))
            if self.include_usage:
                u = event.usage
                usage = usage_of(u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens,
                                 u.output_tokens)
                out.append(ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                               choices=[], usage=usage))
        return out

    def _delta(self, event: RawContentBlockDeltaEvent) -> list[ChatCompletionChunk]:
        delta = event.delta
        if isinstance(delta, TextDelta) and delta.text:
            return [self.chunk(ChoiceDelta(content=delta.text))]
        if isinstance(delta, ThinkingDelta) and delta.thinking:
            return [self.chunk(ChoiceDelta(reasoning_content=delta.thinking))]
        if isinstance(delta, InputJSONDelta) and event.index in self._calls:
            call = ChoiceDeltaToolCall(index=self._calls[event.index],
                                       function=ChoiceDeltaToolCallFunction(arguments=delta.partial_json))
            return [self.chunk(ChoiceDelta(tool_calls=[call]))]
        return []


def encode_chunk(chunk: ChatCompletionChunk | Completion) -> bytes:
    return b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"  # an SSE comment: clients skip it, proxies see the connection alive


async def chat_sse(events: AsyncIterator[StreamEvent], writer: ChunkWriter) -> AsyncIterator[bytes | ErrorEvent]:
    """Encoded chunks for ``events``; an ``error`` event is passed through for the route to
    encode in OpenAI's shape. ``events`` is closed however this ends (which aborts the
    generation when the client left)."""
    try:
        async for event in events:
            if isinstance(event, PingEvent):
                yield PING
            elif isinstance(event, ErrorEvent):
                yield event
                return
            else:
                for chunk in writer.on_event(event):
                    yield encode_chunk(chunk)
    finally:
        with anyio.CancelScope(shield=True):
            await close_iterator(events)


def chat_completion(message: Message, completion_id: str, model: str) -> ChatCompletion:
    """The non-streaming answer from the accumulated ``Message``."""
    texts = [b.text for b in message.content if isinstance(b, TextBlock)]
    thinking = [b.thinking for b in message.content if isinstance(b, ThinkingBlock)]
    calls = [ChatCompletionMessageFunctionToolCall(
        id=b.id, function=Function(name=b.name, arguments=json.dumps(b.input, ensure_ascii=False)))
        for b in message.content if isinstance(b, ToolUseBlock)]
    reply = ChatCompletionMessage(content="".join(texts) if texts or not calls else None,
                                  tool_calls=calls or None,
                                  reasoning_content="".join(thinking) if thinking else None)
    u = message.usage
    usage = usage_of(u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens)
    return ChatCompletion(id=completion_id, created=int(time.time()), model=model,
                          choices=[Choice(message=reply, finish_reason=finish_reason(message.stop_reason))],
                          usage=usage)


def text_completion(message: Message, completion_id: str, model: str) -> Completion:
    text = "".join(b.text for b in message.content if isinstance(b, TextBlock))
    reason = "length" if finish_reason(message.stop_reason) == "length" else "stop"
    u = message.usage
    usage = usage_of(u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens)
    return Completion(id=completion_id, created=int(time.time()), model=model,
                      choices=[CompletionChoice(text=text, finish_reason=reason)], usage=usage)


async def completion_sse(events: AsyncIterator[StreamEvent], completion_id: str, model: str,
                         include_usage: bool) -> AsyncIterator[bytes | ErrorEvent]:
    """``/v1/completions`` chunks: one ``Completion`` per text delta, then the finish."""
    created = int(time.time())

    def chunk(text: str, reason: str | None = None) -> Completion:
        return Completion(id=completion_id, created=created, model=model,
                          choices=[CompletionChoice(text=text, finish_reason=reason)])  # type: ignore[arg-type]

    try:
        async for event in events:
            if isinstance(event, PingEvent):
                yield PING
            elif isinstance(event, ErrorEvent):
                yield event
                return
            elif isinstance(event, RawContentBlockDeltaEvent) and isinstance(event.delta, TextDelta):
                yield encode_chunk(chunk(event.delta.text))
            elif isinstance(event, RawMessageDeltaEvent):
                reason = "length" if finish_reason(event.delta.stop_reason) == "length" else "stop"
                yield encode_chunk(chunk("", reason))
                if include_usage:
                    u = event.usage
                    usage = usage_of(u.input_tokens, u.cache_read_input_tokens,
                                     u.cache_creation_input_tokens, u.output_tokens)
                    yield encode_chunk(Completion(id=completion_id, created=created, model=model,
                                                  choices=[], usage=usage))
    finally:
        with anyio.CancelScope(shield=True):
            await close_iterator(events)


async def openai_sse(parts: AsyncIterator[bytes | ErrorEvent], request_id: str) -> AsyncIterator[bytes]:
    """The response body: the encoded chunks, then ``data: [DONE]``. An error (an ``error``
    event, or an exception once the 200 is sent) becomes one ``data: {"error": …}`` chunk,
    the shape the OpenAI SDKs raise from."""
    try:
        async for part in parts:
            if isinstance(part, ErrorEvent):
                error = ApiError(ERROR_TYPE_STATUS.get(part.error.type, 500), part.error.type, part.error.message)
                yield b"data: " + json.dumps(openai_error_body(error)).encode() + b"\n\n"
                break
            yield part
    except Exception as exc:
        error = api_error_for(exc)
        if error.status >= 500:
            log.exception("request %s failed while streaming", request_id)
        yield b"data: " + json.dumps(openai_error_body(error)).encode() + b"\n\n"
    finally:
        with anyio.CancelScope(shield=True):
            await close_iterator(parts)
    yield DONE
