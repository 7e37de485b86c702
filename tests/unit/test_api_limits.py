"""Limits and strict types at the API: caps on what a request holds, a prompt that cannot fit
refused before any tokenizing, the API's strict types (400, never coerced), and no redirect
for a trailing slash."""

from __future__ import annotations

import time

import httpx
import pytest

from pensieve.api import ApiConfig, create_app
from pensieve.chat import PromptRenderer
from tests.helpers.api_fakes import CharTokenizer, ScriptedEngine, text_script
from tests.helpers.server import serve_app_in_thread

HI = [{"role": "user", "content": "Hi"}]
TOOL = {"name": "t", "input_schema": {"type": "object"}}


class CountingTokenizer(CharTokenizer):
    max_token_chars = 12  # "<|im_start|>": no id spells more characters

    def __init__(self) -> None:
        super().__init__()
        self.encoded_chars = 0

    def encode(self, text: str) -> list[int]:
        self.encoded_chars += len(text)
        return super().encode(text)


@pytest.fixture(scope="module")
def server():
    tok = CountingTokenizer()
    config = ApiConfig(model_id="tiny-model", context_length=4096, max_messages=50, max_tools=3,
                       max_tool_schema_bytes=2000, max_stop_sequences=4, max_stop_sequence_chars=20)
    app = create_app(config, ScriptedEngine(text_script("ok")), PromptRenderer(tok, None))
    with serve_app_in_thread(app) as url:
        yield url, tok


def post(url: str, body: dict, path: str = "/v1/messages") -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30, follow_redirects=False)


def body(**kw) -> dict:
    return {"model": "tiny-model", "max_tokens": 5, "messages": HI, **kw}


def assert_invalid(r: httpx.Response, needle: str, status: int = 400) -> None:
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"], err


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server):
    url, tok = server
    before = tok.encoded_chars
    started = time.perf_counter()
    r = post(url, body(messages=[{"role": "user", "content": "word " * 400_000}]))  # 2 MB
    assert_invalid(r, "prompt is too long:")
    assert "> 4096 maximum" in r.json()["error"]["message"]
    assert tok.encoded_chars == before  # nothing was tokenized
    assert time.perf_counter() - started < 5
    r = post(url, body(messages=[{"role": "user", "content": "word " * 400_000}]), "/v1/messages/count_tokens")
    assert_invalid(r, "prompt is too long:")


def test_a_prompt_just_over_the_context_still_gets_its_exact_count(server):
    url, _ = server
    r = post(url, body(messages=[{"role": "user", "content": "x" * 5000}]))
    assert_invalid(r, "prompt is too long: 50")  # the rendered count, not a bound


@pytest.mark.parametrize("field,value,needle", [
    ("messages", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 26, "messages: 52 items"),
    ("tools", [dict(TOOL, name=f"t{i}") for i in range(4)], "tools: 4 items"),
    ("tools", [dict(TOOL, input_schema={"type": "object", "description": "x" * 3000})], "tools.0.input_schema"),
    ("stop_sequences", ["a", "b", "c", "d", "e"], "stop_sequences: 5 items"),
    ("stop_sequences", ["x" * 21], "stop_sequences.0"),
])
def test_caps(server, field, value, needle):
    assert_invalid(post(server[0], body(**{field: value})), needle)


@pytest.mark.parametrize("override,needle", [
    ({"stream": "yes"}, "stream"),
    ({"max_tokens": "1"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": 2**70}, "max_tokens"),  # the 10k fuzz: ran to the end of the context
    ({"temperature": "0.5"}, "temperature"),
    ({"top_k": "3"}, "top_k"),
    ({"thinking": {"type": "enabled", "budget_tokens": "1024"}}, "budget_tokens"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": "x", "is_error": "yes"}]}]}, "is_error"),
])
def test_strict_types_are_refused_not_coerced(server, override, needle):
    assert_invalid(post(server[0], body(**override)), needle)


def test_well_typed_values_still_pass(server):
    r = post(server[0], body(stream=False, temperature=1, top_k=3, max_tokens=64000, messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": "x", "is_error": True}]}]))
    assert r.status_code == 200, r.text


def test_trailing_slash_is_a_404_not_a_redirect(server):
    r = post(server[0], body(), "/v1/messages/")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
