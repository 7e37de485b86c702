"""Does a request ask for prompt caching? (``cache_control`` anywhere, or at the top level.)

Pensieve caches every prefix anyway; a request that asks is a hint to keep its prefix longer
than others' (Claude Code marks its system prompt and tools; side requests usually don't).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pensieve.protocol.requests import ConversationParams


def _has_cache_control(item: Any) -> bool:
    if getattr(item, "cache_control", None) is not None:
        return True
    extra = getattr(item, "model_extra", None) or {}
    return extra.get("cache_control") is not None


def _blocks(request: ConversationParams) -> Iterable[Any]:
    yield request
    if isinstance(request.system, list):
        yield from request.system
    yield from request.tools or ()
    for message in request.messages:
        if isinstance(message.content, list):
            yield from message.content


def wants_prompt_cache(request: ConversationParams) -> bool:
    return any(_has_cache_control(item) for item in _blocks(request))


def cache_ttl(request: ConversationParams) -> str:
    """The lifetime the request's cache writes are counted under in ``usage.cache_creation``:
    ``"1h"`` when any ``cache_control`` (the top-level one included) asks for an hour, else
    the API's default ``"5m"``."""
    for item in _blocks(request):
        control = getattr(item, "cache_control", None)
        if control is None:
            control = (getattr(item, "model_extra", None) or {}).get("cache_control")
        ttl = control.get("ttl") if isinstance(control, dict) else getattr(control, "ttl", None)
        if ttl == "1h":
            return "1h"
    return "5m"
