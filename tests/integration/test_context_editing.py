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


COMPACT_BETAS = ["compact-2026-01-12"]
CHAT = [{"role": "user", "content": "My name is Ada and I am planning a trip to Paris in May."},
        {"role": "assistant", "content": "That sounds lovely! Paris in May is beautiful."},
        {"role": "user", "content": "What should I pack?"}]


def test_a_compaction_request_answers_with_the_summary_block_alone(client):
    msg = client.beta.messages.create(model="claude-sonnet-5", max_tokens=48, messages=CHAT, betas=COMPACT_BETAS,
                                      compaction={"type": "summarize"}, extra_body={"temperature": 0})
    assert msg.stop_reason == "compaction"
    [block] = msg.content
    assert block.type == "compaction" and block.content and block.content.strip()
    assert msg.usage.output_tokens > 0
    with client.beta.messages.stream(model="claude-sonnet-5", max_tokens=48, messages=CHAT, betas=COMPACT_BETAS,
                                     compaction={"type": "summarize"}, extra_body={"temperature": 0}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.stop_reason == "compaction" and final.content[0].content == block.content

    sent_back = [{"role": "assistant", "content": [{"type": "compaction", "content": block.content}]},
                 {"role": "user", "content": "And what about shoes?"}]
    long_count = client.beta.messages.count_tokens(model="claude-sonnet-5", messages=[*CHAT, *sent_back],
                                                   betas=COMPACT_BETAS)
    alone = client.beta.messages.count_tokens(model="claude-sonnet-5", messages=sent_back, betas=COMPACT_BETAS)
    assert long_count.input_tokens == alone.input_tokens  # what preceded the block was dropped
    answer = client.beta.messages.create(model="claude-sonnet-5", max_tokens=8, betas=COMPACT_BETAS,
                                         messages=[*CHAT, *sent_back])
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens")


def test_the_compact_edit_summarises_then_answers_in_the_same_response(client):
    edit = {"type": "compact_20260112", "trigger": {"type": "input_tokens", "value": 10}}
    kwargs = dict(model="claude-sonnet-5", max_tokens=24, messages=CHAT, betas=COMPACT_BETAS,
                  context_management={"edits": [edit]}, extra_body={"temperature": 0})
    msg = client.beta.messages.create(**kwargs)
    assert [b.type for b in msg.content][:2] == ["compaction", "text"] and msg.content[0].content
    assert msg.stop_reason in ("end_turn", "max_tokens")
    with client.beta.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content][:2] == ["compaction", "text"]
    assert final.content[0].content == msg.content[0].content and final.content[1].text == msg.content[1].text

    paused = client.beta.messages.create(**{**kwargs, "context_management": {
        "edits": [{**edit, "pause_after_compaction": True}]}})
    assert paused.stop_reason == "compaction" and [b.type for b in paused.content] == ["compaction"]

    untriggered = client.beta.messages.create(**{**kwargs, "context_management": {
        "edits": [{**edit, "trigger": {"type": "input_tokens", "value": 100_000}}]}})
    assert all(b.type != "compaction" for b in untriggered.content)
    assert untriggered.context_management.applied_edits == []


def test_compaction_and_context_management_together_are_a_400(client):
    with pytest.raises(anthropic.BadRequestError, match="cannot be combined"):
        client.beta.messages.create(model="claude-sonnet-5", max_tokens=8, messages=CHAT, betas=COMPACT_BETAS,
                                    compaction={"type": "summarize"}, context_management={"edits": []})
