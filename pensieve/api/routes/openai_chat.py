"""``POST /v1/chat/completions`` (streaming and not): OpenAI's chat API over the same chat
layer, engine and prefix cache as ``/v1/messages`` (``api/openai_request.py`` says how)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from pensieve.api.auth import require_api_key
from pensieve.api.body import CLIENT_CLOSED_REQUEST, parse_body, read_body
from pensieve.api.generation import check_admission, prepare_generation, start_deltas, with_deadline
from pensieve.api.openai_request import openai_sampling, to_message_params
from pensieve.api.openai_stream import ChunkWriter, chat_completion, chat_sse, new_completion_id, openai_sse
from pensieve.api.model_pool import pool_of, services_for
from pensieve.api.responses import json_response
from pensieve.api.routes.messages import _unless_disconnected
from pensieve.api.sse import SSE_HEADERS, SSE_MEDIA_TYPE, with_pings
from pensieve.api.state import services_of
from pensieve.chat import collect_message, message_events
from pensieve.protocol.openai import ChatCompletionCreateParams

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    services = services_of(request)
    arrived = asyncio.get_running_loop().time()
    if pool_of(request) is None:  # several models: services_for asks the named model's engine
        check_admission(services)  # before the body is read, parsed or rendered
    body = parse_body(ChatCompletionCreateParams, await read_body(request, services.config.max_body_bytes,
                                                                  services.config.body_timeout_s))
    services = await services_for(request, body.model)  # the model it names (several: a pool)
    request.state.model = services.config.resolve_model(body.model)  # the served id, for metrics
    request_id: str = request.state.request_id
    prepared = await prepare_generation(services, to_message_params(body), request_id)
    params = openai_sampling(prepared.params, body)
    prepared = replace(prepared, params=params)
    log.debug("%s: chat completion, %d prompt tokens, max_tokens %d, stream=%s",
              request_id, prepared.prompt.num_tokens, params.max_tokens, bool(body.stream))
    deltas = await start_deltas(services.engine, prepared)
    deltas = request.app.state.metrics.observe_generation(deltas, prepared, services.config.model_id, "chat.completions")
    timeout_s = services.config.request_timeout_s
    if timeout_s is not None:
        deltas = with_deadline(deltas, arrived + timeout_s, timeout_s)
    events = message_events(deltas, prepared.event_builder())
    completion_id = new_completion_id()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = ChunkWriter(completion_id, body.model, include_usage=include_usage)
        parts = chat_sse(with_pings(events, services.config.ping_interval_s), writer)
        return StreamingResponse(openai_sse(parts, request_id), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    message = await _unless_disconnected(request, collect_message(events))
    if message is None:
        log.info("%s: client disconnected; generation aborted", request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return json_response(chat_completion(message, completion_id, body.model))
