"""``GET /v1/models`` and ``GET /v1/models/{model_id}``."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from pensieve.api.auth import require_api_key
from pensieve.api.config import ApiConfig
from pensieve.api.generation import check_model
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
async def list_models(request: Request) -> Response:
    config = services_of(request).config
    info = model_info(config, config.model_id)
    page = ModelListResponse(data=[info], has_more=False, first_id=info.id, last_id=info.id)
    return json_response(page)


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> Response:
    """Any name the server answers to (alias, ``claude-*``) resolves, under the asked id."""
    config = services_of(request).config
    check_model(config, model_id)
    return json_response(model_info(config, model_id))
