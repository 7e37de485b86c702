"""Which conversation a generation belongs to, for backends that route by it.

The API layer knows the session (a header, ``metadata.user_id``); a backend that fronts
several upstream replicas needs it to keep a session's turns on the replica that holds its
prefix cache. It travels beside the ``generate`` call, not through it: a context variable set
by the route before the generation starts (asyncio copies it into the tasks that run the
stream). The in-process engine ignores it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingHint:
    """``session_key``: the conversation's stable id (None: none was sent). ``side_call``: a
    request outside the main conversation (a title, a summary), routed under its own key so
    that it does not displace the session's cached prefix."""

    session_key: str | None = None
    side_call: bool = False

    @property
    def key(self) -> str | None:
        """The key a router hashes: the session's, or the session's side-call key."""
        if self.session_key is None:
            return None
        return f"{self.session_key}/side" if self.side_call else self.session_key


routing_hint: ContextVar[RoutingHint] = ContextVar("pensieve_routing_hint", default=RoutingHint())
