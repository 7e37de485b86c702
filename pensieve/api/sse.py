"""Server-sent events: each typed event is serialised once, as ``event: X`` + ``data: {json}``.

``with_pings`` interleaves ``ping`` events while the next event is slow to come (a long
prefill, a stalled engine), so clients and proxies do not time the connection out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import anyio

from pensieve.api.errors import api_error_for
from pensieve.chat.stream import close_iterator
from pensieve.protocol import ErrorEvent, ErrorObject, PingEvent, StreamEvent

log = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream"


def encode_event(event: StreamEvent) -> bytes:
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()


async def with_pings(events: AsyncIterator[StreamEvent], interval_s: float) -> AsyncIterator[StreamEvent]:
    """``events`` as they come, plus a ``PingEvent`` after every ``interval_s`` of silence.

    The next event is awaited in a task that survives the ping timeouts (a ``wait_for``
    would cancel it, and with it the generation). Closing this iterator cancels that task,
    which aborts the engine request upstream.
    """
    pending: asyncio.Future[StreamEvent] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield PingEvent()
                continue
            finished, pending = pending, None
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        # Shielded: when the client went away we are being cancelled, and the cleanup that
        # aborts the engine request must still run to its end.
        with anyio.CancelScope(shield=True):
            if pending is not None:
                pending.cancel()
                await asyncio.wait({pending})
            await close_iterator(events)


async def sse_stream(events: AsyncIterator[StreamEvent], request_id: str) -> AsyncIterator[bytes]:
    """The response body: encoded events; an exception mid-stream becomes an ``error``
    event (the 200 is already sent), logged with the request id."""
    try:
        async for event in events:
            yield encode_event(event)
    except Exception as exc:
        error = api_error_for(exc)
        if error.status >= 500:
            log.exception("request %s failed while streaming", request_id)
        yield encode_event(ErrorEvent(error=ErrorObject(type=error.type, message=error.message)))
    finally:
        with anyio.CancelScope(shield=True):
            await close_iterator(events)
