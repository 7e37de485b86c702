"""UpstreamConfig: where the upstream replicas are and how to talk to them (built by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

from pensieve.backends.upstream_request import Dialect


@dataclass(frozen=True)
class UpstreamConfig:
    """Built by the CLI from ``--upstream`` and friends."""

    urls: tuple[str, ...]
    dialect: Dialect = "vllm"
    model: str | None = None  # the upstream's served model name; None → asked at start
    routing_headers: tuple[str, ...] = ("X-Session-ID",)  # each carries the session key
    api_key: str | None = None  # sent as Authorization: Bearer
    health_path: str = "/health"
    health_interval_s: float = 5.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float | None = None  # between two chunks; None: the request deadline rules
    max_in_flight: int = 256
