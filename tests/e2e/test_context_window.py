"""Claude Code's full default request (tests/fixtures/claude_code_request.json: a real
Claude Code 2.1.197 body, 24 default tools) against the real server: the exact overflow
error at the default 8k context, a valid answer at 32k (YaRN RoPE scaling)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "claude_code_request.json"
PREFILL_TIMEOUT_S = 900  # ~20k tokens of CPU prefill


@pytest.fixture(scope="module")
def request_body() -> dict:
    body = json.loads(FIXTURE.read_text())
    assert len(body["tools"]) == 24 and body["stream"] is True
    return body


def count_tokens(url: str, body: dict) -> int:
    fields = {k: body[k] for k in ("model", "system", "messages", "tools")}
    resp = httpx.post(f"{url}/v1/messages/count_tokens?beta=true", json=fields)
    assert resp.status_code == 200, resp.text
    return int(resp.json()["input_tokens"])


def test_default_context_answers_the_exact_overflow_error(request_body, default_server_url):
    url = default_server_url
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_input_tokens"] == 8192
    tokens = count_tokens(url, request_body)
    assert tokens > 8192  # 24 tools and the system prompt: ~19.7k SmolLM2 tokens
    resp = httpx.post(f"{url}/v1/messages?beta=true", json=request_body,
                      headers={"anthropic-version": "2023-06-01"}, timeout=60)
    assert resp.status_code == 400
    error = resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    # the wording Claude Code parses to decide to compact
    assert error["error"]["message"] == f"prompt is too long: {tokens} tokens > 8192 maximum"
    assert re.fullmatch(r"prompt is too long: \d+ tokens > \d+ maximum", error["error"]["message"])


def test_extended_context_answers_the_full_default_request(request_body):
    """--context-length 32768 (4× SmolLM2's trained 8k, YaRN applied) fits the request; the
    answer streams as Claude Code asked and passes the SDK's strict accumulator."""
    with pensieve_server("--context-length", "32768") as url:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_input_tokens"] == 32768
        tokens = count_tokens(url, request_body)
        client = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0,
                                     timeout=PREFILL_TIMEOUT_S)
        params = {k: v for k, v in request_body.items() if k not in ("stream", "max_tokens")}
        known = {"model", "messages", "system", "tools", "metadata", "thinking"}
        with client.messages.stream(
            max_tokens=8, **{k: params[k] for k in known if k in params},
            extra_body={k: v for k, v in params.items() if k not in known},
        ) as stream:
            message = stream.get_final_message()
    assert message.role == "assistant" and message.content
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use")
    usage = message.usage
    prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0) + (
        usage.cache_creation_input_tokens or 0)
    assert prompt == tokens > 8192
    assert 0 < usage.output_tokens <= 8
