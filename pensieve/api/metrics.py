"""Server metrics: Prometheus series for ``/metrics`` and the live figures of ``/v1/status``.

One ``ServerMetrics`` per app (its own ``CollectorRegistry``: no process-wide globals). The
routes wrap a generation's deltas in ``observe``, which times the first token, the tokens
after it and the whole request, counts input/output/cached tokens by model and keeps the
request in ``running`` (its progress, for the status page) until it ends. ``MetricsMiddleware``
counts every answered request by route, status and model. Engine gauges (running, waiting,
queue, KV blocks) are read at scrape time from each engine client's ``snapshot()`` — plain
reads of counters the engine thread keeps, no locks on the engine's path.

Everything here runs on the event loop thread; nothing is shared with the engine thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pensieve.chat.stream import close_iterator
from pensieve.engine.types import GenerationDelta

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
THROUGHPUT_BUCKET_S = 5  # the status page's chart: output tokens per 5-second bucket …
THROUGHPUT_WINDOW_S = 600  # … over the last 10 minutes


@dataclass
class RunningRequest:
    """One generation in flight, as the status page shows it."""

    id: str
    model: str
    route: str
    started: float  # wall clock (time.time())
    prompt_tokens: int
    max_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    first_token_s: float | None = None  # time to first token

    def view(self, now: float) -> dict[str, Any]:
        out = asdict(self)
        out["elapsed_s"] = round(now - self.started, 3)
        out["progress"] = round(self.output_tokens / self.max_tokens, 4) if self.max_tokens else 1.0
        return out


# model id → its engine client's ``snapshot()`` (``running``, ``waiting``, ``queued``,
# ``kv_blocks_total``/``_free``/``_cached``), or None for a model not loaded or without one
SnapshotSource = Callable[[], dict[str, Any]]


class ServerMetrics:
    def __init__(self, engines: SnapshotSource = dict) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.engines = engines
        self.started = time.time()
        self.running: dict[str, RunningRequest] = {}
        self._buckets: deque[list[float]] = deque()  # [bucket start, output tokens]
        self._tokens: dict[str, list[int]] = {}  # model → [prompt, cached, output]
        r = self.registry
        self.requests = Counter("pensieve_requests", "HTTP requests answered, by route, status and model",
                                ["route", "status", "model"], registry=r)
        self.ttft = Histogram("pensieve_time_to_first_token_seconds", "Time from a request's start "
                              "to its first output token", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pensieve_time_per_output_token_seconds", "Mean time per output token "
                              "after the first, per request", ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("pensieve_e2e_request_latency_seconds", "Time from a generation's start "
                             "to its end", ["model"], buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pensieve_prompt_tokens", "Prompt (input) tokens", ["model"], registry=r)
        self.cached_tokens = Counter("pensieve_cached_prompt_tokens", "Prompt tokens read from the "
                                     "prefix cache", ["model"], registry=r)
        self.output_tokens = Counter("pensieve_generation_tokens", "Output tokens generated", ["model"],
                                     registry=r)
        r.register(_LiveCollector(self))

    # -- requests -------------------------------------------------------------------------

    async def observe(self, deltas: AsyncIterator[GenerationDelta], *, request_id: str, model: str,
                      route: str, prompt_tokens: int, max_tokens: int) -> AsyncIterator[GenerationDelta]:
        """``deltas`` unchanged, measured; the request shows in ``running`` until it ends."""
        start = time.monotonic()
        entry = RunningRequest(request_id, model, route, time.time(), prompt_tokens, max_tokens)
        self.running[request_id] = entry
        first: float | None = None
        outputs = self.output_tokens.labels(model)  # children resolved once, not per delta
        counts = self._tokens.setdefault(model, [0, 0, 0])
        try:
            async for delta in deltas:
                new = delta.num_output_tokens - entry.output_tokens
                if new > 0:
                    if first is None:
                        first = time.monotonic()
                        entry.first_token_s = round(first - start, 4)
                        self.ttft.labels(model).observe(first - start)
                    outputs.inc(new)
                    counts[2] += new
                    self._add_throughput(new)
                    entry.output_tokens = delta.num_output_tokens
                if delta.finish_reason is not None:
                    entry.cached_tokens = delta.num_cached_tokens
                    entry.prompt_tokens = delta.num_prompt_tokens or entry.prompt_tokens
                yield delta
        finally:
            await close_iterator(deltas)  # closing this generator aborts the generation
            self.running.pop(request_id, None)
            end = time.monotonic()
            self.e2e.labels(model).observe(end - start)
            if first is not None and entry.output_tokens > 1:
                self.tpot.labels(model).observe((end - first) / (entry.output_tokens - 1))
            self.prompt_tokens.labels(model).inc(entry.prompt_tokens)
            self.cached_tokens.labels(model).inc(entry.cached_tokens)
            counts[0] += entry.prompt_tokens
            counts[1] += entry.cached_tokens

    def _add_throughput(self, n: int) -> None:
        now = time.time()
        bucket = now - now % THROUGHPUT_BUCKET_S
        if self._buckets and self._buckets[-1][0] == bucket:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([bucket, float(n)])
            while self._buckets[0][0] < now - THROUGHPUT_WINDOW_S:
                self._buckets.popleft()

    def observe_generation(self, deltas: AsyncIterator[GenerationDelta], prepared: Any, model: str,
                           route: str) -> AsyncIterator[GenerationDelta]:
        """``observe`` for an ``api.generation.PreparedGeneration`` served by ``model``."""
        return self.observe(deltas, request_id=prepared.request_id, model=model, route=route,
                            prompt_tokens=prepared.prompt.num_tokens, max_tokens=prepared.params.max_tokens)

    def count_request(self, route: str, status: int, model: str) -> None:
        self.requests.labels(route, str(status), model).inc()

    # -- reading --------------------------------------------------------------------------

    def hit_rate(self, model: str | None = None) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens (finished requests)."""
        rows = [self._tokens[model]] if model in self._tokens else ([] if model else list(self._tokens.values()))
        prompt = sum(r[0] for r in rows)
        return sum(r[1] for r in rows) / prompt if prompt else 0.0

    def throughput(self) -> list[dict[str, float]]:
        """Output tokens per second in each 5-second bucket of the last 10 minutes (zeros filled)."""
        now = time.time()
        last = now - now % THROUGHPUT_BUCKET_S
        have = {b: n for b, n in self._buckets}
        first = last - THROUGHPUT_WINDOW_S + THROUGHPUT_BUCKET_S
        return [{"t": b, "tokens_per_s": have.get(b, 0.0) / THROUGHPUT_BUCKET_S}
                for b in _range(first, last, THROUGHPUT_BUCKET_S)]

    def status(self) -> dict[str, Any]:
        now = time.time()
        tokens = {m: {"prompt_tokens": r[0], "cached_tokens": r[1], "output_tokens": r[2],
                      "cache_hit_rate": self.hit_rate(m)} for m, r in self._tokens.items()}
        return {
            "uptime_s": round(now - self.started, 1),
            "running": [e.view(now) for e in self.running.values()],
            "tokens": tokens,
            "cache_hit_rate": self.hit_rate(),
            "engines": {m: (asdict(s) if is_dataclass(s) else s) for m, s in self.engines().items()},
            "throughput": self.throughput(),
            "throughput_bucket_s": THROUGHPUT_BUCKET_S,
        }

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _range(first: float, last: float, step: int) -> Iterable[float]:
    t = first
    while t <= last:
        yield t
        t += step


class _LiveCollector:
    """Gauges read at scrape time: engine counters per model, cache hit rate, running requests."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        m = self.metrics
        gauges = {
            "running": GaugeMetricFamily("pensieve_requests_running", "Requests in the engine's batch", labels=["model"]),
            "waiting": GaugeMetricFamily("pensieve_requests_waiting", "Requests waiting for a seat "
                                         "(queued in the engine or for their grammar)", labels=["model"]),
            "queued": GaugeMetricFamily("pensieve_queue_depth", "Requests handed to the engine thread, "
                                        "not yet taken", labels=["model"]),
            "kv_blocks_used": GaugeMetricFamily("pensieve_kv_blocks_used", "KV cache blocks held by requests",
                                                labels=["model"]),
            "kv_blocks_free": GaugeMetricFamily("pensieve_kv_blocks_free", "KV cache blocks free (cached "
                                                "prefixes among them may be evicted)", labels=["model"]),
            "kv_blocks_cached": GaugeMetricFamily("pensieve_kv_blocks_cached", "KV cache blocks holding a "
                                                  "registered prefix", labels=["model"]),
        }
        for model, snap in m.engines().items():
            if snap is None:
                continue
            gauges["running"].add_metric([model], snap.running)
            gauges["waiting"].add_metric([model], snap.waiting)
            gauges["queued"].add_metric([model], snap.queued)
            gauges["kv_blocks_used"].add_metric([model], snap.kv_blocks_total - snap.kv_blocks_free)
            gauges["kv_blocks_free"].add_metric([model], snap.kv_blocks_free)
            gauges["kv_blocks_cached"].add_metric([model], snap.kv_blocks_cached)
        yield from gauges.values()
        rate = GaugeMetricFamily("pensieve_prefix_cache_hit_rate", "Prompt tokens read from the prefix "
                                 "cache / prompt tokens, since start", labels=["model"])
        for model in m._tokens:
            rate.add_metric([model], m.hit_rate(model))
        yield rate
        yield GaugeMetricFamily("pensieve_requests_in_flight", "Generations the HTTP layer is streaming",
                                value=len(m.running))


class MetricsMiddleware:
    """Counts every answered HTTP request by route template, status and model (the model the
    route put in ``request.state.model``; ``-`` where none)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            model = scope.get("state", {}).get("model") or "-"
            self.metrics.count_request(route, status, str(model))
