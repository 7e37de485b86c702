"""The Message Batches wire types, named as the anthropic SDK names them
(``anthropic.types.messages``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pensieve.protocol.base import ResponseModel

CUSTOM_ID_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class BatchRequestParam(BaseModel):
    """One entry of a create request. ``params`` stays a plain object here: an entry whose
    params are invalid ends ``errored`` on its own instead of failing the whole batch."""

    model_config = ConfigDict(extra="allow")
    custom_id: str = Field(pattern=CUSTOM_ID_PATTERN)
    params: dict[str, Any]


class BatchCreateParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    requests: list[BatchRequestParam] = Field(min_length=1)


class MessageBatchRequestCounts(ResponseModel):
    canceled: int = 0
    errored: int = 0
    expired: int = 0
    processing: int = 0
    succeeded: int = 0


class MessageBatch(ResponseModel):
    id: str
    type: Literal["message_batch"] = "message_batch"
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: MessageBatchRequestCounts
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None = None
    cancel_initiated_at: datetime | None = None
    archived_at: datetime | None = None
    results_url: str | None = None


class MessageBatchList(ResponseModel):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeletedMessageBatch(ResponseModel):
    id: str
    type: Literal["message_batch_deleted"] = "message_batch_deleted"
