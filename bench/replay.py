"""A Claude Code-shaped multi-turn replay: does each follow-up turn prefill only what is new?

Turn 1 is Claude Code's real first request (tests/fixtures/claude_code_request.json: 24
tools, system prompt, environment block — ~19.7k tokens with SmolLM2's tokenizer). Each next
turn resends the whole history plus the previous turn's assistant ``tool_use`` and the user's
``tool_result``, with a fresh ``x-anthropic-billing-header`` (Claude Code changes it every
request) — and between turns a side request with a different, short system prompt arrives,
as Claude Code's title/summary calls do. Per turn: prompt tokens, tokens new since the last
turn's prompt, tokens prefilled (not read from the prefix cache, from the API's usage), and
TTFT, streamed over ``/v1/messages``.

    pensieve serve --context-length 32768 --port 8000 &
    python -m bench.replay --url http://127.0.0.1:8000 --turns 4 --json replay.json

The server needs a context that holds the request (SmolLM2: ``--context-length 32768``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.client import Client

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "claude_code_request.json"
BILLING = "x-anthropic-billing-header:"


@dataclass
class TurnResult:
    turn: str
    prompt_tokens: int
    new_tokens: int | None  # prompt tokens beyond the previous main turn's prompt
    prefilled: int  # prompt tokens not served from the prefix cache
    cache_read: int
    ttft_ms: float
    output_tokens: int
    stop_reason: str | None


def billing_header(rng: random.Random) -> str:
    suffix = "".join(rng.choice("0123456789abcdef") for _ in range(3))
    return f"{BILLING} cc_version=2.1.331.{suffix}; cc_entrypoint=cli;"


def main_turn(first: dict[str, Any], k: int, rng: random.Random, max_tokens: int) -> dict[str, Any]:
    """Turn ``k`` (0-based): turn 1's body + k tool round trips, a new billing header."""
    body = copy.deepcopy(first)
    for block in body["system"]:
        if block.get("type") == "text" and block["text"].startswith(BILLING):
            block["text"] = billing_header(rng)
    for i in range(k):
        call_id = f"toolu_replay{i:02d}{'x' * 14}"
        body["messages"] += [
            {"role": "assistant", "content": [
                {"type": "text", "text": f"Let me check step {i + 1}."},
                {"type": "tool_use", "id": call_id, "name": "Bash",
                 "input": {"command": f"ls -la src/part{i}", "description": f"List part {i}"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call_id,
                 "content": f"total {8 * (i + 1)}\n-rw-r--r-- 1 user user 120 main{i}.py\n",
                 "cache_control": {"type": "ephemeral"}}]},
        ]
    body.update(max_tokens=max_tokens, stream=True, temperature=0)
    return body


def side_request(model: str, k: int) -> dict[str, Any]:
    return {
        "model": model, "max_tokens": 16, "stream": True, "temperature": 0,
        "system": [{"type": "text", "text": "Summarize the topic of the conversation in five words."}],
        "messages": [{"role": "user", "content": f"Turn {k}: the user asked to list files in src/part{k}."}],
    }


async def send(client: Client, body: dict[str, Any], label: str) -> TurnResult:
    r = await client.stream_message(body)
    if not r.ok or r.input_tokens is None or r.ttft is None:
        raise SystemExit(f"{label}: {r.error or 'no usage in the stream'}")
    return TurnResult(label, r.input_tokens, None, r.input_tokens - r.cache_read_tokens,
                      r.cache_read_tokens, r.ttft * 1e3, r.output_tokens or 0, r.stop_reason)


async def replay(url: str, turns: int, max_tokens: int, side: bool, seed: int) -> list[TurnResult]:
    rng = random.Random(seed)
    first = json.loads(FIXTURE.read_text())
    client = Client(url, api_key="bench", temperature=0.0, timeout=3600)
    try:
        model = first["model"]
        results: list[TurnResult] = []
        previous: int | None = None
        for k in range(turns):
            result = await send(client, main_turn(first, k, rng, max_tokens), f"turn {k + 1}")
            result.new_tokens = None if previous is None else result.prompt_tokens - previous
            previous = result.prompt_tokens
            results.append(result)
            print(table_row(result), file=sys.stderr, flush=True)
            if side and k + 1 < turns:
                results.append(await send(client, side_request(model, k), f"side {k + 1}"))
                print(table_row(results[-1]), file=sys.stderr, flush=True)
    finally:
        await client.aclose()
    return results


HEADER = ("| request | prompt tokens | new since last turn | prefilled | cache read | TTFT ms | out |\n"
          "|---|---:|---:|---:|---:|---:|---:|")


def table_row(r: TurnResult) -> str:
    new = "—" if r.new_tokens is None else str(r.new_tokens)
    return (f"| {r.turn} | {r.prompt_tokens} | {new} | {r.prefilled} | {r.cache_read} | "
            f"{r.ttft_ms:.0f} | {r.output_tokens} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--no-side", action="store_true", help="no side request between turns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16,
                   help="the server's KV block: a turn may re-prefill up to one partial block")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results = asyncio.run(replay(args.url, args.turns, args.max_tokens, not args.no_side, args.seed))
    print(HEADER)
    for r in results:
        print(table_row(r))
    follow = [r for r in results if r.turn.startswith("turn") and r.new_tokens is not None]
    # the reply of the previous turn is re-rendered in the prompt, and a partial block is
    # recomputed: "only new tokens" allows one block beyond what the prompt added
    ok = all(r.prefilled <= r.new_tokens + args.block_size for r in follow)
    print(f"\nfollow-up turns prefilling only their new tokens (+ at most one block): "
          f"{'yes' if ok else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
