"""``POST /v1/messages`` (streaming and not) and ``POST /v1/messages/count_tokens``.

``?beta=true`` and ``anthropic-beta`` headers are accepted and ignored: the body decides.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from pensieve.api.auth import require_api_key
from pensieve.api.body import CLIENT_CLOSED_REQUEST, parse_body, read_body
from pensieve.api.compaction import compaction_response
from pensieve.api.generation import (
    check_admission,
    prepare_generation,
    render_prompt,
    start_deltas,
    with_deadline,
)
from pensieve.api.model_pool import pool_of, services_for
from pensieve.api.responses import json_response
from pensieve.api.session_key import routing_hint_for
from pensieve.api.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_stream, with_pings
from pensieve.api.state import services_of
from pensieve.chat import collect_message, message_events
from pensieve.engine.routing import routing_hint
from pensieve.protocol.context_management import BetaCountTokensContextManagementResponse
from pensieve.protocol import (
    MessageCountTokensParams,
    MessageCreateParams,
    MessageTokensCount,
)

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_api_key)])

T = TypeVar("T")



@router.post("/v1/messages")
async def create_message(request: Request) -> Response:
    services = services_of(request)
    arrived = asyncio.get_running_loop().time()
    if pool_of(request) is None:  # several models: services_for asks the named model's engine
        check_admission(services)  # before the body is read, parsed or rendered
    body = parse_body(MessageCreateParams, await read_body(request, services.config.max_body_bytes,
                                                                 services.config.body_timeout_s))
    request_id: str = request.state.request_id
    services = await services_for(request, body.model)  # the model it names (several: a pool)
    request.state.model = services.config.resolve_model(body.model)  # the served id, for metrics
    compacted = await compaction_response(services, body, request_id)  # the compaction beta
    if compacted is not None:
        return compacted
    prepared = await prepare_generation(services, body, request_id)
    log.debug("%s: %d prompt tokens, max_tokens %d, stream=%s",
              request_id, prepared.prompt.num_tokens, prepared.params.max_tokens, bool(body.stream))
    routing_hint.set(routing_hint_for(request.headers, body))  # for an upstream backend's router
    deltas = await start_deltas(services.engine, prepared)
    deltas = request.app.state.metrics.observe_generation(deltas, prepared, services.config.model_id, "messages")
    timeout_s = services.config.request_timeout_s
    if timeout_s is not None:
        deltas = with_deadline(deltas, arrived + timeout_s, timeout_s)
    events = message_events(deltas, prepared.event_builder())
    if body.stream:
        stream = sse_stream(with_pings(events, services.config.ping_interval_s), request_id)
        return StreamingResponse(stream, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    message = await _unless_disconnected(request, collect_message(events))
    if message is None:
        log.info("%s: client disconnected; generation aborted", request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return json_response(message)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    services = services_of(request)
    body = parse_body(MessageCountTokensParams, await read_body(request, services.config.max_body_bytes,
                                                                 services.config.body_timeout_s))
    prompt = await render_prompt(await services_for(request, body.model), body)
    original = prompt.original_input_tokens  # set where context_management edited the prompt
    return json_response(MessageTokensCount(
        input_tokens=prompt.num_tokens,
        context_management=(None if original is None
                            else BetaCountTokensContextManagementResponse(original_input_tokens=original))))


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None after cancelling it when the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
