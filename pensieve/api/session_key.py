"""The session a Messages request belongs to: Claude Code's header or ``metadata.user_id``.

Claude Code sends ``X-Claude-Code-Session-Id`` on every request of a session and repeats the
id inside ``metadata.user_id`` (a JSON object with ``session_id`` in 2.1.x; older versions
wrote ``user_<hash>_account_<uuid>_session_<uuid>``). Other clients may send neither.

Side calls (a conversation title, a compaction summary) come from the same session but are
not turns of it: Claude Code sends its main-loop turns with the session's tools and these
without any, so a request of a session that carries no tools is routed as a side call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from pensieve.engine.routing import RoutingHint
from pensieve.protocol import MessageCreateParams

SESSION_HEADER = "x-claude-code-session-id"
_LEGACY = re.compile(r"session_([0-9A-Za-z-]{8,})")
MAX_KEY_CHARS = 200  # a longer header is cut: it is only hashed


def session_id(headers: Mapping[str, str], metadata: object) -> str | None:
    """The session id from the header, else from ``metadata.user_id``; None when neither."""
    value = (headers.get(SESSION_HEADER) or "").strip()
    if value:
        return value[:MAX_KEY_CHARS]
    user_id = _user_id(metadata)
    if not user_id:
        return None
    try:
        parsed = json.loads(user_id)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        found = parsed.get("session_id")
        return str(found)[:MAX_KEY_CHARS] if found else None
    match = _LEGACY.search(user_id)
    return match.group(1) if match else None


def _user_id(metadata: object) -> str | None:
    if metadata is None:
        return None
    if isinstance(metadata, Mapping):
        value = metadata.get("user_id")
    else:
        value = getattr(metadata, "user_id", None)
    return value if isinstance(value, str) else None


def routing_hint_for(headers: Mapping[str, str], body: MessageCreateParams) -> RoutingHint:
    """The routing hint of one Messages request (see the module docstring)."""
    session = session_id(headers, body.metadata)
    if session is None:
        return RoutingHint()
    return RoutingHint(session_key=session, side_call=not body.tools)
