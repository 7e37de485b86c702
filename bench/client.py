"""Streaming load client for any Anthropic-compatible (or OpenAI-compatible) server.

Measures everything client-side over HTTP, the way a real client sees it:

* decode      output tok/s after the first token: (output_tokens - 1) / (t_last - t_first),
              with output_tokens taken from the server's usage (Anthropic message_delta,
              OpenAI final usage chunk); TTFT is reported too.
* prefill     a long cold prompt (varied text, a fresh nonce at the very start so no prefix
              cache can help); prefill tok/s = input_tokens / TTFT.
* followup    a long shared prefix (system prompt) + question A, then the same prefix +
              a different short question B; the second request's TTFT is the figure.
* concurrency N parallel decode streams (distinct prompts); aggregate output tok/s =
              sum(output_tokens) / wall time from the first request sent to the last
              stream finished.

Each measurement is repeated (--repeat) and the median reported, along with min/max.

    python -m bench.client --url http://127.0.0.1:8000 --scenario all
    python -m bench.client --url http://127.0.0.1:8001 --api openai --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

SCENARIOS = ("decode", "prefill", "followup", "concurrency")

# Long-output prompts. SmolLM2-135M-Instruct at temperature 0 runs these to max_tokens (400)
# with llama-cpp-python; counting prompts ("Count from 1 to 500 ...") make it stop after
# 20-160 tokens depending on wording. The concurrency scenario gives every stream a different
# subject: identical in-flight requests may legitimately be folded into one generation by a
# server, which would not measure batching. Output length is whatever the server reports
# (see the "output_tokens" rows).
STORY_SUBJECTS = (
    "a dragon who learns to bake bread",
    "a robot who learns to paint",
    "a cat who sails across the ocean",
    "a lighthouse keeper who finds a map",
    "a girl who builds a clock tower",
    "an old fox who opens a library",
    "a knight who is afraid of the dark",
    "a farmer who grows a giant pumpkin",
)
_NAMES = ("Ada", "Bruno", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Hiro")


def story_prompt(i: int = 0) -> str:
    subject = STORY_SUBJECTS[i % len(STORY_SUBJECTS)]
    if i >= len(STORY_SUBJECTS):
        subject += f" named {_NAMES[(i // len(STORY_SUBJECTS) - 1) % len(_NAMES)]}"
        if i >= len(STORY_SUBJECTS) * (len(_NAMES) + 1):
            subject += f" (tale {i})"
    return f"Write a very long, detailed story about {subject}. Use at least 1000 words."


DECODE_PROMPT = story_prompt(0)

# A small vocabulary from which pseudo-random (but grammatical-looking) filler text is
# generated. Different seeds give different text, so nothing can be served from a cache.
_WORDS = (
    "river mountain engine window garden silver thunder pencil market harbor planet "
    "whisper lantern forest copper meadow signal bridge violet canyon ladder orbit "
    "compass marble feather glacier harvest island jacket kettle lemon mirror needle "
    "orchard pepper quartz ribbon saddle tunnel umbrella valley wagon yellow zebra "
    "anchor basket candle desert ember fabric granite hollow ivory jungle kingdom "
    "lizard magnet nectar oyster parcel quiver rocket sailor timber uniform velvet "
    "walnut yogurt blossom cobalt drizzle falcon gravel hammock insect juniper koala "
    "lagoon mosaic nutmeg onion pirate quilt raven spruce tulip urchin vortex willow"
).split()
_VERBS = (
    "carries watches builds follows remembers paints measures crosses gathers answers "
    "borrows describes explores fixes guards hides invites joins keeps lifts moves "
    "notices opens prepares questions repairs shapes teaches unlocks visits wraps"
).split()
_ADJS = (
    "quiet bright ancient narrow heavy gentle curious distant golden hidden honest "
    "lively modest noisy patient rapid rusty smooth steady tiny vast warm wild young"
).split()


def filler_text(n_words: int, seed: int | str) -> str:
    """Varied English-like text of roughly n_words words (deterministic per seed)."""
    rng = random.Random(seed)
    out: list[str] = []
    count = 0
    while count < n_words:
        s = (
            f"The {rng.choice(_ADJS)} {rng.choice(_WORDS)} {rng.choice(_VERBS)} "
            f"a {rng.choice(_ADJS)} {rng.choice(_WORDS)} near the {rng.choice(_WORDS)}"
        )
        if rng.random() < 0.4:
            s += f" while {rng.randint(2, 999)} {rng.choice(_WORDS)}s {rng.choice(_VERBS)[:-1]}"
        s += "."
        out.append(s)
        count += len(s.split())
    return " ".join(out)


def nonce() -> str:
    return uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------- streaming


@dataclass
class StreamResult:
    ok: bool = True
    error: str = ""
    t_send: float = 0.0
    t_first: float | None = None  # first content delta
    t_last: float | None = None  # last content delta
    t_end: float | None = None  # stream closed
    input_tokens: int | None = None  # the whole prompt, cached or not
    cache_read_tokens: int = 0  # of which read from the prefix cache (the final Anthropic usage)
    output_tokens: int | None = None
    n_deltas: int = 0
    stop_reason: str | None = None
    text: str = ""

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    @property
    def decode_tps(self) -> float | None:
        n = self.output_tokens if self.output_tokens is not None else self.n_deltas
        if self.t_first is None or self.t_last is None or n is None or n < 2:
            return None
        dt = self.t_last - self.t_first
        return (n - 1) / dt if dt > 0 else None


async def _sse_events(resp: httpx.Response):
    """Yield (event_name, data_str) pairs from a text/event-stream response."""
    event = None
    data: list[str] = []
    async for line in resp.aiter_lines():
        if line == "":
            if data or event:
                yield event, "\n".join(data)
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data or event:
        yield event, "\n".join(data)


class Client:
    def __init__(
        self,
        url: str,
        api: str = "anthropic",
        model: str | None = None,
        api_key: str = "bench",
        temperature: float | None = 0.0,
        timeout: float = 600.0,
    ):
        self.url = url.rstrip("/")
        self.api = api
        self.model = model
        self.temperature = temperature
        headers = {"content-type": "application/json"}
        if api == "anthropic":
            headers |= {"x-api-key": api_key, "anthropic-version": "2023-06-01"}
        else:
            headers |= {"authorization": f"Bearer {api_key}"}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def resolve_model(self) -> str:
        """If no model name was given, use the first id from GET /v1/models."""
        if self.model is None:
            self.model = "default"
            try:
                data = (await self.http.get(f"{self.url}/v1/models")).json().get("data") or []
                if data and data[0].get("id"):
                    self.model = data[0]["id"]
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
        return self.model

    async def stream(
        self, user: str, max_tokens: int, system: str | None = None, need_input_tokens: bool = False
    ) -> StreamResult:
        if self.api == "anthropic":
            return await self._stream_anthropic(user, max_tokens, system)
        r = await self._stream_openai(user, max_tokens, system)
        if r.ok and need_input_tokens and r.input_tokens is None:
            # Server streams no usage (llama-cpp-python ignores stream_options): ask for the
            # prompt size with an untimed non-streaming max_tokens=1 request of the same prompt.
            r.input_tokens = await self._openai_prompt_tokens(user, system)
        return r

    def _openai_messages(self, user: str, system: str | None) -> list[dict[str, str]]:
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        return messages

    async def _openai_prompt_tokens(self, user: str, system: str | None) -> int | None:
        body = {"model": self.model, "max_tokens": 1, "stream": False,
                "messages": self._openai_messages(user, system)}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        try:
            resp = await self.http.post(f"{self.url}/v1/chat/completions", json=body)
            u = resp.json().get("usage") or {}
            return int(u["prompt_tokens"]) if u.get("prompt_tokens") is not None else None
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    async def _stream_anthropic(self, user: str, max_tokens: int, system: str | None) -> StreamResult:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "stream": True,
            "messages": [{"role": "user", "content": user}],
        }
        if system is not None:
            body["system"] = system
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return await self.stream_message(body)

    async def stream_message(self, body: dict[str, Any]) -> StreamResult:
        """POST a whole Anthropic ``/v1/messages`` body (``stream`` true) and time its events."""
        r = StreamResult()
        parts: list[str] = []
        r.t_send = time.perf_counter()
        try:
            async with self.http.stream("POST", f"{self.url}/v1/messages", json=body) as resp:
                if resp.status_code != 200:
                    r.ok = False
                    r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                    return r
                async for event, data in _sse_events(resp):
                    now = time.perf_counter()
                    if not data:
                        continue
                    ev = json.loads(data)
                    typ = ev.get("type", event)
                    if typ == "content_block_delta":
                        d = ev.get("delta", {})
                        piece = d.get("text") or d.get("thinking") or d.get("partial_json") or ""
                        if piece:
                            if r.t_first is None:
                                r.t_first = now
                            r.t_last = now
                            r.n_deltas += 1
                            parts.append(piece)
                    elif typ == "message_start":
                        u = ev.get("message", {}).get("usage", {}) or {}
                        if u.get("input_tokens") is not None:
                            r.cache_read_tokens = int(u.get("cache_read_input_tokens") or 0)
                            r.input_tokens = int(u["input_tokens"]) + r.cache_read_tokens + int(
                                u.get("cache_creation_input_tokens") or 0)
                    elif typ == "message_delta":
                        u = ev.get("usage", {}) or {}
                        if u.get("output_tokens") is not None:
                            r.output_tokens = int(u["output_tokens"])
                        if "cache_read_input_tokens" in u:  # final usage: where the prompt came from
                            r.cache_read_tokens = int(u["cache_read_input_tokens"] or 0)
                            r.input_tokens = int(u.get("input_tokens") or 0) + r.cache_read_tokens + int(
                                u.get("cache_creation_input_tokens") or 0)
                        elif u.get("input_tokens") is not None and r.input_tokens is None:
                            r.input_tokens = int(u["input_tokens"])
                        r.stop_reason = (ev.get("delta") or {}).get("stop_reason", r.stop_reason)
                    elif typ == "error":
                        r.ok = False
                        r.error = data[:300]
                    elif typ == "message_stop":
                        break
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            r.ok = False
            r.error = f"{type(e).__name__}: {e}"
        r.t_end = time.perf_counter()
        r.text = "".join(parts)
        if r.t_first is None and r.ok:
            r.ok = False
            r.error = "no content delta received"
        return r

    async def _stream_openai(self, user: str, max_tokens: int, system: str | None) -> StreamResult:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": self._openai_messages(user, system),
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        r = StreamResult()
        parts: list[str] = []
        r.t_send = time.perf_counter()
        try:
            async with self.http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    r.ok = False
                    r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                    return r
                async for _event, data in _sse_events(resp):
                    now = time.perf_counter()
                    if not data:
                        continue
                    if data.strip() == "[DONE]":
                        break
                    ev = json.loads(data)
                    for ch in ev.get("choices") or []:
                        d = ch.get("delta") or {}
                        piece = d.get("content") or d.get("reasoning_content") or ""
                        if piece:
                            if r.t_first is None:
                                r.t_first = now
                            r.t_last = now
                            r.n_deltas += 1
                            parts.append(piece)
                        if ch.get("finish_reason"):
                            r.stop_reason = ch["finish_reason"]
                    u = ev.get("usage")
                    if u:
                        if u.get("completion_tokens") is not None:
                            r.output_tokens = int(u["completion_tokens"])
                        if u.get("prompt_tokens") is not None:
                            r.input_tokens = int(u["prompt_tokens"])
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            r.ok = False
            r.error = f"{type(e).__name__}: {e}"
        r.t_end = time.perf_counter()
        r.text = "".join(parts)
        if r.t_first is None and r.ok:
            r.ok = False
            r.error = "no content delta received"
        return r


# --------------------------------------------------------------------------- quiet guard

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat)."""
    f = open("/proc/stat").readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def proc_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _tree_cpu_s(pid: int | None) -> float:
    """utime+stime (+ reaped children's) of pid and its descendants, in seconds."""
    if pid is None:
        return 0.0
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                x = f.read().rsplit(")", 1)[1].split()
            total += int(x[11]) + int(x[12]) + int(x[13]) + int(x[14])
        except (OSError, IndexError, ValueError):
            pass
    return total / _TICK


class Guard:
    """Measures how much CPU *other* processes (not the server's process tree, not this
    client) used while a sample ran, and optionally retries samples taken while the machine
    was busy. On a shared 2-core box one pytest run halves every figure; this makes that
    visible (and, with max_other_cores set, avoids it).
    """

    def __init__(self, server_pid: int | None = None, max_other_cores: float | None = None,
                 retries: int = 3, settle_timeout: float = 120.0, budget: float = 1800.0):
        self.enabled = os.path.exists("/proc/stat")
        self.server_pid = server_pid
        self.max_other = max_other_cores
        self.retries = retries
        self.settle_timeout = settle_timeout
        # After this many seconds in total, stop waiting and retrying: take samples as
        # they come (their other-process CPU is still recorded).
        self.deadline = time.perf_counter() + budget
        self.discarded = 0
        self.others: list[float] = []  # other-process cores during each kept sample

    def _snap(self) -> tuple[float, float, float, float]:
        t = os.times()
        return (time.perf_counter(), _machine_busy_s(), _tree_cpu_s(self.server_pid),
                t.user + t.system)

    def _other(self, a: tuple[float, float, float, float]) -> float:
        b = self._snap()
        wall = b[0] - a[0]
        return max(0.0, (b[1] - a[1]) - (b[2] - a[2]) - (b[3] - a[3])) / wall if wall > 0 else 0.0

    async def settle(self) -> None:
        """Wait until other processes use less than max_other cores (1 s windows)."""
        if not self.enabled or self.max_other is None:
            return
        deadline = min(time.perf_counter() + self.settle_timeout, self.deadline)
        while time.perf_counter() < deadline:
            a = self._snap()
            await asyncio.sleep(1.0)
            if self._other(a) <= self.max_other:
                return

    async def sample(self, fn):
        """Run one measurement coroutine fn(); retry it if the machine was busy meanwhile."""
        if not self.enabled:
            return await fn()
        for attempt in range(self.retries + 1):
            await self.settle()
            a = self._snap()
            res = await fn()
            other = self._other(a)
            if (self.max_other is None or other <= self.max_other or attempt == self.retries
                    or time.perf_counter() > self.deadline):
                self.others.append(other)
                return res
            self.discarded += 1
            print(f"  (sample discarded: other processes used {other:.2f} cores)", file=sys.stderr)


# --------------------------------------------------------------------------- scenarios


@dataclass
class Metric:
    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def row(self) -> dict[str, Any]:
        v = self.values
        return {
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": min(v) if v else None,
            "max": max(v) if v else None,
            "n": len(v),
            "values": v,
            "note": self.note,
        }


def _check(r: StreamResult, what: str) -> StreamResult:
    if not r.ok:
        raise RuntimeError(f"{what} failed: {r.error}")
    return r


async def scenario_decode(c: Client, g: Guard, repeat: int, max_tokens: int) -> list[Metric]:
    tps = Metric("decode", "tok/s")
    ttft = Metric("decode TTFT (short prompt)", "ms")
    outn = Metric("decode output_tokens", "tok")

    async def one() -> StreamResult:
        return _check(await c.stream(DECODE_PROMPT, max_tokens), "decode")

    for _ in range(repeat):
        r = await g.sample(one)
        if r.decode_tps is not None:
            tps.values.append(r.decode_tps)
        ttft.values.append(r.ttft * 1e3)
        outn.values.append(float(r.output_tokens if r.output_tokens is not None else r.n_deltas))
        if r.output_tokens is None:
            outn.note = tps.note = "server sent no usage; counted stream deltas"
    return [tps, ttft, outn]


async def scenario_prefill(c: Client, g: Guard, repeat: int, words: int) -> list[Metric]:
    tps = Metric("prefill (cold)", "tok/s")
    ttft = Metric("prefill TTFT (cold)", "ms")
    inn = Metric("prefill input_tokens", "tok")

    async def one() -> StreamResult:
        n = nonce()
        prompt = (
            f"[{n}] Read the following notes and then answer with one word.\n\n"
            + filler_text(words, n)
            + "\n\nWhich object is mentioned first? Answer with one word."
        )
        return _check(await c.stream(prompt, 4, need_input_tokens=True), "prefill")

    for _ in range(repeat):
        r = await g.sample(one)
        ttft.values.append(r.ttft * 1e3)
        if r.input_tokens:
            inn.values.append(float(r.input_tokens))
            tps.values.append(r.input_tokens / r.ttft)
        else:
            tps.note = "server sent no input_tokens"
    return [tps, ttft, inn]


_QUESTIONS = [
    "Which object is mentioned first? One word.",
    "Name any colour that appears in the notes. One word.",
    "Which verb appears most often? One word.",
    "How many sentences mention a river? Answer with a number.",
]


async def scenario_followup(c: Client, g: Guard, repeat: int, words: int) -> list[Metric]:
    cold = Metric("followup: first request TTFT (cold prefix)", "ms")
    warm = Metric("followup: second request TTFT (shared prefix)", "ms")
    inn = Metric("followup input_tokens", "tok")

    def one(i: int):
        async def run() -> tuple[StreamResult, StreamResult]:
            n = nonce()
            system = f"[{n}] You are a careful assistant. Here are the notes:\n\n" + filler_text(words, n)
            qa, qb = _QUESTIONS[i % len(_QUESTIONS)], _QUESTIONS[(i + 1) % len(_QUESTIONS)]
            r1 = _check(await c.stream(qa, 4, system=system), "followup first")
            r2 = _check(await c.stream(qb, 4, system=system, need_input_tokens=True), "followup second")
            return r1, r2
        return run

    for i in range(repeat):
        r1, r2 = await g.sample(one(i))
        cold.values.append(r1.ttft * 1e3)
        warm.values.append(r2.ttft * 1e3)
        if r2.input_tokens:
            inn.values.append(float(r2.input_tokens))
    return [cold, warm, inn]


async def scenario_concurrency(c: Client, g: Guard, repeat: int, n_streams: int,
                               max_tokens: int) -> list[Metric]:
    agg = Metric(f"concurrency x{n_streams}: aggregate output", "tok/s")
    per = Metric(f"concurrency x{n_streams}: per-stream decode", "tok/s")
    ttft = Metric(f"concurrency x{n_streams}: TTFT (median of streams)", "ms")
    outn = Metric(f"concurrency x{n_streams}: output_tokens (sum of streams)", "tok")

    async def one() -> tuple[list[StreamResult], float]:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(c.stream(story_prompt(i), max_tokens) for i in range(n_streams)))
        t1 = time.perf_counter()
        for r in rs:
            _check(r, "concurrency stream")
        return rs, t1 - t0

    for _ in range(repeat):
        rs, wall = await g.sample(one)
        total = sum(r.output_tokens if r.output_tokens is not None else r.n_deltas for r in rs)
        if any(r.output_tokens is None for r in rs):
            agg.note = "server sent no usage; counted stream deltas"
        agg.values.append(total / wall)
        outn.values.append(float(total))
        per.values.append(statistics.median(r.decode_tps or 0.0 for r in rs))
        ttft.values.append(statistics.median(r.ttft * 1e3 for r in rs))
    return [agg, per, ttft, outn]


async def warmup(c: Client) -> None:
    _check(await c.stream("Say hello.", 8), "warmup")


async def run_scenarios(
    url: str,
    api: str = "anthropic",
    model: str | None = None,
    scenarios: tuple[str, ...] = SCENARIOS,
    repeat: int = 3,
    decode_tokens: int = 400,
    prefill_words: int = 1200,
    followup_words: int = 1200,
    concurrency: int = 4,
    temperature: float | None = 0.0,
    guard: Guard | None = None,
) -> list[Metric]:
    """Run the scenarios; returns metrics plus a final 'other processes' CPU' metric."""
    g = guard or Guard()
    c = Client(url, api=api, model=model, temperature=temperature)
    try:
        await c.resolve_model()
        await warmup(c)
        out: list[Metric] = []
        for s in scenarios:
            try:
                if s == "decode":
                    out += await scenario_decode(c, g, repeat, decode_tokens)
                elif s == "prefill":
                    out += await scenario_prefill(c, g, repeat, prefill_words)
                elif s == "followup":
                    out += await scenario_followup(c, g, repeat, followup_words)
                elif s == "concurrency":
                    out += await scenario_concurrency(c, g, repeat, concurrency, decode_tokens)
                else:
                    raise ValueError(f"unknown scenario {s!r}")
            except RuntimeError as e:  # one failing scenario should not lose the others
                print(f"scenario {s} failed: {e}", file=sys.stderr)
                out.append(Metric(f"{s} FAILED", "", note=str(e)[:200]))
        if g.enabled:
            note = f"{g.discarded} busy samples discarded" if g.max_other is not None else ""
            out.append(Metric("other processes' CPU during samples", "cores", list(g.others), note))
        return out
    finally:
        await c.aclose()


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown_table(metrics: list[Metric]) -> str:
    lines = ["| metric | median | min | max | n | unit |", "|---|---:|---:|---:|---:|---|"]
    for m in metrics:
        r = m.row()
        name = m.name + (f" ({m.note})" if m.note else "")
        lines.append(
            f"| {name} | {fmt(r['median'])} | {fmt(r['min'])} | {fmt(r['max'])} | {r['n']} | {m.unit} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api", choices=("anthropic", "openai"), default="anthropic",
                   help="anthropic: POST /v1/messages; openai: POST /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    p.add_argument("--scenario", default="all",
                   help="decode|prefill|followup|concurrency|all, or a comma-separated list")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=400, help="max_tokens for decode/concurrency")
    p.add_argument("--prefill-words", type=int, default=1200, help="~words of filler in the cold prompt")
    p.add_argument("--followup-words", type=int, default=1200, help="~words in the shared prefix")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--no-temperature", action="store_true", help="do not send temperature=0")
    p.add_argument("--server-pid", type=int, default=None,
                   help="server PID (same machine): its CPU is not counted as 'other processes'")
    p.add_argument("--max-other-cores", type=float, default=None,
                   help="retry samples during which other processes used more CPU than this "
                        "(needs --server-pid; e.g. 0.2 on a shared 2-core machine)")
    p.add_argument("--guard-budget", type=float, default=1800.0,
                   help="seconds in total to spend waiting for a quiet machine")
    p.add_argument("--json", metavar="PATH", help="also write results as JSON")
    return p


def parse_scenarios(s: str) -> tuple[str, ...]:
    if s == "all":
        return SCENARIOS
    out = tuple(x.strip() for x in s.split(",") if x.strip())
    for x in out:
        if x not in SCENARIOS:
            raise SystemExit(f"unknown scenario {x!r}; choose from {', '.join(SCENARIOS)} or all")
    return out


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.max_other_cores is not None and a.server_pid is None:
        raise SystemExit("--max-other-cores needs --server-pid (else the server's own CPU counts)")
    metrics = asyncio.run(
        run_scenarios(
            a.url,
            api=a.api,
            model=a.model,
            scenarios=parse_scenarios(a.scenario),
            repeat=a.repeat,
            decode_tokens=a.decode_tokens,
            prefill_words=a.prefill_words,
            followup_words=a.followup_words,
            concurrency=a.concurrency,
            temperature=None if a.no_temperature else 0.0,
            guard=Guard(a.server_pid, a.max_other_cores, budget=a.guard_budget),
        )
    )
    print(f"\n{a.url} ({a.api}, model={a.model or 'auto'}, repeat={a.repeat})\n")
    print(markdown_table(metrics))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"url": a.url, "api": a.api, "model": a.model, "repeat": a.repeat,
                 "metrics": [m.row() for m in metrics]},
                f, indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
