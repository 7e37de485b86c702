"""Hostile load, by hand (issue 10's bars): a long fuzz and a long concurrent soak against a
real `pensieve serve` of the default model (started here on a free loopback port, or --url).

    python -m bench.hostile fuzz --requests 10000
    python -m bench.hostile soak --streams 64 --minutes 10

fuzz: generated bad and odd requests (tests/helpers/fuzz_cases.py) one after another; counts
statuses, fails on any 5xx or an error outside the Anthropic envelope, checks the server still
answers. soak: ``--streams`` clients in a loop for ``--minutes``, each sending a random
streaming request (1–64 tokens, tools on some, tiny and normal temperatures) and leaving early
about a third of the time; a stream is well formed when it starts with ``message_start``, ends
with ``message_stop`` or ``error`` and closes every block it opens; a hang is a stream with no
event for ``--hang-s``. The server's RSS is sampled every 10 s (KV blocks are touched as they
are first used, so RSS may rise until the pool has been used once, then should stay flat).
Prints a Markdown summary; exit 1 on any 5xx, malformed stream or hang.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import httpx

from tests.helpers.fuzz_cases import VALID, case, check_response
from tests.helpers.real_server import pensieve_server

TOOL = {"name": "Read", "description": "Read a file",
        "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}},
                         "required": ["file_path"]}}


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def server_pid(port: int) -> int | None:
    """The pid of the `pensieve serve` listening on ``port`` (its command line names it)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in cmd and str(port).encode() in cmd:
                return int(proc.name)
    return None


def fuzz(url: str, requests: int, seed: int) -> tuple[dict[int, int], list[str]]:
    rng, statuses, failures = random.Random(seed), {}, []
    valid = {**VALID, "model": "claude-sonnet-5"}  # a name the server maps to its model
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(requests):
            method, path, raw, headers = case(rng, valid)
            try:
                r = client.request(method, path, content=raw, headers=headers)
            except httpx.TimeoutException:
                failures.append(f"{i}: no answer in {client.timeout.read:.0f} s (hang): "
                                f"{method} {path} {raw[:400]!r}")
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            try:
                check_response(r, (i, method, path))
            except (AssertionError, ValueError) as exc:
                failures.append(f"{i}: {exc!s:.300}")
        if client.get("/health").status_code != 200:
            failures.append("/health not 200 after the fuzz")
    return statuses, failures


async def one_stream(client: httpx.AsyncClient, rng: random.Random, hang_s: float, tally: dict) -> None:
    body: dict = {"model": "claude-sonnet-5", "max_tokens": rng.randint(1, 64), "stream": True,
                  "temperature": rng.choice([0, 1e-40, 0.7, 1.0]),
                  "messages": [{"role": "user", "content": "Tell me about " + "cats " * rng.randint(1, 200)}]}
    if rng.random() < 0.3:
        body["tools"] = [TOOL]
        if rng.random() < 0.5:
            body["tool_choice"] = {"type": "any"}
    leave_after = rng.choice([None, None, 2, 5, 12])
    events: list[str] = []
    async with client.stream("POST", "/v1/messages", json=body) as r:
        tally[r.status_code] = tally.get(r.status_code, 0) + 1
        if r.status_code != 200:
            await r.aread()
            return
        lines = r.aiter_lines()
        while True:
            try:
                line = await asyncio.wait_for(anext(lines), hang_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                tally["hangs"] = tally.get("hangs", 0) + 1
                return
            if line.startswith("event: "):
                events.append(line[7:])
                if leave_after is not None and len(events) >= leave_after:
                    tally["left"] = tally.get("left", 0) + 1
                    return
    well_formed = (events and events[0] == "message_start" and events[-1] in ("message_stop", "error")
                   and events.count("content_block_start") == events.count("content_block_stop"))
    tally["complete" if well_formed else "malformed"] = tally.get("complete" if well_formed else "malformed", 0) + 1
    if "error" in events:
        tally["error_events"] = tally.get("error_events", 0) + 1


async def soak(url: str, streams: int, minutes: float, hang_s: float, seed: int) -> dict:
    tally: dict = {}
    deadline = time.monotonic() + 60 * minutes
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=30), limits=limits) as client:
        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline:
                try:
                    await one_stream(client, rng, hang_s, tally)
                except httpx.HTTPError as exc:
                    tally[type(exc).__name__] = tally.get(type(exc).__name__, 0) + 1
        await asyncio.gather(*(worker(i) for i in range(streams)))
    return tally


def sample_rss(pid: int | None, stop: threading.Event, out: list) -> None:
    start = time.monotonic()
    while pid is not None and not stop.wait(10):
        out.append((round(time.monotonic() - start), *rss_mb(pid)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("fuzz", "soak"))
    p.add_argument("--url", help="an already running server (default: start the default model)")
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--hang-s", type=float, default=120)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--serve-args", default="", help="extra `pensieve serve` arguments")
    a = p.parse_args(argv)
    started = time.monotonic()
    server = nullcontext(a.url) if a.url else pensieve_server(*a.serve_args.split())
    with server as url:
        pid = server_pid(int(url.rsplit(":", 1)[1]))
        samples: list = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(pid, stop, samples), daemon=True)
        sampler.start()
        if a.mode == "fuzz":
            statuses, failures = fuzz(url, a.requests, a.seed)
            summary = {"statuses": dict(sorted(statuses.items())), "failures": failures[:10],
                       "num_failures": len(failures)}
            bad = bool(failures)
        else:
            tally = asyncio.run(soak(url, a.streams, a.minutes, a.hang_s, a.seed))
            alive = httpx.get(f"{url}/health", timeout=30).status_code
            summary = {"tally": tally, "health_after": alive}
            bad = any(k for k in tally if isinstance(k, int) and k >= 500) or tally.get("malformed") \
                or tally.get("hangs") or alive != 200
        stop.set()
        summary["rss_mb_samples (s, rss, peak)"] = samples[:: max(1, len(samples) // 12)] + samples[-1:]
        summary["seconds"] = round(time.monotonic() - started)
    print(json.dumps(summary, indent=1, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
