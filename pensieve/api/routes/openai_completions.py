"""``POST /v1/completions`` (streaming and not): a prompt string or token ids, continued as
is — no chat template — on the same engine and prefix cache as the chat routes."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from pensieve.api.auth import require_api_key
from pensieve.api.body import CLIENT_CLOSED_REQUEST, parse_body, read_body
from pensieve.api.errors import prompt_too_long
from pensieve.api.generation import (
    PreparedGeneration,
    check_admission,
    check_model,
    new_message_id,
    start_deltas,
    with_deadline,
)
from pensieve.api.openai_request import check_unsupported, invalid_param, stop_list
from pensieve.api.openai_stream import completion_sse, new_completion_id, openai_sse, text_completion
from pensieve.api.model_pool import pool_of, services_for
from pensieve.api.responses import json_response
from pensieve.api.routes.messages import _unless_disconnected
from pensieve.api.sse import SSE_HEADERS, SSE_MEDIA_TYPE, with_pings
from pensieve.api.state import Services, services_of
from pensieve.chat import RenderedPrompt, collect_message, message_events
from pensieve.engine.types import SamplingParams
from pensieve.protocol.openai import CompletionCreateParams

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_api_key)])

DEFAULT_MAX_TOKENS = 16  # the API's default for completions


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    services = services_of(request)
    arrived = asyncio.get_running_loop().time()
    if pool_of(request) is None:  # several models: services_for asks the named model's engine
        check_admission(services)  # before the body is read, parsed or rendered
    body = parse_body(CompletionCreateParams, await read_body(request, services.config.max_body_bytes,
                                                              services.config.body_timeout_s))
    services = await services_for(request, body.model)  # the model it names (several: a pool)
    request.state.model = services.config.resolve_model(body.model)  # the served id, for metrics
    check_unsupported(body)
    check_model(services.config, body.model)
    prompt = await run_in_threadpool(_prompt, services, body)
    prepared = PreparedGeneration(request.state.request_id, new_message_id(), body.model, prompt,
                                  _params(services, body, prompt.num_tokens))
    deltas = await start_deltas(services.engine, prepared)
    deltas = request.app.state.metrics.observe_generation(deltas, prepared, services.config.model_id, "completions")
    timeout_s = services.config.request_timeout_s
    if timeout_s is not None:
        deltas = with_deadline(deltas, arrived + timeout_s, timeout_s)
    events = message_events(deltas, prepared.event_builder())
    completion_id = new_completion_id("cmpl-")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        parts = completion_sse(with_pings(events, services.config.ping_interval_s), completion_id,
                               body.model, include_usage)
        return StreamingResponse(openai_sse(parts, prepared.request_id), media_type=SSE_MEDIA_TYPE,
                                 headers=SSE_HEADERS)
    message = await _unless_disconnected(request, collect_message(events))
    if message is None:
        log.info("%s: client disconnected; generation aborted", prepared.request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return json_response(text_completion(message, completion_id, body.model))


def _prompt(services: Services, body: CompletionCreateParams) -> RenderedPrompt:
    """The prompt's ids: a string is encoded as text (BOS prepended where the model wants
    one); token ids are taken as they are (checked against the vocabulary)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid_param("prompt", f"{len(prompt)} prompts in one request are not supported; send one")
        prompt = prompt[0]
    tokenizer = services.renderer.tokenizer
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
        if tokenizer.add_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        text = prompt
    else:
        ids = [int(i) for i in prompt]
        vocab = getattr(tokenizer, "vocab_size", None)
        bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
        if bad:
            raise invalid_param("prompt", f"prompt: token id {bad[0]} is outside the vocabulary")
        text = ""
    if not ids:
        raise invalid_param("prompt", "prompt: the prompt is empty")
    context = services.config.context_length
    if len(ids) >= context:
        raise prompt_too_long(len(ids), context)
    return RenderedPrompt(text=text, token_ids=ids)


def _params(services: Services, body: CompletionCreateParams, num_prompt_tokens: int) -> SamplingParams:
    config = services.config
    limit = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    return SamplingParams(
        max_tokens=min(limit, config.context_length - num_prompt_tokens),
        temperature=config.default_temperature if body.temperature is None else body.temperature,
        top_p=getattr(config, "default_top_p", 1.0) if body.top_p is None else body.top_p,
        top_k=getattr(config, "default_top_k", 0) if body.top_k is None else body.top_k,
        seed=body.seed,
        stop_sequences=tuple(s for s in stop_list(body.stop) if s),
        dry=config.dry,
    )
