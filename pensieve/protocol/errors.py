"""The error envelope: ``{"type": "error", "error": {"type": …, "message": …}}``."""

from __future__ import annotations

from typing import Literal

from pensieve.protocol.base import ResponseModel

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "timeout_error",
    "api_error",
    "overloaded_error",
]


class ErrorObject(ResponseModel):
    type: ErrorType
    message: str


class ErrorResponse(ResponseModel):
    type: Literal["error"] = "error"
    error: ErrorObject
    request_id: str | None = None
