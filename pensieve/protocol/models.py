"""``GET /v1/models`` types."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pensieve.protocol.base import ResponseModel


class ModelInfo(ResponseModel):
    id: str
    type: Literal["model"] = "model"
    display_name: str
    created_at: datetime
    lifecycle: Literal["active", "deprecated", "retired"] = "active"
    max_input_tokens: int | None = None
    max_tokens: int | None = None
    # Pensieve's extra: what a request that sends no temperature / top_p / top_k gets
    sampling_defaults: dict[str, float | int] | None = None


class ModelListResponse(ResponseModel):
    """One page of models (the SDK reads it as ``SyncPage[ModelInfo]``)."""

    data: list[ModelInfo]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
