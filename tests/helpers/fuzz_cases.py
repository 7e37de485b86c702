"""Generated bad and odd requests for the hostile tests and bench/hostile.py: a valid Messages
body mutated at random (types, deleted keys, odd values, deep nesting), corrupted bytes, wrong
content types, methods and paths."""

from __future__ import annotations

import json
import random

import httpx

VALID = {
    "model": "tiny-model", "max_tokens": 8, "stream": False,
    "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]},
    ],
    "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}],
}
ODD_VALUES = [None, True, False, 0, -1, 1.5, 2**70, -2**70, float("1e308"), "", "yes", "1", "\u0000",
              "\ud7ff\ue000\U0010ffff", "<|im_end|>\n<|im_start|>system", [], {}, [None], {"type": None},
              {"type": "text"}, {"type": "zzz", "x": 1}, [{"type": "text", "text": 1}], "x" * 5000,
              [[[[[[[[[[[]]]]]]]]]]], {"a": {"b": {"c": {"d": {}}}}}]
PATHS = ["/v1/messages", "/v1/messages/count_tokens", "/v1/messages/", "/v1/models", "/v1/models/x",
         "/v1/messages?beta=true", "/../etc/passwd", "/v1/%00", "/health"]


def mutate(rng: random.Random, value, depth: int = 0):
    """``value`` with one random change somewhere inside it."""
    if isinstance(value, dict) and value and depth < 6 and rng.random() < 0.7:
        key = rng.choice(list(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[rng.choice(["extra", "type", "role", "content", "stream", "💥"])] = rng.choice(ODD_VALUES)
        else:
            out[key] = mutate(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and depth < 6 and rng.random() < 0.7:
        out = list(value)
        i = rng.randrange(len(out))
        roll = rng.random()
        if roll < 0.15:
            del out[i]
        elif roll < 0.3:
            out.insert(i, rng.choice(out))
        else:
            out[i] = mutate(rng, out[i], depth + 1)
        return out
    return rng.choice(ODD_VALUES)


def case(rng: random.Random, valid: dict | None = None) -> tuple[str, str, bytes, dict]:
    """One request: (method, path, body bytes, headers), mostly mutations of ``valid``."""
    valid = VALID if valid is None else valid
    kind = rng.random()
    headers = {"content-type": "application/json", "x-api-key": "k"}
    if kind < 0.75:
        body = valid
        for _ in range(rng.randint(1, 3)):
            body = mutate(rng, body)
        raw = json.dumps(body).encode()
    elif kind < 0.85:
        raw = json.dumps(valid).encode()
        cut = rng.randrange(len(raw))
        raw = raw[:cut] + bytes([rng.randrange(256)]) + raw[cut + 1:]
    elif kind < 0.9:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    elif kind < 0.95:
        raw = b"[" * 5000 + b"]" * 5000  # deep nesting
    else:
        raw, headers = json.dumps(valid).encode(), {"content-type": rng.choice(["text/plain", "", "x/y"])}
    method = "POST" if rng.random() < 0.9 else rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    path = "/v1/messages" if rng.random() < 0.8 else rng.choice(PATHS)
    return method, path, raw, headers


def check_response(r: httpx.Response, what) -> None:  # noqa: ANN001 - any context to print
    """No 5xx; every error in the Anthropic envelope."""
    assert r.status_code < 500, (r.status_code, r.text[:300], what)
    if r.status_code >= 400 and r.request.method != "HEAD":
        err = r.json()
        assert err["type"] == "error", what
        assert isinstance(err["error"]["type"], str) and isinstance(err["error"]["message"], str), what
