"""API keys: ``x-api-key: K`` (ANTHROPIC_API_KEY) or ``Authorization: Bearer K``
(ANTHROPIC_AUTH_TOKEN) — clients send either, so both are accepted."""

from __future__ import annotations

import hmac

from fastapi import Request

from pensieve.api.errors import ApiError
from pensieve.api.state import services_of


def presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: passes when no keys are configured or a configured key is presented."""
    keys = services_of(request).config.api_keys
    if not keys:
        return
    key = presented_key(request)
    if key is None:
        raise ApiError(401, "authentication_error", "missing API key: send x-api-key or Authorization: Bearer")
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        raise ApiError(401, "authentication_error", "invalid x-api-key")
