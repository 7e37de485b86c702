"""Every failure leaves as the API's envelope ``{"type":"error","error":{type,message}}``.

``api_error_for`` is the one table from exceptions to (status, type, message); HTTP error
responses and mid-stream ``error`` events both use it. Tracebacks go to the log, never to
the client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pensieve.chat import ChatTemplateError, GenerationFailed
from pensieve.chat.context_edits import ContextManagementError
from pensieve.engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    EngineRequestRejected,
    PromptTooLongError,
)
from pensieve.protocol import ErrorObject, ErrorResponse, ErrorType
from pensieve.protocol.openai import OpenAIErrorObject, OpenAIErrorResponse

log = logging.getLogger(__name__)

STATUS_ERROR_TYPES: dict[int, ErrorType] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ERROR_TYPE_STATUS: dict[str, int] = {t: s for s, t in STATUS_ERROR_TYPES.items() if s != 405}

MAX_REPORTED_ERRORS = 5
OVERLOAD_RETRY_AFTER_S = 2  # the retry-after header of a 529 (Claude Code retries a 529 thrice)


@dataclass
class ApiError(Exception):
    """An error to report to the client as is."""

    status: int
    type: ErrorType
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None  # the request field at fault (the OpenAI envelope names it)

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"


def invalid_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def prompt_too_long(num_tokens: int, max_tokens: int) -> ApiError:
    # Claude Code parses this exact sentence to decide to compact the conversation.
    return invalid_request(f"prompt is too long: {num_tokens} tokens > {max_tokens} maximum")


def overloaded(message: str) -> ApiError:
    return ApiError(529, "overloaded_error", message, {"retry-after": str(OVERLOAD_RETRY_AFTER_S)})


def request_timed_out(timeout_s: float) -> ApiError:
    return ApiError(504, "timeout_error", f"the request did not finish within its {timeout_s:g}-second "
                    "deadline and was stopped")


def api_error_for(exc: BaseException) -> ApiError:
    """The client-facing error for any exception (unknown ones become a bare 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return prompt_too_long(exc.num_tokens, exc.max_tokens)
    if isinstance(exc, EngineOverloadedError):
        return overloaded(str(exc) or "Overloaded")
    if isinstance(exc, EngineRequestRejected):
        return invalid_request(str(exc))
    if isinstance(exc, EngineDeadError):
        return ApiError(500, "api_error", "the inference engine stopped; restart the server")
    if isinstance(exc, ContextManagementError):
        return invalid_request(str(exc))
    if isinstance(exc, ChatTemplateError):
        return invalid_request(f"the conversation cannot be rendered for this model: {exc}")
    if isinstance(exc, GenerationFailed):
        return ApiError(ERROR_TYPE_STATUS.get(exc.error.type, 500), exc.error.type, exc.error.message)
    if isinstance(exc, ValidationError):
        return invalid_request(validation_message(exc.errors(include_url=False)))
    return ApiError(500, "api_error", "Internal server error")


def error_body(error: ApiError, request_id: str | None, path: str | None = None) -> dict[str, Any]:
    """The envelope: OpenAI's ``{"error": {message, type, param, code}}`` on the OpenAI
    routes (``path``), else the Anthropic one."""
    if path is not None and is_openai_path(path):
        return openai_error_body(error)
    envelope = ErrorResponse(error=ErrorObject(type=error.type, message=error.message), request_id=request_id)
    return envelope.model_dump(mode="json")


def error_response(error: ApiError, request_id: str | None, path: str | None = None) -> Response:
    return JSONResponse(error_body(error, request_id, path), status_code=error.status, headers=error.headers)


def validation_message(errors: Sequence[Any], body: Any = None) -> str:
    """Pydantic errors as one clause per problem, naming the field: ``messages.0.content: Field required``.

    ``body`` (the parsed JSON) lets union member names that pydantic puts into ``loc``
    (``user``, ``text``, ``list[…]``) be told from real field names and left out. Of a
    union's alternatives, only those the input could have meant are reported.
    """
    located = [(_readable_loc(tuple(err.get("loc", ())), body), err) for err in errors]
    locs = [loc for loc, _ in located]
    # "should be a valid string" is noise when the input was a list whose items are wrong.
    located = [(loc, err) for loc, err in located if not (err.get("type") in _TYPE_ERRORS and _has_deeper(loc, locs))]
    messages: dict[str, list[str]] = {}
    for loc, err in located:
        messages.setdefault(loc, []).append(str(err.get("msg", "invalid value")))
    parts = [f"{loc}: {_either(msgs)}" if loc else _either(msgs) for loc, msgs in messages.items()]
    if len(parts) > MAX_REPORTED_ERRORS:
        parts = parts[:MAX_REPORTED_ERRORS] + [f"and {len(parts) - MAX_REPORTED_ERRORS} more errors"]
    return "; ".join(parts)


def _has_deeper(loc: str, locs: list[str]) -> bool:
    return any(other != loc and (not loc or other.startswith(loc + ".")) for other in locs)


_TYPE_ERRORS = frozenset({"string_type", "list_type", "dict_type", "model_type", "model_attributes_type"})
_MEMBER_NAMES = frozenset({"str", "int", "float", "bool", "none"})
_SHOULD_BE = "Input should be "


def _either(messages: list[str]) -> str:
    """``Input should be a valid string`` + ``… a valid array`` → ``… a valid string or a valid array``."""
    if len(messages) > 1 and all(m.startswith(_SHOULD_BE) for m in messages):
        return _SHOULD_BE + " or ".join(m[len(_SHOULD_BE):] for m in messages)
    return "; ".join(dict.fromkeys(messages))


def _readable_loc(loc: tuple[Any, ...], body: Any) -> str:
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    kept: list[str] = []
    node = body
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(part, str) and ("[" in part or part in _MEMBER_NAMES):
            continue  # a union member's type name
        elif body is not None and not last:
            continue  # a union tag, not a key of the input
        kept.append(str(part))
    return ".".join(kept)


def install_error_handlers(app: FastAPI) -> None:
    """Envelope for our errors, FastAPI's validation errors and Starlette's HTTP errors.

    Exceptions nobody handles are turned into a 500 by ``RequestIdMiddleware``.
    """

    async def on_api_error(request: Request, exc: Exception) -> Response:
        error = api_error_for(exc)
        if error.status >= 500:
            log.error("request %s failed: %s", _request_id(request), exc)
        return error_response(error, _request_id(request), request.url.path)

    async def on_request_validation(request: Request, exc: RequestValidationError) -> Response:
        error = invalid_request(validation_message(exc.errors()))
        return error_response(error, _request_id(request), request.url.path)

    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        fallback: ErrorType = "api_error" if exc.status_code >= 500 else "invalid_request_error"
        kind = STATUS_ERROR_TYPES.get(exc.status_code, fallback)
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"Not found: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        headers = dict(exc.headers or {})
        return error_response(ApiError(exc.status_code, kind, message, headers), _request_id(request),
                              request.url.path)

    for exc_type in (ApiError, PromptTooLongError, EngineOverloadedError, EngineDeadError, EngineRequestRejected,
                     ChatTemplateError, ContextManagementError, GenerationFailed, ValidationError):
        app.add_exception_handler(exc_type, on_api_error)
    app.add_exception_handler(RequestValidationError, on_request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_exception)  # type: ignore[arg-type]


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


# The routes that answer in OpenAI's shape, errors included.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")
# Anthropic error types → OpenAI's (those not listed keep their name).
_OPENAI_TYPES = {"api_error": "server_error", "overloaded_error": "server_error",
                 "not_found_error": "invalid_request_error", "timeout_error": "timeout",
                 "request_too_large": "invalid_request_error"}


def is_openai_path(path: str) -> bool:
    return path.rstrip("/") in OPENAI_PATHS


def openai_error_body(error: ApiError) -> dict[str, Any]:
    """``{"error": {message, type, param, code}}``; ``code`` keeps the Anthropic type where
    OpenAI's is coarser (``overloaded_error``, ``not_found_error``)."""
    kind = _OPENAI_TYPES.get(error.type, error.type)
    code = None if kind == error.type else error.type
    if error.type == "not_found_error" and error.message.startswith("model:"):
        code = "model_not_found"
    body = OpenAIErrorResponse(error=OpenAIErrorObject(message=error.message, type=kind,
                                                       param=error.param, code=code))
    return body.model_dump(mode="json")
