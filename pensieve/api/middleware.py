"""Outermost ASGI layer: a ``request-id`` on every response, and the last-resort 500.

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming responses pass through untouched and
a client disconnect still cancels the handler.
"""

from __future__ import annotations

import json
import logging
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pensieve.api.errors import ApiError, error_body

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "request-id"


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


class RequestIdMiddleware:
    """Names each request (``scope["state"]["request_id"]``), adds the ``request-id``
    header, and answers 500 ``api_error`` for any exception no handler took."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", request_id)
            if not started:
                await _send_error(send_with_id, ApiError(500, "api_error", "Internal server error"), request_id,
                                  scope.get("path"))


async def _send_error(send: Send, error: ApiError, request_id: str, path: str | None = None) -> None:
    body = json.dumps(error_body(error, request_id, path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
