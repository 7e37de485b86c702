"""Context editing on the real server with the real SmolLM2 model, through the official SDK's
beta surface (``client.beta.messages.create(..., betas=[...], context_management=...)``)."""

from __future__ import annotations

import anthropic
import pytest

from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow
BETAS = ["context-management-2025-06-27"]
TOOLS = [{"name": "read_file", "description": "Read a file", "input_schema": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]


@pytest.fixture(scope="module")
def client():
    with pensieve_server() as url:
        yield anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)


def _agent_history(n: int) -> list[dict]:
    messages: list[dict] = [{"role": "user", "content": "Read the files and tell me which one mentions Paris."}]
    for i in range(n):
        messages.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"toolu_{i}", "name": "read_file", "input": {"path": f"notes/{i}.txt"}}]})
        text = ("The capital of France is Paris. " if i == n - 1 else "") + f"file {i}: " + "lorem ipsum " * 60
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": text}]})
    return messages


def _clear(trigger: int, keep: int = 1) -> dict:
    return {"edits": [{"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": trigger},
                       "keep": {"type": "tool_uses", "value": keep}}]}


def test_cleared_tool_results_shrink_the_prompt_and_are_reported(client):
    messages = _agent_history(4)
    plain = client.beta.messages.count_tokens(model="claude-sonnet-5", messages=messages, tools=TOOLS, betas=BETAS)
    msg = client.beta.messages.create(model="claude-sonnet-5", max_tokens=8, messages=messages, tools=TOOLS,
                                      betas=BETAS, context_management=_clear(1000), extra_body={"temperature": 0})
    [edit] = msg.context_management.applied_edits
    assert edit.type == "clear_tool_uses_20250919" and edit.cleared_tool_uses == 3
    assert 0 < edit.cleared_input_tokens < plain.input_tokens
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens + msg.usage.cache_creation_input_tokens \
        == plain.input_tokens - edit.cleared_input_tokens
    counted = client.beta.messages.count_tokens(model="claude-sonnet-5", messages=messages, tools=TOOLS,
                                                betas=BETAS, context_management=_clear(1000))
    assert counted.input_tokens == plain.input_tokens - edit.cleared_input_tokens
    assert counted.context_management.original_input_tokens == plain.input_tokens


def test_trigger_not_reached_leaves_the_prompt_whole(client):
    messages = _agent_history(4)
    plain = client.beta.messages.count_tokens(model="claude-sonnet-5", messages=messages, tools=TOOLS, betas=BETAS)
    msg = client.beta.messages.create(model="claude-sonnet-5", max_tokens=4, messages=messages, tools=TOOLS,
                                      betas=BETAS, context_management=_clear(plain.input_tokens + 1))
    assert msg.context_management is not None and msg.context_management.applied_edits == []
    usage = msg.usage
    assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == plain.input_tokens


def test_streamed_answer_reports_the_edits_in_message_delta(client):
    messages = _agent_history(3)
    kwargs = dict(model="claude-sonnet-5", max_tokens=8, messages=messages, tools=TOOLS, betas=BETAS,
                  context_management=_clear(0), extra_body={"temperature": 0})
    with client.beta.messages.stream(**kwargs) as stream:
        deltas = [event for event in stream if event.type == "message_delta"]
        final = stream.get_final_message()
    assert len(deltas) == 1 and deltas[0].context_management.applied_edits[0].cleared_tool_uses == 2
    assert final.context_management.applied_edits[0].cleared_tool_uses == 2
    plain = client.beta.messages.create(**kwargs)
    assert plain.context_management == final.context_management


def test_requests_without_context_management_report_none(client):
    msg = client.beta.messages.create(model="claude-sonnet-5", max_tokens=2, betas=BETAS,
                                      messages=[{"role": "user", "content": "Hi"}])
    assert msg.context_management is None
    raw = client.messages.with_raw_response.create(model="claude-sonnet-5", max_tokens=2,
                                                    messages=[{"role": "user", "content": "Hi"}])
    assert "context_management" not in raw.http_response.json()


def test_malformed_edits_are_a_400(client):
    with pytest.raises(anthropic.BadRequestError, match="keep"):
        client.beta.messages.create(model="claude-sonnet-5", max_tokens=2, betas=BETAS,
                                    messages=[{"role": "user", "content": "Hi"}],
                                    context_management={"edits": [{"type": "clear_tool_uses_20250919",
                                                                   "keep": {"type": "tool_uses", "value": -2}}]})
