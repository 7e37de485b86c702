"""Interactive TTFT while a Message Batch runs, against the same load sent as interactive streams.

Starts `pensieve serve` (the default model unless --model) with every seat fillable by a batch
(--max-num-seqs = --batch-concurrency = SEATS), then measures the time to the first text delta of
short interactive streamed requests: idle; while a batch of BATCH requests runs; and while SEATS
ordinary interactive streams hold every seat (what a batch would cost without priorities).
Prints one table; the batch's own wall time and requests/s too. By hand, not in CI:

    .venv/bin/python bench/batch_priority.py --probes 5 --batch 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import anthropic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.real_server import pensieve_server  # noqa: E402

PROBE = [{"role": "user", "content": "What is the capital of France?"}]


def ttft(client: anthropic.Anthropic) -> float:
    started = time.perf_counter()
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=8, messages=PROBE,
                                extra_body={"temperature": 0}) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                return time.perf_counter() - started
    raise RuntimeError("no text came back")


def probes(client: anthropic.Anthropic, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(ttft(client))
        time.sleep(0.2)
    return out


def long_request(i: int, max_tokens: int) -> dict:
    return {"model": "claude-haiku-4-5", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write a long story about a lighthouse keeper, part {i}."}]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--seats", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-batches-")
    flags = ["--batch-dir", folder, "--max-num-seqs", str(args.seats), "--batch-concurrency", str(args.seats)]
    if args.model:
        flags += ["--model", args.model]
    with pensieve_server(*flags) as url:
        client = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0, timeout=600)
        ttft(client)  # warm-up
        idle = probes(client, args.probes)

        started = time.perf_counter()
        batch = client.messages.batches.create(
            requests=[{"custom_id": f"r{i}", "params": long_request(i, args.max_tokens)} for i in range(args.batch)])
        time.sleep(1.0)
        during_batch = probes(client, args.probes)
        while client.messages.batches.retrieve(batch.id).processing_status != "ended":
            time.sleep(0.5)
        batch_s = time.perf_counter() - started
        counts = client.messages.batches.retrieve(batch.id).request_counts

        stop = threading.Event()

        def hog(i: int) -> None:
            while not stop.is_set():
                params = long_request(i, args.max_tokens)
                params.pop("temperature")
                client.messages.create(**params, extra_body={"temperature": 0})

        hogs = [threading.Thread(target=hog, args=(i,), daemon=True) for i in range(args.seats)]
        for thread in hogs:
            thread.start()
        time.sleep(1.0)
        during_streams = probes(client, args.probes)
        stop.set()
        for thread in hogs:
            thread.join()

    def row(name: str, values: list[float]) -> str:
        return f"| {name} | {statistics.median(values) * 1e3:.0f} | {max(values) * 1e3:.0f} |"

    print(f"seats {args.seats}, probes {args.probes}, batch {args.batch} x max_tokens {args.max_tokens}")
    print("| interactive TTFT | median ms | max ms |\n|---|---|---|")
    print(row("idle", idle))
    print(row("during a batch (every seat is the batch's)", during_batch))
    print(row(f"during {args.seats} interactive streams (every seat taken)", during_streams))
    print(f"batch: {counts.succeeded} succeeded, {counts.errored} errored in {batch_s:.1f} s "
          f"({args.batch / batch_s:.2f} requests/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
