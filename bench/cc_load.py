"""Claude Code-shaped load, with and without tools: is the tool grammar free?

S concurrent sessions × T turns. Every request is Claude Code's captured first request
(tests/fixtures/claude_code_request.json: its system prompt, adaptive thinking, no temperature —
Claude Code never sends one) with its tools cut to ``--tools`` of them (default Bash and Read),
or with no tools at all (``--mode none``), or with their definitions pasted into the system
prompt as text (``--mode text``: about the same prompt length, no grammar — what isolates the
grammar's cost from the longer prompt's attention); each session's first message carries its own nonce
and each next turn appends the answer and a new user message. The measure is the aggregate
output rate (all sessions' output tokens from ``usage`` over the wall time of the round), in
rounds alternating tools / no tools so drift hits both alike; the ratio is the point.

    python -m bench.cc_load --url http://127.0.0.1:7799 --sessions 8 --turns 3 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.client import Client, StreamResult

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "claude_code_request.json"


def base_request(tools: list[str] | None, max_tokens: int, as_text: bool = False) -> dict[str, Any]:
    """The captured request with only ``tools`` (None: no tools) and ``max_tokens``;
    ``as_text``: the tools' definitions appended to the system prompt as plain text instead
    (a prompt of about the same length, no tools: no grammar)."""
    body = json.loads(FIXTURE.read_text())
    if as_text:
        listed = [t for t in body["tools"] if t["name"] in (tools or [])]
        body["system"] = list(body["system"]) + [{"type": "text", "text": "# Tools you may call\n"
                                                  "Call a tool inside <tool_call></tool_call> tags.\n"
                                                  + json.dumps(listed)}]
        tools = None
    if tools is None:
        body.pop("tools", None)
        body.pop("tool_choice", None)
    else:
        body["tools"] = [t for t in body["tools"] if t["name"] in tools]
        missing = set(tools) - {t["name"] for t in body["tools"]}
        if missing:
            raise SystemExit(f"no such tools in the fixture: {sorted(missing)}")
    body["max_tokens"] = max_tokens
    body["stream"] = True
    return body


async def session(c: Client, base: dict[str, Any], turns: int) -> list[StreamResult]:
    body = copy.deepcopy(base)
    body["messages"] = [{"role": "user", "content": f"[{uuid.uuid4().hex}] Look around this "
                         "repository and tell me what it does."}]
    results = []
    for turn in range(turns):
        r = await c.stream_message(body)
        results.append(r)
        if not r.ok:
            break
        body["messages"] += [{"role": "assistant", "content": r.text or "(nothing)"},
                             {"role": "user", "content": f"Go on (turn {turn + 2})."}]
    return results


async def one_round(c: Client, base: dict[str, Any], sessions: int, turns: int) -> dict[str, Any]:
    started = time.perf_counter()
    done = await asyncio.gather(*(session(c, base, turns) for _ in range(sessions)))
    wall = time.perf_counter() - started
    flat = [r for rs in done for r in rs]
    bad = [r.error for r in flat if not r.ok]
    out = sum(r.output_tokens or 0 for r in flat if r.ok)
    ttfts = [r.ttft for r in flat if r.ok and r.ttft is not None]
    inputs = [r.input_tokens for r in flat if r.ok and r.input_tokens]
    return {"wall_s": wall, "output_tokens": out, "tok_s": out / wall, "requests": len(flat),
            "input_tokens_median": statistics.median(inputs) if inputs else None,
            "failed": len(bad), "errors": bad[:3],
            "tool_use_stops": sum(r.stop_reason == "tool_use" for r in flat),
            "ttft_median_ms": 1000 * statistics.median(ttfts) if ttfts else None}


async def run(a: argparse.Namespace) -> dict[str, Any]:
    c = Client(a.url, temperature=None, timeout=a.timeout)
    await c.resolve_model()
    names = a.tools.split(",")
    modes = {"tools": base_request(names, a.max_tokens), "none": base_request(None, a.max_tokens),
             "text": base_request(names, a.max_tokens, as_text=True)}
    order = {"both": ["tools", "none"], "all": ["tools", "none", "text"]}.get(a.mode, [a.mode])
    for name in order:  # warm: each prompt prefix cached, each grammar compiled
        await one_round(c, modes[name], 1, 1)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    for i in range(a.rounds):
        for name in (order if i % 2 == 0 else order[::-1]):
            r = await one_round(c, modes[name], a.sessions, a.turns)
            rounds[name].append(r)
            print(f"round {i + 1} {name}: {r['tok_s']:.0f} tok/s ({r['output_tokens']} tokens in "
                  f"{r['wall_s']:.1f} s, prompt median {r['input_tokens_median']}, "
                  f"{r['failed']} failed, {r['tool_use_stops']} tool_use "
                  f"stops, TTFT median {r['ttft_median_ms'] or 0:.0f} ms)", flush=True)
    await c.aclose()
    summary = {name: statistics.median(r["tok_s"] for r in rs) for name, rs in rounds.items()}
    if "tools" in summary and "none" in summary:
        summary["ratio_tools_over_none"] = summary["tools"] / summary["none"]
    if "tools" in summary and "text" in summary:
        summary["ratio_tools_over_text"] = summary["tools"] / summary["text"]
    return {"args": vars(a), "rounds": rounds, "median_tok_s": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cc_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--tools", default="Bash,Read", help="the fixture's tools to keep")
    p.add_argument("--mode", choices=["both", "all", "tools", "none", "text"], default="both",
                   help="both: tools and none; all: also text (the tools' definitions as system "
                        "text: the same prompt length without a grammar)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None, help="write the rounds here")
    a = p.parse_args(argv)
    result = asyncio.run(run(a))
    print(json.dumps(result["median_tok_s"]))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    failed = sum(r["failed"] for rs in result["rounds"].values() for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
