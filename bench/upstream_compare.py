"""Pensieve in front of vLLM versus vLLM's own ``/v1/messages``: the same model, the same
captured Claude Code turns, one replica each (both fresh, so neither inherits the other's cache).

    python bench/upstream_compare.py --pensieve http://127.0.0.1:7777 \\
        --pensieve-replica http://127.0.0.1:8001 --vllm http://127.0.0.1:8002

``--pensieve`` is ``pensieve serve --backend upstream --upstream <pensieve-replica>``; ``--vllm``
is a second replica, asked directly. Measured on each path, from the replica's own Prometheus
counters (``vllm:prompt_tokens`` / ``vllm:prompt_tokens_cached``):

- prefix tokens re-prefilled per turn of a conversation built from
  ``tests/fixtures/claude_code_request.json`` (tools cut to ``--tools``), each turn with a fresh
  billing-header suffix as Claude Code sends it;
- tool-call parse rate: of ``--tool-trials`` requests that ask for a tool, how many come back
  as a ``tool_use`` block whose input validates against the tool's schema;
- ``count_tokens`` exactness: the endpoint's answer against the prompt tokens the replica
  actually prefilled for the same body.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import jsonschema

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "claude_code_request.json"
FOLLOW_UPS = ("Thanks. Now list the files in the current directory.",
              "Good. What does the README say about installation?",
              "Summarise what you found in one sentence.",
              "Which file would you change first, and why?")
ASKS = {"Read": "Use the Read tool to read the file /etc/hostname.",
        "Bash": "Run `ls -la` with the Bash tool."}
HEADERS = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}


def metric(replica: str, name: str) -> float:
    text = httpx.get(replica + "/metrics", timeout=30).text
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def counters(replica: str) -> tuple[float, float]:
    return metric(replica, "vllm:prompt_tokens_total"), metric(replica, "vllm:prompt_tokens_cached_total")


def base_request(tools: set[str], max_tokens: int) -> dict[str, Any]:
    body = json.loads(FIXTURE.read_text())
    body["tools"] = [t for t in body.get("tools", []) if t["name"] in tools]
    body.update(stream=False, max_tokens=max_tokens, temperature=0)
    body.pop("thinking", None)  # SmolLM2 does not think; keep both paths on plain text
    body.pop("context_management", None)
    body.pop("output_config", None)
    return body


def fresh_billing(body: dict[str, Any]) -> dict[str, Any]:
    """Claude Code's billing header changes its 3-hex suffix on every request."""
    body = copy.deepcopy(body)
    first = body["system"][0]
    first["text"] = re.sub(r"cc_version=([0-9.]+)\.[0-9a-f]{3};",
                           lambda m: f"cc_version={m.group(1)}.{secrets.token_hex(2)[:3]};", first["text"])
    return body


def post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(base + path, json=body, headers=HEADERS, timeout=600)
    if reply.status_code != 200:
        raise RuntimeError(f"{base}{path}: {reply.status_code} {reply.text[:500]}")
    return reply.json()


def conversation(base: str, replica: str, body: dict[str, Any], turns: int) -> list[dict[str, Any]]:
    rows = []
    for turn in range(turns):
        body = fresh_billing(body)
        counted = post(base, "/v1/messages/count_tokens",
                       {k: body[k] for k in ("model", "messages", "system", "tools") if k in body})
        before = counters(replica)
        reply = post(base, "/v1/messages", body)
        after = counters(replica)
        prompt, cached = after[0] - before[0], after[1] - before[1]
        rows.append({"turn": turn + 1, "prompt": int(prompt), "cached": int(cached),
                     "reprefilled": int(prompt - cached), "count_tokens": counted["input_tokens"],
                     "stop": reply.get("stop_reason")})
        body = copy.deepcopy(body)
        body["messages"].append({"role": "assistant", "content": reply["content"] or
                                 [{"type": "text", "text": "(no answer)"}]})
        results = [{"type": "tool_result", "tool_use_id": b["id"], "content": "done"}
                   for b in reply["content"] if b.get("type") == "tool_use"]
        body["messages"].append({"role": "user", "content": [
            *results, {"type": "text", "text": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]})
    return rows


def tool_rate(base: str, body: dict[str, Any], trials: int, short: bool = False,
              choice: str | None = None) -> tuple[int, int]:
    """``short``: the ask alone with the tools (no Claude Code system prompt or history);
    ``choice``: a ``tool_choice`` type (Claude Code sends none: auto)."""
    schemas = {t["name"]: t["input_schema"] for t in body["tools"]}
    ok = 0
    for i in range(trials):
        trial = fresh_billing(body)
        trial.update(temperature=1.0, max_tokens=160)
        if choice is not None:
            trial["tool_choice"] = {"type": choice}
        asks = [ASKS[name] for name in schemas if name in ASKS]
        history = [] if short else trial["messages"][:-1]
        if short:
            trial.pop("system", None)
        trial["messages"] = [*history, {"role": "user", "content": asks[i % len(asks)]}]
        try:
            reply = post(base, "/v1/messages", trial)
        except RuntimeError as exc:  # the server failed the request: not a parsed call
            print(f"  trial {i + 1}: {str(exc)[:160]}")
            continue
        calls = [b for b in reply["content"] if b.get("type") == "tool_use" and b.get("name") in schemas]
        try:
            for call in calls:
                jsonschema.validate(call["input"], schemas[call["name"]])
        except jsonschema.ValidationError:
            continue
        ok += bool(calls)
    return ok, trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pensieve", required=True)
    ap.add_argument("--pensieve-replica", required=True)
    ap.add_argument("--vllm", required=True)
    ap.add_argument("--model", default="claude-sonnet-5")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--tool-trials", type=int, default=10)
    ap.add_argument("--tools", default="Read", help="the captured request's tools kept (its 24 "
                    "are ~19k tokens; Read alone keeps 3.7k, in SmolLM2's 4096 of the CPU test)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--only", choices=("pensieve", "vllm"), help="run one path (each needs a fresh "
                    "replica: a second run of the same path starts with the first run's cache)")
    ns = ap.parse_args()
    body = base_request(set(ns.tools.split(",")), ns.max_tokens)
    vllm_model = httpx.get(ns.vllm + "/v1/models", timeout=30).json()["data"][0]["id"]
    report = {}
    for name, base, replica, model in (("pensieve", ns.pensieve, ns.pensieve_replica, ns.model),
                                       ("vllm", ns.vllm, ns.vllm, vllm_model)):
        if ns.only not in (None, name):
            continue
        request = dict(body, model=model)
        rows = conversation(base, replica, request, ns.turns)
        ok, trials = tool_rate(base, request, ns.tool_trials)
        short_ok, _ = tool_rate(base, request, ns.tool_trials, short=True)
        forced, _ = tool_rate(base, request, ns.tool_trials, short=True, choice="any")
        report[name] = {"turns": rows, "tool_calls_valid": f"{ok}/{trials}",
                        "tool_calls_valid_short": f"{short_ok}/{trials}",
                        "tool_calls_valid_forced_any": f"{forced}/{trials}"}
        print(f"\n== {name} ({base})")
        print("turn  prompt  cached  re-prefilled  count_tokens  exact")
        for r in rows:
            exact = "yes" if r["count_tokens"] == r["prompt"] else f"off by {r['count_tokens'] - r['prompt']}"
            print(f"{r['turn']:>4}  {r['prompt']:>6}  {r['cached']:>6}  {r['reprefilled']:>12}  "
                  f"{r['count_tokens']:>12}  {exact}")
        print(f"tool calls parsed and schema-valid: {ok}/{trials} in the captured context, "
              f"{short_ok}/{trials} asked alone, {forced}/{trials} with tool_choice any")
    print("\n" + json.dumps(report))


if __name__ == "__main__":
    main()
