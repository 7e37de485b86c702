"""uvicorn's HTTP/1.1 protocol with a deadline on request heads.

uvicorn (h11) waits for ever on a connection whose request line and headers never finish: its
keep-alive timer is cancelled by the first byte, and nothing else is armed. A peer that opens
connections and trickles half a header (auth runs only after the head and body, so anyone who
can reach the port can do it) would hold them all. Here every connection must complete each
request head within ``header_timeout_s`` of the connection opening or the previous response
ending; otherwise it is closed, quietly (one DEBUG line). Bodies have their own deadline in
the API layer (``ApiConfig.body_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
DEFAULT_HEADER_TIMEOUT_S = 30.0


class HeaderTimeoutProtocol(H11Protocol):
    """``H11Protocol`` plus the head deadline. ``header_timeout_s`` is a class attribute so
    that uvicorn can build the protocol itself (``protocol_class(header_timeout_s=…)``)."""

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_cycle: object | None = None  # the cycle in place when the timer was armed

    @classmethod
    def with_timeout(cls, seconds: float) -> type[HeaderTimeoutProtocol]:
        if seconds <= 0:
            raise ValueError(f"the header timeout must be positive, got {seconds}")
        return type(cls.__name__, (cls,), {"header_timeout_s": float(seconds)})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._waiting_cycle:
            self._disarm()  # a new request's head arrived: the body has its own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._waiting_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if self.cycle is self._waiting_cycle and not self.transport.is_closing():
            log.debug("closing %s: no complete request head within %.0f s",
                      self.client, self.header_timeout_s)
            self.transport.close()
