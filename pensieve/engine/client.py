"""EngineClient: the one place where the synchronous engine meets asyncio.

The engine runs in its own thread, stepping while it has work. ``generate`` hands a request
to that thread and yields its deltas; leaving the loop early (client disconnect, cancel)
aborts the request, which frees its KV within one step. A request identical to one still
running (same prompt and sampling: a client resending after a timeout) attaches to it and
gets the whole stream from the start instead of starting a second generation, when the
output is deterministic (greedy or seeded); unseeded sampling always runs its own.

Liveness: the whole loop is guarded. A failed step fails the requests it held and the loop
goes on; a failure outside a step, or ``MAX_FAILED_STEPS`` failed steps in a row (a broken
device), kills the loop: every waiting and streaming caller gets an error delta at once,
later calls raise ``EngineDeadError``, ``dead_reason`` says why (``/health`` answers 503) and
``on_death`` is called (the server exits non-zero for its supervisor). A watchdog thread logs
a step still running after ``watchdog_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pensieve.engine import step_times
from pensieve.engine.engine import Engine
from pensieve.engine.errors import EngineDeadError, EngineOverloadedError
from pensieve.engine.sampler import is_greedy
from pensieve.engine.types import FinishReason, GenerationDelta, SamplingParams

log = logging.getLogger(__name__)
# engine steps longer than this are logged (0 logs every step: a timeline for diagnosis)
SLOW_STEP_S = float(os.environ.get("PENSIEVE_LOG_STEPS_OVER_MS", "250")) / 1e3
# a step still running after this long is reported by the watchdog (a hang, not a slow step)
WATCHDOG_S = float(os.environ.get("PENSIEVE_STEP_WATCHDOG_S", "60"))
MAX_FAILED_STEPS = 3  # consecutive failed steps that declare the engine dead


@dataclass(frozen=True)
class EngineSnapshot:
    running: int  # requests in the batch
    waiting: int  # queued in the engine or waiting for their grammar
    queued: int  # handed to the engine thread, not yet taken
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_cached: int  # blocks holding a registered prefix (held or free)


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Generation:
    """One engine request and the callers watching it."""

    request_id: str
    key: tuple | None
    watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]
    history: list[GenerationDelta]
    finished: bool = False


class EngineClient:
    def __init__(self, engine: Engine, model_name: str, max_waiting: int = 64, *,
                 on_death: Callable[[str], None] | None = None, watchdog_s: float = WATCHDOG_S) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.on_death = on_death
        self.watchdog_s = watchdog_s
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._generations: dict[str, _Generation] = {}  # engine request id → generation
        self._by_key: dict[tuple, _Generation] = {}  # running generations, for attaching
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None
        self._step_started: float | None = None  # monotonic start of the step running now
        self._watchdog: threading.Thread | None = None
        self.drained = False  # drain() was called: the server is shutting down on purpose
        self._step_times = step_times.from_env()  # PENSIEVE_STEP_TIMES: a CSV line a step

    @property
    def dead_reason(self) -> str | None:
        """Why the engine loop stopped for good; None while it serves."""
        return self._dead

    @property
    def step_running_s(self) -> float:
        """How long the step in progress has run (0 between steps)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def overload(self) -> str | None:
        """Why a new request would be refused now, or None: ``max_waiting`` requests already
        wait (queued in the engine, waiting for a grammar, or not yet taken from the inbox),
        or requests wait while every KV block is held. Lock-free reads of the engine's
        counters, cheap enough for every request before its body is read."""
        if self._dead is not None:
            return None  # generate() answers that with its own error
        waiting = self.engine.num_waiting + self._inbox.qsize()
        if waiting >= self.max_waiting:
            return f"{waiting} requests are waiting, the limit is {self.max_waiting}"
        if waiting and self.engine.num_free_blocks == 0:
            return f"the KV cache is full and {waiting} request(s) wait for it"
        return None

    def snapshot(self) -> EngineSnapshot:
        """Counters for ``/metrics`` and the status page: plain reads of what the engine
        thread keeps (a figure may be a step old; nothing decides anything from it)."""
        engine, pool = self.engine, self.engine.pool
        return EngineSnapshot(running=len(engine.scheduler.running), waiting=engine.num_waiting,
                              queued=self._inbox.qsize(), kv_blocks_total=pool.num_blocks,
                              kv_blocks_free=pool.num_free, kv_blocks_cached=pool.num_cached)

    @property
    def tokenizer(self):  # noqa: ANN201 - the loader's TextTokenizer
        return self.engine.tokenizer

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pensieve-engine", daemon=True)
            self._thread.start()
        if self._watchdog is None and self.watchdog_s > 0:
            self._watchdog = threading.Thread(target=self._watch_steps, name="pensieve-watchdog", daemon=True)
            self._watchdog.start()

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
        stream: asyncio.Queue[GenerationDelta] = asyncio.Queue()
        watcher = (asyncio.get_running_loop(), stream)
        gen, is_new = self._watch(_key(prompt_ids, params), request_id, watcher)
        if is_new:
            self._send(_Add(request_id, list(prompt_ids), params))
        finished = False
        try:
            while not finished:
                delta = await stream.get()
                finished = delta.finish_reason is not None
                yield delta
        finally:
            self._unwatch(gen, watcher, finished)

    def _watch(self, key: tuple | None, request_id: str, watcher: tuple) -> tuple[_Generation, bool]:
        with self._lock:
            if self._dead is not None:  # checked under the lock that _die takes
                raise EngineDeadError(self._dead)
            gen = self._by_key.get(key) if key is not None else None
            if gen is not None:
                log.info("request %s attaches to identical running %s", request_id, gen.request_id)
                for delta in gen.history:
                    watcher[1].put_nowait(delta)
                gen.watchers.append(watcher)
                return gen, False
            if len(self._generations) >= self.max_waiting + self.engine.config.max_num_seqs:
                raise EngineOverloadedError("too many requests in flight; retry later")
            gen = _Generation(request_id, key, [watcher], [])
            self._generations[request_id] = gen
            if key is not None:
                self._by_key[key] = gen
            return gen, True

    def _unwatch(self, gen: _Generation, watcher: tuple, finished: bool) -> None:
        with self._lock:
            if watcher in gen.watchers:
                gen.watchers.remove(watcher)
            abandon = not gen.watchers and not gen.finished
            if abandon or gen.finished and not gen.watchers:
                self._forget(gen)
        if abandon and not finished:
            self._send(_Abort(gen.request_id))

    def _forget(self, gen: _Generation) -> None:
        self._generations.pop(gen.request_id, None)
        if gen.key is not None and self._by_key.get(gen.key) is gen:
            del self._by_key[gen.key]

    def _send(self, msg: _Add | _Abort) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - whatever kills the loop must be reported
            log.critical("the engine loop died", exc_info=True)
            self._die(f"{type(exc).__name__}: {exc}")
        finally:
            if self._step_times is not None:
                self._step_times.close()

    def _serve(self) -> None:
        failed_steps = 0
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_work():
                if self._step_times is not None:
                    self._step_times.flush()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            started = time.perf_counter()
            self._step_started = time.monotonic()
            try:
                deltas = self.engine.step()
                failed_steps = 0
            except Exception as exc:  # keep serving: fail what was running, go on
                log.exception("engine step failed")
                failed_steps += 1
                if failed_steps >= MAX_FAILED_STEPS:
                    raise
                deltas = self.engine.fail_all(f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                self._step_started = None
            took = time.perf_counter() - started
            if self._step_times is not None:
                self._step_times.record(started, took, self.engine.last_step_tokens,
                                        len(self.engine.scheduler.running),
                                        self.engine.last_step_chained)
            if took >= SLOW_STEP_S:  # a first-use kernel compile, a long prefill chunk, a stall
                log.info("engine step: %.1f ms, %d tokens run, %d deltas (%d running, %d waiting)",
                         took * 1e3, self.engine.last_step_tokens, len(deltas),
                         len(self.engine.scheduler.running), self.engine.num_waiting)
            for delta in deltas:
                self._dispatch(delta)

    def drain(self, reason: str) -> None:
        """Server shutdown: end every caller's generation with an error now and refuse new
        ones (the engine thread keeps running until ``shutdown``). No-op once dead."""
        if self._dead is not None:
            return
        self.drained = True
        self._end_all(reason)

    def _end_all(self, reason: str) -> None:
        """End every caller's generation with an error and refuse new ones."""
        with self._lock:
            self._dead = reason
            generations = list(self._generations.values())
        for gen in generations:
            self._dispatch(_error_delta(gen.request_id, f"the inference engine stopped: {reason}"))

    def _die(self, reason: str) -> None:
        self._end_all(reason)
        if self.on_death is not None:
            try:
                self.on_death(reason)
            except Exception:
                log.exception("engine on_death callback failed")

    def _watch_steps(self) -> None:
        """Log a step that has run longer than ``watchdog_s`` (once per step)."""
        reported: float | None = None
        while not self._stopping and self._dead is None:
            time.sleep(min(1.0, self.watchdog_s / 4))
            started = self._step_started
            if started is None or started == reported:
                continue
            running = time.monotonic() - started
            if running >= self.watchdog_s:
                reported = started
                log.warning("engine step running for %.1f s (watchdog bound %.0f s): %d running, %d "
                            "waiting; the engine may be stuck", running, self.watchdog_s,
                            len(self.engine.scheduler.running), self.engine.num_waiting)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, _Abort):
                self.engine.abort(msg.request_id)
                continue
            if SLOW_STEP_S == 0:
                log.info("engine takes request %s (%d prompt tokens)", msg.request_id, len(msg.prompt_ids))
            try:
                self.engine.add_request(msg.request_id, msg.prompt_ids, msg.params)
            except Exception as exc:
                self._dispatch(_error_delta(msg.request_id, str(exc)))

    def _dispatch(self, delta: GenerationDelta) -> None:
        with self._lock:
            gen = self._generations.get(delta.request_id)
            if gen is None:
                return
            gen.history.append(delta)
            if delta.finish_reason is not None:
                gen.finished = True
                if gen.key is not None and self._by_key.get(gen.key) is gen:
                    del self._by_key[gen.key]  # later identical requests start afresh
            watchers = list(gen.watchers)
        for loop, stream in watchers:
            try:
                loop.call_soon_threadsafe(stream.put_nowait, delta)
            except RuntimeError:  # that caller's event loop is gone
                pass


def _key(prompt_ids: list[int], params: SamplingParams) -> tuple | None:
    """What makes two requests the same generation; None when they may not share one: the
    output is random (sampling without a seed: two such requests must get two samples), or
    params are not hashable."""
    if not is_greedy(params) and params.seed is None:
        return None
    key = (tuple(prompt_ids), params)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _error_delta(request_id: str, message: str) -> GenerationDelta:
    return GenerationDelta(request_id, finish_reason=FinishReason.ERROR, error=message)
