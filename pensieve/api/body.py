"""Reading request bodies: a size limit (413) and validation into protocol types (400)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from pensieve.api.errors import ApiError, invalid_request, validation_message

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=BaseModel)

BODY_TIMEOUT_S = 60.0  # the whole body must arrive within this (Claude Code sends ~100 KB at once)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"


async def read_body(request: Request, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The raw body; 413 ``request_too_large`` beyond ``max_bytes`` (checked as it arrives);
    408 when it has not fully arrived within ``timeout_s`` (a stalled or slow-drip client);
    499, quietly, when the client leaves before sending all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(size, max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, "timeout_error", f"the request body did not arrive within {timeout_s:g} s "
                       f"({size} bytes received)") from None
    except ClientDisconnect:
        log.info("client left after %d bytes of the request body (499)", size)
        raise ApiError(CLIENT_CLOSED_REQUEST, "invalid_request_error",
                       "the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


def parse_body(model: type[ModelT], raw: bytes) -> ModelT:
    """``raw`` validated as ``model``; 400 ``invalid_request_error`` naming what is wrong."""
    if not raw.strip():
        raise invalid_request("the request body is empty; a JSON object is required")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0].get("type") == "json_invalid":
            raise invalid_request(f"the request body is not valid JSON: {errors[0].get('msg')}") from None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        raise invalid_request(validation_message(errors, body)) from None


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"request body of {size} bytes exceeds the {limit}-byte limit")
