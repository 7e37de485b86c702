"""The 2026 Messages API surface on the real SmolLM2 through the anthropic SDK: every new field
and block accepted with count_tokens equal to what generation reports, the SDK's stream
accumulator taking every stream, ``model_context_window_exceeded`` when the output fills the
context, cache writes split by ttl, and thinking requests on a model without reasoning."""

from __future__ import annotations

import anthropic
import pytest

from tests.helpers.real_server import pensieve_server
from tests.unit.test_api_2026_surface import BETAS, everything

pytestmark = pytest.mark.slow
MODEL = "claude-sonnet-5"
GREEDY = {"temperature": 0}
CONTEXT = 640


@pytest.fixture(scope="module")
def client():
    # the integer kernels at every chunk size: on AMX the default bf16 prefill (≥ 64 rows) gives
    # the second request's few uncached tokens other logits than the first's whole-prompt chunk,
    # and this module compares greedy answers across such requests
    with pensieve_server("--context-length", str(CONTEXT), env={"PENSIEVE_BF16_PREFILL": "0"}) as url:
        yield anthropic.Anthropic(base_url=url, api_key="local", max_retries=0, timeout=600)


def prompt_tokens(usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def split_body(body: dict) -> tuple[dict, dict]:
    known = {k: body[k] for k in ("model", "max_tokens", "messages")}
    return known, {k: v for k, v in body.items() if k not in known}


def test_every_new_field_and_block_on_the_real_model(client):
    known, extra = split_body(everything())
    headers = {"anthropic-beta": ",".join(BETAS)}
    count_extra = {k: v for k, v in extra.items() if k not in ("thinking", "metadata", "service_tier", "speed")}
    counted = client.messages.count_tokens(model=MODEL, messages=known["messages"], extra_body=count_extra,
                                           extra_headers=headers).input_tokens
    message = client.messages.create(**known, extra_body={**extra, **GREEDY}, extra_headers=headers)
    with client.messages.stream(**known, extra_body={**extra, **GREEDY}, extra_headers=headers) as stream:
        streamed = stream.get_final_message()
    for m in (message, streamed):
        assert m.content and m.stop_reason in ("end_turn", "max_tokens")
        assert prompt_tokens(m.usage) == counted
        assert m.stop_details is None and m.usage.server_tool_use is None
        # adaptive thinking (display omitted) on a model without reasoning: no thinking block
        assert all(b.type != "thinking" for b in m.content) and m.usage.output_tokens_details is None
    assert [b.model_dump() for b in message.content] == [b.model_dump() for b in streamed.content]  # greedy


def test_output_that_fills_the_context_is_model_context_window_exceeded(client):
    filler = "Count upwards from one, one number per line, and never stop. " * 34
    messages = [{"role": "user", "content": filler + "Start now: 1, 2, 3,"}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages).input_tokens
    assert counted < CONTEXT - 100
    message = client.messages.create(model=MODEL, max_tokens=64000, messages=messages, extra_body=GREEDY)
    with client.messages.stream(model=MODEL, max_tokens=64000, messages=messages, extra_body=GREEDY) as stream:
        streamed = stream.get_final_message()
    for m in (message, streamed):
        if m.stop_reason == "end_turn":  # the model may end its turn on its own; then the window was not reached
            assert prompt_tokens(m.usage) + m.usage.output_tokens < CONTEXT
        else:
            assert m.stop_reason == "model_context_window_exceeded", m.stop_reason
            assert prompt_tokens(m.usage) + m.usage.output_tokens >= CONTEXT - 1
    assert "model_context_window_exceeded" in (message.stop_reason, streamed.stop_reason)
    short = client.messages.create(model=MODEL, max_tokens=3, messages=messages, extra_body=GREEDY)
    assert short.stop_reason == "max_tokens"


def test_cache_writes_are_reported_under_the_ttl_asked(client):
    system = [{"type": "text", "text": "You are a terse assistant. " * 40,
               "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    ask = {"model": MODEL, "max_tokens": 8, "system": system, "extra_body": GREEDY}
    first = client.messages.create(messages=[{"role": "user", "content": "Say hi."}], **ask)
    second = client.messages.create(messages=[{"role": "user", "content": "Say bye."}], **ask)
    for m in (first, second):
        split = m.usage.cache_creation
        assert split is not None and split.ephemeral_5m_input_tokens == 0
        assert split.ephemeral_1h_input_tokens == m.usage.cache_creation_input_tokens
    assert first.usage.cache_creation_input_tokens > 0
    assert second.usage.cache_read_input_tokens > 0  # the shared system prompt came from the cache
