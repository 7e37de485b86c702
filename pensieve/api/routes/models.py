"""``GET /v1/models`` and ``GET /v1/models/{model_id}``."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from pensieve.api.auth import require_api_key
from pensieve.api.config import ApiConfig
from pensieve.api.errors import ApiError, invalid_request
from pensieve.api.generation import check_model
from pensieve.api.model_pool import pool_of
from pensieve.api.responses import json_response
from pensieve.api.state import services_of
from pensieve.protocol import ModelInfo, ModelListResponse

router = APIRouter(dependencies=[Depends(require_api_key)])

# The API reports a release date; a local model has none, the epoch stands for "unknown".
UNKNOWN_RELEASE = datetime(1970, 1, 1, tzinfo=timezone.utc)


def model_info(config: ApiConfig, model_id: str) -> ModelInfo:
    return ModelInfo(
        id=model_id,
        display_name=config.model_id,
        created_at=UNKNOWN_RELEASE,
        max_input_tokens=config.context_length,
        max_tokens=config.context_length,
        sampling_defaults=config.sampling_defaults(),
    )


@router.get("/v1/models")
async def list_models(request: Request, limit: int = 20, before_id: str | None = None,
                      after_id: str | None = None) -> Response:
    """One page, as the API pages: ``limit`` (1–1000, default 20) ids after ``after_id`` or
    before ``before_id``. With several models (a pool): a ``claude-…`` id per route, then
    each model's own id."""
    if not 1 <= limit <= 1000:
        raise invalid_request(f"limit: must be between 1 and 1000, got {limit}")
    infos = _all_models(request)
    ids = [info.id for info in infos]
    start, end = 0, len(infos)
    if after_id is not None:
        start = ids.index(after_id) + 1 if after_id in ids else len(ids)
    if before_id is not None:
        end = ids.index(before_id) if before_id in ids else 0
        start = max(start, end - limit)
    data = infos[start:min(end, start + limit)]
    has_more = (start + len(data) < end) if before_id is None else start > 0
    page = ModelListResponse(data=data, has_more=has_more, first_id=data[0].id if data else None,
                             last_id=data[-1].id if data else None)
    return json_response(page)


def _all_models(request: Request) -> list[ModelInfo]:
    pool = pool_of(request)
    if pool is None:
        config = services_of(request).config
        return [model_info(config, config.model_id)]
    infos = []
    for listed, target in pool.listed_ids():
        model = pool.loaded.get(target)
        if model is not None:
            infos.append(model_info(model.services.config, listed))
        else:
            entry = next(e for e in pool.entries if e.id == target)
            infos.append(ModelInfo(id=listed, display_name=target, created_at=UNKNOWN_RELEASE,
                                   max_input_tokens=entry.context_length, max_tokens=entry.context_length))
    return infos


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> Response:
    """Any name the server answers to (alias, ``claude-*``, a route) resolves, under the
    asked id (with several models: without loading it)."""
    pool = pool_of(request)
    if pool is not None:
        target = pool.resolve(model_id)
        if target is None:
            raise ApiError(404, "not_found_error", f"model: {model_id}")
        info = next(i for i in _all_models(request) if i.id == target)
        return json_response(info.model_copy(update={"id": model_id}))
    config = services_of(request).config
    check_model(config, model_id)
    return json_response(model_info(config, model_id))
