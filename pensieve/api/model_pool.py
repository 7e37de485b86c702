"""Several models behind one server: which model a name means, loading on first use,
unloading when idle or when memory is needed.

The pool owns every loaded model's engine client (each model has its own engine, renderer
and ``ApiConfig``, gathered in a ``Services``); the routes ask ``services_for(request, name)``
and get that model's ``Services``, loading it first when needed. A name resolves, in order:
a model's id, one of its aliases, then the config's routes (glob patterns, first match wins).

Memory: each model has an estimate (its weights' file size + its KV cache cap). A model is
loaded only when the loaded ones plus it fit the budget; to make room the least recently used
idle models are unloaded (idle: nothing running, waiting or queued in its engine, and no
request asked for it in the last ``BUSY_GRACE_S``). A model idle for ``idle_unload_s`` is
unloaded by the reaper. Loading runs on a worker thread, one load at a time; requests for a
model being loaded wait for it.

Without a config file there is no pool: the app serves its one model as before.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from pensieve.api.config import ApiConfig
from pensieve.api.errors import ApiError, overloaded
from pensieve.api.generation import check_admission
from pensieve.api.state import Services, services_of

log = logging.getLogger(__name__)

BUSY_GRACE_S = 5.0  # a model asked for this recently is not unloaded to make room
REAPER_INTERVAL_S = 5.0
FAILED_LOAD_MEMORY_S = 30.0  # a failed load is not retried for this long (same error meanwhile)


@dataclass(frozen=True)
class PoolEntry:
    """A model the pool may load: its id, other names, what loading it is expected to take."""

    id: str
    aliases: tuple[str, ...] = ()
    estimate_bytes: int = 0
    context_length: int | None = None


@dataclass
class LoadedModel:
    services: Services
    client: Any  # the engine client: ``shutdown()``, maybe ``snapshot()``
    last_used: float = 0.0


Loader = Callable[[str], LoadedModel]  # model id → its loaded model (blocking: a worker thread runs it)
Unloader = Callable[[LoadedModel], None]


def _shutdown(model: LoadedModel) -> None:
    model.client.shutdown()


@dataclass
class ModelPool:
    entries: Sequence[PoolEntry]
    routes: Sequence[tuple[str, str]]  # (glob, model id)
    load: Loader
    budget_bytes: int | None = None
    idle_unload_s: float | None = None
    unload: Unloader = _shutdown
    pinned: frozenset[str] = frozenset()  # never unloaded (the app's first model)
    clock: Callable[[], float] = time.monotonic
    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    _by_name: dict[str, str] = field(default_factory=dict)
    _lock: asyncio.Lock | None = None
    _failed: dict[str, tuple[float, ApiError]] = field(default_factory=dict)
    _reaper: asyncio.Task | None = None

    def __post_init__(self) -> None:
        for entry in self.entries:
            for name in (entry.id, *entry.aliases):
                self._by_name.setdefault(name, entry.id)
        self._entries = {e.id: e for e in self.entries}

    # -- names ------------------------------------------------------------------------------

    def resolve(self, name: str) -> str | None:
        """The model id ``name`` means (id, alias, then the first matching route), or None."""
        if name in self._by_name:
            return self._by_name[name]
        for pattern, target in self.routes:
            if fnmatch.fnmatchcase(name, pattern):
                return target
        return None

    def listed_ids(self) -> list[tuple[str, str]]:
        """``(id, model id)`` for ``GET /v1/models``: first a ``claude-…`` id for each route
        (a glob's ``*`` filled with the model id: Claude Code only shows ``claude`` ids, and
        the id routes back), then each model's own id."""
        rows: list[tuple[str, str]] = []
        for pattern, target in self.routes:
            listed = pattern.replace("*", target) if "*" in pattern else pattern
            if any(ch in listed for ch in "?[") or self.resolve(listed) != target:
                continue
            if listed not in (r[0] for r in rows):
                rows.append((listed, target))
        rows += [(e.id, e.id) for e in self.entries]
        return rows

    # -- loading ----------------------------------------------------------------------------

    def add_loaded(self, model_id: str, model: LoadedModel) -> None:
        """A model the CLI loaded before serving (the preloaded ones)."""
        model.last_used = self.clock()
        self.loaded[model_id] = model

    async def acquire(self, name: str) -> Services:
        """The ``Services`` of the model ``name`` means, loaded if needed. 404 for a name no
        model answers to; 529 when memory cannot be freed now; an error naming the model when
        it cannot be loaded."""
        model_id = self.resolve(name)
        if model_id is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ApiError(404, "not_found_error", f"model: {name} (this server serves {known})")
        model = self.loaded.get(model_id)
        if model is None:
            model = await self._load(model_id)
        model.last_used = self.clock()
        self._start_reaper()
        return model.services

    async def _load(self, model_id: str) -> LoadedModel:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if model_id in self.loaded:  # loaded while this request waited
                return self.loaded[model_id]
            failed = self._failed.get(model_id)
            if failed is not None and self.clock() - failed[0] < FAILED_LOAD_MEMORY_S:
                raise failed[1]
            await self._make_room(self._entries[model_id])
            log.info("loading model %s", model_id)
            started = self.clock()
            try:
                model = await run_in_threadpool(self.load, model_id)
            except Exception as exc:  # noqa: BLE001 - reported to the client, named
                log.exception("model %s could not be loaded", model_id)
                error = ApiError(500, "api_error", f"model {model_id} could not be loaded: {exc}")
                self._failed[model_id] = (self.clock(), error)
                raise error from exc
            log.info("model %s loaded in %.1f s", model_id, self.clock() - started)
            self._failed.pop(model_id, None)
            self.add_loaded(model_id, model)
            return model

    async def _make_room(self, entry: PoolEntry) -> None:
        budget = self.budget_bytes
        if budget is None:
            return
        if entry.estimate_bytes > budget:
            raise ApiError(400, "invalid_request_error",
                           f"model {entry.id} needs about {_gib(entry.estimate_bytes)} GiB, more than the "
                           f"server's memory budget of {_gib(budget)} GiB (memory_budget_gb)")
        while self._used_bytes() + entry.estimate_bytes > budget:
            victim = self._lru_idle()
            if victim is None:
                busy = ", ".join(sorted(self.loaded))
                raise overloaded(f"not enough memory to load {entry.id} while {busy} are busy; retry later")
            await self._unload(victim, "to make room for " + entry.id)

    def _used_bytes(self) -> int:
        return sum(self._entries[m].estimate_bytes for m in self.loaded)

    def _is_idle(self, model: LoadedModel, grace_s: float) -> bool:
        if self.clock() - model.last_used < grace_s or model.services.config.model_id in self.pinned:
            return False
        snapshot = getattr(model.client, "snapshot", None)
        if snapshot is None:
            return False  # no way to tell: never taken away from under a request
        s = snapshot()
        return s.running == 0 and s.waiting == 0 and s.queued == 0

    def _lru_idle(self) -> str | None:
        idle = [(m.last_used, mid) for mid, m in self.loaded.items() if self._is_idle(m, BUSY_GRACE_S)]
        return min(idle)[1] if idle else None

    async def _unload(self, model_id: str, why: str) -> None:
        model = self.loaded.pop(model_id)
        log.info("unloading model %s (%s)", model_id, why)
        await run_in_threadpool(self.unload, model)

    # -- idle reaper ------------------------------------------------------------------------

    async def unload_idle(self) -> list[str]:
        """Unload every model idle for ``idle_unload_s``; their ids."""
        if not self.idle_unload_s:
            return []
        gone = [mid for mid, m in self.loaded.items() if self._is_idle(m, self.idle_unload_s)]
        for model_id in gone:
            await self._unload(model_id, f"idle for {self.idle_unload_s:g} s")
        return gone

    def _start_reaper(self) -> None:
        if self._reaper is None and self.idle_unload_s:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(REAPER_INTERVAL_S, self.idle_unload_s or REAPER_INTERVAL_S))
            try:
                await self.unload_idle()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad unload
                log.exception("unloading idle models failed")

    def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for model_id in list(self.loaded):
            self.unload(self.loaded.pop(model_id))

    # -- reading ----------------------------------------------------------------------------

    def snapshots(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for model_id, model in list(self.loaded.items()):
            snapshot = getattr(model.client, "snapshot", None)
            out[model_id] = snapshot() if snapshot is not None else None
        return out

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for e in self.entries:
            model = self.loaded.get(e.id)
            context = model.services.config.context_length if model else e.context_length
            rows.append({"id": e.id, "loaded": model is not None, "context_length": context,
                         "aliases": list(e.aliases), "estimate_bytes": e.estimate_bytes,
                         "routes": [p for p, t in self.routes if t == e.id]})
        return rows


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def pool_of(request: Request) -> ModelPool | None:
    return getattr(request.app.state, "pool", None)


async def services_for(request: Request, name: str) -> Services:
    """The ``Services`` of the model ``name`` means: the app's own without a pool (its
    routes check the name as before), else the pool's, loaded if needed (and asked for
    admission: the check before the body was read asked the first model's engine)."""
    pool = pool_of(request)
    if pool is None:
        return services_of(request)
    services = await pool.acquire(name)
    check_admission(services)
    return services


@dataclass(frozen=True, kw_only=True)
class RoutedApiConfig(ApiConfig):
    """A pooled model's ``ApiConfig``: it answers to every name the pool routes to it."""

    router: Callable[[str], str | None]

    def resolve_model(self, name: str) -> str | None:
        return self.model_id if self.router(name) == self.model_id else None
