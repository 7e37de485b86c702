"""What the metrics cost a request: ``ServerMetrics.observe`` per engine delta, and one
``/metrics`` exposition with N models' series, in process (no HTTP, no engine).

    .venv/bin/python -m bench.metrics_overhead --deltas 200000
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pensieve.api.metrics import ServerMetrics
from pensieve.engine.client import EngineSnapshot
from pensieve.engine.types import FinishReason, GenerationDelta


async def _deltas(n: int, observed: bool, metrics: ServerMetrics) -> float:
    async def source():
        for i in range(1, n + 1):
            yield GenerationDelta("r", text="x", num_output_tokens=i,
                                  finish_reason=FinishReason.MAX_TOKENS if i == n else None)

    stream = source()
    if observed:
        stream = metrics.observe(stream, request_id="r", model="m", route="messages", prompt_tokens=10,
                                 max_tokens=n)
    start = time.perf_counter()
    async for _ in stream:
        pass
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--deltas", type=int, default=200_000)
    p.add_argument("--models", type=int, default=4)
    ns = p.parse_args()
    snap = EngineSnapshot(running=3, waiting=1, queued=0, kv_blocks_total=4096, kv_blocks_free=1000,
                          kv_blocks_cached=500)
    metrics = ServerMetrics(lambda: {f"model-{i}": snap for i in range(ns.models)})
    bare = min(asyncio.run(_deltas(ns.deltas, False, metrics)) for _ in range(3))
    observed = min(asyncio.run(_deltas(ns.deltas, True, metrics)) for _ in range(3))
    per_delta_us = (observed - bare) / ns.deltas * 1e6
    for i in range(ns.models):  # series for every model
        metrics.count_request("/v1/messages", 200, f"model-{i}")
    runs = []
    for _ in range(50):
        start = time.perf_counter()
        body = metrics.exposition()
        runs.append(time.perf_counter() - start)
    print(f"observe: {per_delta_us:.2f} µs per delta over a bare async generator ({ns.deltas} deltas)")
    print(f"/metrics exposition: {1e3 * sorted(runs)[len(runs) // 2]:.2f} ms median, {len(body)} bytes, "
          f"{ns.models} models")


if __name__ == "__main__":
    main()
