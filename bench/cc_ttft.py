"""Cold prefill vs the follow-up turn's TTFT on Claude Code's real ~20k-token first request
(``bench/replay.py``'s turns, for ``bench/gpu_bench.py --scenarios cc`` and
``bench/cpu_hybrid_followup.py``).

Each repeat: turn 1 (the captured request, a nonce block at the head of ``system`` and its tools
rotated by the repeat's index, so that no repeat's turn 1 hits an earlier one's cache whether a
template renders the tools before the system text or after it), a side request with another short system prompt (Claude Code's
title call), then turn 2 (turn 1 + one ``tool_use``/``tool_result`` round trip, a new billing
header), both with ``max_tokens`` 1: the one token is sent when it is sampled, so the time to
it is the prefill. One unrecorded session first (its own rotation) takes the one-time costs (kernel
compiles, first-use allocations) out of the recorded cold turns. The issue's target: turn 2's TTFT ≤ 5% of turn 1's on every hybrid family.
"""

from __future__ import annotations

import copy
import json
import random

from bench.client import Client, Metric, nonce
from bench.replay import FIXTURE, main_turn, side_request

DROPPED = ("context_management", "metadata")  # beta fields other servers need not take


def first_request(tag: str, max_tokens: int = 1, tools: int | None = None,
                  rotate: int = 0) -> dict:
    """The captured request with a ``[tag]`` block first in ``system`` (after the billing
    header, which Pensieve drops: the tag changes every token after it); ``tools``: keep only
    the first that many of its 24 tools (a shorter prompt for the CPU); ``rotate``: the tools
    list rotated left by that many (a template that renders tools first then starts apart)."""
    body = json.loads(FIXTURE.read_text())
    if tools is not None:
        body["tools"] = body["tools"][:tools]
    if rotate and body["tools"]:
        k = rotate % len(body["tools"])
        body["tools"] = body["tools"][k:] + body["tools"][:k]
    for key in DROPPED:
        body.pop(key, None)
    body["system"] = copy.deepcopy(body["system"])
    body["system"].insert(1, {"type": "text", "text": f"[session {tag}]"})
    body["max_tokens"] = max_tokens
    return body


def _ttft_ms(r) -> float:  # noqa: ANN001 - a bench.client.StreamResult
    if not r.ok and r.error != "no content delta received":
        raise RuntimeError(f"request failed: {r.error}")
    return ((r.t_first or r.t_end) - r.t_send) * 1e3


async def _session(c: Client, first: dict, rng: random.Random, side: bool):  # noqa: ANN202
    r1 = await c.stream_message(main_turn(first, 0, rng, 1))
    if side:
        s = await c.stream_message(side_request(first["model"], 0))
        if not s.ok:
            raise RuntimeError(f"side request failed: {s.error}")
    r2 = await c.stream_message(main_turn(first, 1, rng, 1))
    return r1, r2


async def scenario_cc(c: Client, repeat: int, side: bool = True,
                      tools: int | None = None, warm_up: bool = True) -> list[Metric]:
    cold = Metric("Claude Code turn 1 (cold): TTFT", "ms",
                  note="" if tools is None else f"the request cut to {tools} of its 24 tools")
    rate = Metric("Claude Code turn 1: prefill", "tok/s")
    follow = Metric("Claude Code turn 2 (follow-up on that prefix): TTFT", "ms")
    ratio = Metric("turn 2 TTFT / turn 1 TTFT (target ≤ 5%)", "%")
    reused = Metric("turn 2 prompt tokens read from the cache (usage)", "tok")
    size = Metric("turn 1 / turn 2 prompt tokens", "tok")
    rng = random.Random(0)
    if warm_up:  # its own rotation (past the recorded ones): no recorded turn 1 hits it
        w1, w2 = await _session(c, first_request(nonce(), tools=tools, rotate=repeat + 1), rng, side)
        _ttft_ms(w1), _ttft_ms(w2)  # a failed warm-up fails the scenario
    for k in range(repeat):
        first = first_request(nonce(), tools=tools, rotate=k)
        r1, r2 = await _session(c, first, rng, side)
        t1, t2 = _ttft_ms(r1), _ttft_ms(r2)
        cold.values.append(t1)
        follow.values.append(t2)
        ratio.values.append(100.0 * t2 / t1)
        if r1.input_tokens:
            rate.values.append(r1.input_tokens / (t1 / 1e3))
            size.values.append(float(r1.input_tokens))
        if r2.input_tokens:
            size.values.append(float(r2.input_tokens))
            reused.values.append(float(r2.cache_read_tokens))
    if not reused.values:
        reused.note = "server sent no usage"
    return [cold, rate, follow, ratio, reused, size]
