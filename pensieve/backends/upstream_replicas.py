"""The upstream replicas: which one serves a session, which ones are healthy.

A session's turns go to one replica so its prefix stays in that replica's KV cache:
rendezvous (highest-random-weight) hashing of the session key over the healthy replicas. When
a replica goes down only its sessions move (to each one's next-ranked replica), and they come
back when it recovers. Requests without a key go to the replica with the fewest in flight.

Health: a background thread asks every replica's health path each ``interval_s``; a failed
connection during a request marks the replica down at once (the caller then fails over to the
next in the session's ranking). One URL that is a router (vllm-router, SGLang's model gateway)
is simply a set of one: the router does the cache-aware placement.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Replica:
    url: str
    healthy: bool = True
    in_flight: int = 0
    failures: int = 0  # consecutive failed checks or requests
    last_error: str | None = None


def rendezvous_score(key: str, url: str) -> int:
    """The weight of ``url`` for ``key``: a 64-bit hash of both (stable across processes)."""
    digest = hashlib.blake2b(f"{key}\x00{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(key: str, urls: Sequence[str]) -> list[str]:
    """``urls`` best-first for ``key``."""
    return sorted(urls, key=lambda url: rendezvous_score(key, url), reverse=True)


@dataclass
class ReplicaSet:
    """The replicas and their health; thread-safe (the checker thread and the event loop)."""

    urls: Sequence[str]
    health_path: str = "/health"
    interval_s: float = 5.0
    probe: Callable[[str], bool] | None = None  # url → healthy; set by the client (HTTP)
    replicas: dict[str, Replica] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _thread: threading.Thread | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("an upstream backend needs at least one --upstream URL")
        clean = [u.rstrip("/") for u in self.urls]
        if len(set(clean)) != len(clean):
            raise ValueError(f"--upstream URLs repeat: {', '.join(clean)}")
        self.replicas = {u: Replica(u) for u in clean}

    def order(self, key: str | None) -> list[Replica]:
        """Replicas to try for ``key``, best first: the healthy ones (by rendezvous rank, or
        fewest in flight without a key), then the unhealthy ones as a last resort."""
        with self._lock:
            replicas = list(self.replicas.values())
        if key is not None:
            ranked = rank(key, [r.url for r in replicas])
            replicas = [self.replicas[u] for u in ranked]
        else:
            replicas.sort(key=lambda r: r.in_flight)
        return [r for r in replicas if r.healthy] + [r for r in replicas if not r.healthy]

    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas.values())

    def mark(self, replica: Replica, ok: bool, error: str | None = None) -> None:
        with self._lock:
            was = replica.healthy
            replica.healthy = ok
            replica.failures = 0 if ok else replica.failures + 1
            replica.last_error = None if ok else error
        if was != ok:
            if ok:
                log.info("upstream %s is healthy again", replica.url)
            else:
                log.warning("upstream %s is down: %s", replica.url, error)

    def check_all(self) -> None:
        """One round of health checks (the thread's body; callable directly)."""
        if self.probe is None:
            return
        for replica in list(self.replicas.values()):
            try:
                ok, error = self.probe(replica.url + self.health_path), None
            except Exception as exc:  # noqa: BLE001 - any failure is "down", with its reason
                ok, error = False, f"{type(exc).__name__}: {exc}"
            self.mark(replica, ok, error or ("health check failed" if not ok else None))

    def start(self) -> None:
        if self._thread is None and self.probe is not None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="pensieve-upstream-health",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            started = time.monotonic()
            self.check_all()
            took = time.monotonic() - started
            if took > max(5.0, self.interval_s):
                log.warning("upstream health checks took %.1f s", took)

    def describe(self) -> str:
        return ", ".join(f"{r.url} ({'up' if r.healthy else 'down'})" for r in self.replicas.values())
