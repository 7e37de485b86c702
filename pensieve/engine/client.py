"""EngineClient: the one place where the synchronous engine meets asyncio.

The engine runs in its own thread, stepping while it has work. ``generate`` hands a request
to that thread and yields its deltas; leaving the loop early (client disconnect, cancel)
aborts the request, which frees its KV within one step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pensieve.engine.engine import Engine
from pensieve.engine.errors import EngineDeadError, EngineOverloadedError
from pensieve.engine.types import FinishReason, GenerationDelta, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class EngineClient:
    def __init__(self, engine: Engine, model_name: str, max_waiting: int = 256) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def tokenizer(self):  # noqa: ANN201 - the loader's TextTokenizer
        return self.engine.tokenizer

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pensieve-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationDelta]:
        """Yield deltas until one has ``finish_reason``; see module docstring."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        self.engine.check_prompt(len(prompt_ids))
        with self._lock:
            if len(self._streams) >= self.max_waiting + self.engine.config.max_num_seqs:
                raise EngineOverloadedError("too many requests in flight; retry later")
            stream: asyncio.Queue[GenerationDelta] = asyncio.Queue()
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(_Add(request_id, list(prompt_ids), params))
        finished = False
        try:
            while True:
                delta = await stream.get()
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._send(_Abort(request_id))

    def _send(self, msg: _Add | _Abort) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                deltas = self.engine.step()
            except Exception as exc:  # keep serving: fail what was running, go on
                log.exception("engine step failed")
                deltas = self.engine.fail_all(f"generation failed: {type(exc).__name__}: {exc}")
            for delta in deltas:
                self._dispatch(delta)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, _Abort):
                self.engine.abort(msg.request_id)
                continue
            try:
                self.engine.add_request(msg.request_id, msg.prompt_ids, msg.params)
            except Exception as exc:
                self._dispatch(_error_delta(msg.request_id, str(exc)))

    def _dispatch(self, delta: GenerationDelta) -> None:
        with self._lock:
            target = self._streams.get(delta.request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, delta)
            except RuntimeError:  # the caller's event loop is gone; nobody is listening
                self._send(_Abort(delta.request_id))


def _error_delta(request_id: str, message: str) -> GenerationDelta:
    return GenerationDelta(request_id, finish_reason=FinishReason.ERROR, error=message)
