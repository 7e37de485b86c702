"""From a validated request to a running generation: model check, prompt, limits, engine.

The HTTP routes stay thin: they read the body, call ``prepare_generation`` and
``start_deltas``, and choose between streaming the events and collecting them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from pensieve.api.config import ApiConfig
from pensieve.api.errors import ApiError, invalid_request, overloaded, prompt_too_long, request_timed_out
from pensieve.api.limits import check_request_limits
from pensieve.chat.caching import cache_ttl, wants_prompt_cache
from pensieve.api.state import GenerationClient, Services
from pensieve.chat import MessageEventBuilder, RenderedPrompt
from pensieve.chat.output_format import OutputFormatError
from pensieve.chat.stream import close_iterator
from pensieve.chat.tool_grammar import decoding_constraints
from pensieve.engine.grammar import GrammarUnavailableError
from pensieve.engine.types import FinishReason, GenerationDelta, GrammarSpec, SamplingParams, ThinkingBudget
from pensieve.protocol import ConversationParams, MessageCreateParams

# How long to wait for the engine's first answer before committing to a 200 stream: errors
# the engine raises at once (overloaded, prompt too long) then still get their HTTP status.
FIRST_DELTA_WAIT_S = 0.2


@dataclass(frozen=True)
class PreparedGeneration:
    request_id: str
    message_id: str
    model: str  # the name the client asked for; echoed in the response
    prompt: RenderedPrompt
    params: SamplingParams
    thinking_key: bytes | None = field(default=None, repr=False)  # the renderer's signing key
    context_limited: bool = False  # max_tokens was clamped to what the context leaves
    cache_ttl: str = "5m"  # where usage.cache_creation counts the tokens written to the cache

    def event_builder(self) -> MessageEventBuilder:
        return MessageEventBuilder(
            message_id=self.message_id,
            model=self.model,
            input_tokens=self.prompt.num_tokens,
            tools=self.prompt.tools,
            thinking=self.prompt.thinking,
            thinking_key=self.thinking_key,
            context_limited=self.context_limited,
            cache_ttl=self.cache_ttl,
            context_management=self.prompt.context_management,
        )


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def check_model(config: ApiConfig, name: str) -> str:
    """The served model id for ``name``; 404 ``not_found_error`` when it names none."""
    served = config.resolve_model(name)
    if served is None:
        raise ApiError(404, "not_found_error", f"model: {name} (this server serves {config.model_id})")
    return served


def check_admission(services: Services) -> None:
    """529 ``overloaded_error`` with ``retry-after`` when the engine's queue is full or its KV
    is exhausted: asked before the body is read, so a refused request costs no parse or render."""
    reason = services.engine.overload()
    if reason is not None:
        raise overloaded(f"the server is overloaded ({reason}); retry later")


async def with_deadline(deltas: AsyncIterator[GenerationDelta], deadline: float,
                        timeout_s: float) -> AsyncIterator[GenerationDelta]:
    """``deltas`` until the event loop's clock reaches ``deadline``; then the generation is
    stopped (closing ``deltas`` aborts the engine request, which frees its KV) and a 504
    ``timeout_error`` raised: an ``error`` event when streaming."""
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    delta = await anext(deltas)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise request_timed_out(timeout_s) from None
            yield delta
            if delta.finish_reason is not None:
                return
    finally:
        await close_iterator(deltas)


async def render_prompt(services: Services, request: ConversationParams) -> RenderedPrompt:
    check_model(services.config, request.model)
    # Rendering a 20k-token conversation takes milliseconds of CPU: keep the loop free.
    return await run_in_threadpool(_render, services, request)


def _render(services: Services, request: ConversationParams) -> RenderedPrompt:
    check_request_limits(services.config, request, services.renderer.tokenizer)
    try:
        return services.renderer.render(request)
    except OutputFormatError as exc:
        raise invalid_request(str(exc)) from exc


def _constrain(services: Services, request: MessageCreateParams) -> tuple[RenderedPrompt, GrammarSpec | None, ThinkingBudget | None]:
    """On a worker thread: the prompt, then its grammar (vetting each tool schema with
    xgrammar takes up to ~1 s for a new large schema: never on the event loop)."""
    prompt = _render(services, request)
    context = services.config.context_length
    if prompt.num_tokens >= context:
        raise prompt_too_long(prompt.num_tokens, context)
    try:
        grammar, thinking_budget = decoding_constraints(prompt, services.renderer.tokenizer)
    except GrammarUnavailableError as exc:  # a forced tool call, and xgrammar not installed
        raise ApiError(500, "api_error", str(exc)) from exc
    return prompt, grammar, thinking_budget


async def prepare_generation(services: Services, request: MessageCreateParams, request_id: str) -> PreparedGeneration:
    check_model(services.config, request.model)
    prompt, grammar, thinking_budget = await run_in_threadpool(_constrain, services, request)
    context = services.config.context_length
    room = context - prompt.num_tokens
    params = SamplingParams(
        # Claude Code asks for 32000+; what does not fit in the context is clamped, not refused
        # (reaching the clamp is reported as model_context_window_exceeded).
        max_tokens=min(request.max_tokens, room),
        temperature=(services.config.default_temperature if request.temperature is None
                     else request.temperature),
        top_p=services.config.default_top_p if request.top_p is None else request.top_p,
        top_k=services.config.default_top_k if request.top_k is None else request.top_k,
        stop_sequences=tuple(s for s in request.stop_sequences or () if s),
        retain_prefix=wants_prompt_cache(request),
        grammar=grammar,
        thinking_budget=thinking_budget,
        dry=services.config.dry,
    )
    return PreparedGeneration(request_id, new_message_id(), request.model, prompt, params,
                              services.renderer.thinking_key, context_limited=request.max_tokens > room,
                              cache_ttl=cache_ttl(request))


async def start_deltas(engine: GenerationClient, prepared: PreparedGeneration) -> AsyncIterator[GenerationDelta]:
    """The engine's deltas for ``prepared``, started: errors the engine raises before its
    first delta (within ``FIRST_DELTA_WAIT_S``) are raised here, not mid-stream."""
    if prepared.params.max_tokens == 0:
        return _nothing_generated(prepared)
    stream = engine.generate(prepared.prompt.token_ids, prepared.params, prepared.request_id)
    first: asyncio.Future[GenerationDelta] = asyncio.ensure_future(anext(stream))
    try:
        await asyncio.wait({first}, timeout=FIRST_DELTA_WAIT_S)
    except BaseException:
        first.cancel()
        raise
    if first.done() and not first.cancelled():
        exc = first.exception()
        if exc is not None and not isinstance(exc, StopAsyncIteration):
            raise exc
    return _resume(first, stream)


async def _resume(
    first: asyncio.Future[GenerationDelta], stream: AsyncIterator[GenerationDelta]
) -> AsyncIterator[GenerationDelta]:
    try:
        try:
            delta = await first
        except StopAsyncIteration:
            return
        yield delta
        async for delta in stream:
            yield delta
    finally:
        if first.done():
            await close_iterator(stream)
        else:  # the stream runs inside ``first``: cancelling it unwinds (aborts) the stream
            first.cancel()


async def _nothing_generated(prepared: PreparedGeneration) -> AsyncIterator[GenerationDelta]:
    """``max_tokens: 0`` (cache warm-up in the API): a finished message with no content."""
    yield GenerationDelta(
        request_id=prepared.request_id,
        finish_reason=FinishReason.MAX_TOKENS,
        num_prompt_tokens=prepared.prompt.num_tokens,
    )
