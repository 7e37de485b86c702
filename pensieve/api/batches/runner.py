"""Runs the requests of unfinished batches through the engine, in the background.

One asyncio task on the server's event loop hands up to ``concurrency`` batch requests at a
time to the same generation path as ``POST /v1/messages`` (validation, render, grammar,
engine, the collected ``Message``), at ``BACKGROUND_PRIORITY``: the scheduler admits an
interactive request before any waiting batch request and preempts a running one to seat it.
Each finished request's result is stored before the next is started in its place.

A request that fails on its own (invalid params, a prompt too long…) ends ``errored`` with the
API's error envelope; the batch goes on. A request cut short because the server is stopping
(the engine drained or dead, the task cancelled) records nothing and runs again after the
restart; one refused as overloaded is tried again a moment later.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from pensieve.api.batches.store import BatchRecord, BatchStore, PendingRequest, now
from pensieve.api.body import parse_body
from pensieve.api.compaction import compaction_response
from pensieve.api.errors import api_error_for, error_body, invalid_request
from pensieve.api.generation import prepare_generation, start_deltas
from pensieve.api.state import Services
from pensieve.chat import collect_message, message_events
from pensieve.engine.types import BACKGROUND_PRIORITY
from pensieve.protocol import MessageCreateParams

log = logging.getLogger(__name__)

RETRY_DELAY_S = 1.0  # after an overloaded refusal
IDLE_CHECK_S = 60.0  # how often an idle runner looks for expired batches


class Interrupted(Exception):
    """The server is stopping: the request is left to run again after the restart."""


class RetryLater(Exception):
    """The engine refused the request for now (overloaded)."""


class BatchRunner:
    def __init__(self, store: BatchStore, services: Services, concurrency: int,
                 services_for: Callable[[str], Awaitable[Services]] | None = None) -> None:
        self.store = store
        self.services = services
        # the Services of the model a request names (a model pool); default: ``services``
        self.services_for = services_for
        self.concurrency = concurrency
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._queues: dict[str, deque[PendingRequest]] = {}  # batch id → requests to start
        self._stopping = False

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:  # noqa: ARG002 - FastAPI's signature
        self.ensure_started()
        try:
            yield
        finally:
            await self.stop()

    def ensure_started(self) -> None:
        """Start the loop (on the running event loop) if it is not running yet."""
        if self._task is None and not self._stopping:
            self.store.load()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="pensieve-batches")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Stop launching and abandon the requests in flight (they stay pending on disk)."""
        self._stopping = True
        tasks = list(self._inflight.values()) + ([self._task] if self._task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def cancel(self, record: BatchRecord) -> None:
        """Stop ``record``'s requests in flight; every request without a result ends
        ``canceled`` and the batch ends."""
        self.store.mark_canceling(record)
        tasks = [t for (batch_id, _), t in self._inflight.items() if batch_id == record.id]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if record.ended_at is None:
            self.store.end(record, "canceled")
            log.info("batch %s canceled", record.id)

    async def _loop(self) -> None:
        while not self._stopping and not self._engine_stopped():
            try:
                self._expire_due()
                self._launch()
            except OSError:  # a full or broken disk: say so, and try again later
                log.exception("batch runner: storage failed")
            self._wake.clear()
            waits = [*self._inflight.values(), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waits, timeout=IDLE_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waits[-1].cancel()

    def _launch(self) -> None:
        for record in self.store.unfinished():
            if record.cancel_initiated_at is not None:
                continue  # cancel() is ending it
            queue = self._queues.get(record.id)
            if queue is None:
                queue = self._queues[record.id] = deque(self.store.pending(record))
            while queue and len(self._inflight) < self.concurrency:
                request = queue.popleft()
                key = (request.batch_id, request.custom_id)
                if key not in self._inflight and request.custom_id not in record.done:
                    self._inflight[key] = asyncio.ensure_future(self._run(record, request))
            if len(self._inflight) >= self.concurrency:
                return
        live = {record.id for record in self.store.unfinished()}
        for batch_id in [b for b in self._queues if b not in live]:
            del self._queues[batch_id]

    async def _run(self, record: BatchRecord, request: PendingRequest) -> None:
        key = (request.batch_id, request.custom_id)
        try:
            result = await self._result_of(record, request)
            if record.ended_at is None and self.store.get(record.id) is record:
                self.store.record_result(record, request.custom_id, result)
                if len(record.done) == record.num_requests:
                    self.store.end(record, "canceled")  # nothing is left to cancel
                    log.info("batch %s ended: %s", record.id, record.counts().model_dump())
        except Interrupted:
            log.info("batch %s: %s left for the restart", record.id, request.custom_id)
        except RetryLater:
            await asyncio.sleep(RETRY_DELAY_S)
            self._inflight.pop(key, None)
            self._queues.setdefault(record.id, deque()).appendleft(request)
        finally:
            self._inflight.pop(key, None)
            self.wake()

    async def _result_of(self, record: BatchRecord, request: PendingRequest) -> dict[str, Any]:
        request_id = f"{record.id}:{request.custom_id}"
        try:
            message = await self._generate(request, request_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes this entry's result
            if self._stopping or self._engine_stopped():
                raise Interrupted from exc
            error = api_error_for(exc)
            if error.status == 529:
                raise RetryLater from exc
            if error.status >= 500:
                log.error("batch request %s failed", request_id, exc_info=exc)
            return {"type": "errored", "error": error_body(error, None)}
        return {"type": "succeeded", "message": json.loads(message)}

    async def _generate(self, request: PendingRequest, request_id: str) -> str:
        body = parse_body(MessageCreateParams, json.dumps(request.params).encode())
        if body.stream:
            raise invalid_request("stream: batch requests cannot be streamed")
        services = self.services if self.services_for is None else await self.services_for(body.model)
        compacted = await compaction_response(services, body, request_id, BACKGROUND_PRIORITY)
        if compacted is not None:  # the compaction beta: the response is the compacted message
            return bytes(compacted.body).decode()
        prepared = await prepare_generation(services, body, request_id)
        prepared = replace(prepared, params=replace(prepared.params, priority=BACKGROUND_PRIORITY))
        deltas = await start_deltas(services.engine, prepared)
        message = await collect_message(message_events(deltas, prepared.event_builder()))
        return message.model_dump_json()

    def _engine_stopped(self) -> bool:
        return getattr(self.services.engine, "dead_reason", None) is not None

    def _expire_due(self) -> None:
        """End expired batches, and canceling ones with nothing left running (a cancel that a
        crash interrupted ends after the restart)."""
        moment = now()
        for record in self.store.unfinished():
            if record.cancel_initiated_at is not None:
                if not any(batch_id == record.id for batch_id, _ in self._inflight):
                    self.store.end(record, "canceled")
                continue
            if record.expires_at <= moment:
                for (batch_id, _), task in list(self._inflight.items()):
                    if batch_id == record.id:
                        task.cancel()
                self.store.end(record, "expired")
                log.info("batch %s expired", record.id)

