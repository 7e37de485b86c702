"""Context editing (``chat/context_edits.py``) through the real renderer: each knob of
``clear_tool_uses_20250919`` and ``clear_thinking_20251015``, the edge cases, compaction blocks
sent back, and what is reported."""

from __future__ import annotations

from typing import Any

import pytest

from pensieve.chat import PromptRenderer
from pensieve.chat.context_edits import CLEARED_TOOL_RESULT, COMPACTION_PREFIX, ContextManagementError
from pensieve.protocol import MessageCreateParams
from tests.helpers.api_fakes import CharTokenizer

RENDERER = PromptRenderer(CharTokenizer(), None)
TOOLS = [{"name": "Read", "input_schema": {"type": "object"}}, {"name": "Bash", "input_schema": {"type": "object"}}]


def _conversation(n: int, names: tuple[str, ...] = ("Read",)) -> list[dict[str, Any]]:
    """A user question, then ``n`` tool calls each answered by a long result."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Inspect the project."}]
    for i in range(n):
        name = names[i % len(names)]
        messages.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"t{i}", "name": name, "input": {"arg": f"input-{i}"}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{i}", "content": f"RESULT-{i} " + "x" * 200}]})
    return messages


def _request(messages: list[dict[str, Any]], edits: list[dict[str, Any]] | None, **extra: Any) -> MessageCreateParams:
    body: dict[str, Any] = {"model": "m", "max_tokens": 8, "messages": messages, "tools": TOOLS, **extra}
    if edits is not None:
        body["context_management"] = {"edits": edits}
    return MessageCreateParams.model_validate(body)


def _clear(**knobs: Any) -> dict[str, Any]:
    return {"type": "clear_tool_uses_20250919", **knobs}


def _plain(messages: list[dict[str, Any]]):
    return RENDERER.render(_request(messages, None))


def test_trigger_not_reached_edits_nothing_and_reports_no_edit():
    messages = _conversation(5)
    plain = _plain(messages)
    prompt = RENDERER.render(_request(messages, [_clear(trigger={"type": "input_tokens", "value": plain.num_tokens + 1})]))
    assert prompt.token_ids == plain.token_ids
    assert prompt.context_management is not None and prompt.context_management.applied_edits == []
    assert prompt.original_input_tokens == plain.num_tokens
    assert plain.context_management is None and plain.original_input_tokens is None


def test_default_trigger_is_100k_input_tokens():
    prompt = RENDERER.render(_request(_conversation(6), [_clear()]))
    assert prompt.context_management.applied_edits == []


def test_oldest_results_are_cleared_keeping_the_most_recent():
    messages = _conversation(5)
    plain = _plain(messages)
    prompt = RENDERER.render(_request(messages, [_clear(trigger={"type": "input_tokens", "value": 100},
                                                        keep={"type": "tool_uses", "value": 2})]))
    [edit] = prompt.context_management.applied_edits
    assert edit.type == "clear_tool_uses_20250919" and edit.cleared_tool_uses == 3
    assert edit.cleared_input_tokens == plain.num_tokens - prompt.num_tokens > 3 * (200 - len(CLEARED_TOOL_RESULT))
    assert prompt.text.count(CLEARED_TOOL_RESULT) == 3
    assert all(f"RESULT-{i}" not in prompt.text for i in range(3))
    assert "RESULT-3" in prompt.text and "RESULT-4" in prompt.text
    assert "input-0" in prompt.text  # the calls themselves stay


def test_default_keep_is_three_tool_uses():
    prompt = RENDERER.render(_request(_conversation(5), [_clear(trigger={"type": "input_tokens", "value": 0})]))
    assert prompt.context_management.applied_edits[0].cleared_tool_uses == 2
    assert prompt.text.count(CLEARED_TOOL_RESULT) == 2


def test_fewer_tool_uses_than_keep_clears_nothing():
    messages = _conversation(2)
    prompt = RENDERER.render(_request(messages, [_clear(trigger={"type": "input_tokens", "value": 0},
                                                        keep={"type": "tool_uses", "value": 3})]))
    assert prompt.context_management.applied_edits == []
    assert prompt.token_ids == _plain(messages).token_ids


def test_tool_uses_trigger_counts_the_calls():
    messages = _conversation(3)
    keep = {"type": "tool_uses", "value": 1}
    below = RENDERER.render(_request(messages, [_clear(trigger={"type": "tool_uses", "value": 4}, keep=keep)]))
    assert below.context_management.applied_edits == []
    reached = RENDERER.render(_request(messages, [_clear(trigger={"type": "tool_uses", "value": 3}, keep=keep)]))
    assert reached.context_management.applied_edits[0].cleared_tool_uses == 2


def test_excluded_tools_keep_their_results():
    messages = _conversation(6, names=("Read", "Bash"))  # t0 Read, t1 Bash, t2 Read, ...
    prompt = RENDERER.render(_request(messages, [_clear(trigger={"type": "input_tokens", "value": 0},
                                                        keep={"type": "tool_uses", "value": 0},
                                                        exclude_tools=["Bash"])]))
    assert prompt.context_management.applied_edits[0].cleared_tool_uses == 3
    assert all(f"RESULT-{i} " in prompt.text for i in (1, 3, 5))
    assert all(f"RESULT-{i} " not in prompt.text for i in (0, 2, 4))


def test_clear_tool_inputs_true_or_a_list_of_tools():
    messages = _conversation(4, names=("Read", "Bash"))
    trigger, keep = {"type": "input_tokens", "value": 0}, {"type": "tool_uses", "value": 1}
    results_only = RENDERER.render(_request(messages, [_clear(trigger=trigger, keep=keep)]))
    assert all(f"input-{i}" in results_only.text for i in range(4))
    every = RENDERER.render(_request(messages, [_clear(trigger=trigger, keep=keep, clear_tool_inputs=True)]))
    assert all(f"input-{i}" not in every.text for i in range(3)) and "input-3" in every.text
    only_read = RENDERER.render(_request(messages, [_clear(trigger=trigger, keep=keep, clear_tool_inputs=["Read"])]))
    assert "input-0" not in only_read.text and "input-2" not in only_read.text and "input-1" in only_read.text
    assert every.num_tokens < only_read.num_tokens < results_only.num_tokens


def test_clear_at_least_applies_the_edit_only_when_it_frees_enough():
    messages = _conversation(3)
    base = dict(trigger={"type": "input_tokens", "value": 0}, keep={"type": "tool_uses", "value": 1})
    freed = RENDERER.render(_request(messages, [_clear(**base)])).context_management.applied_edits[0].cleared_input_tokens
    enough = RENDERER.render(_request(messages, [_clear(**base, clear_at_least={"type": "input_tokens", "value": freed})]))
    assert enough.context_management.applied_edits[0].cleared_input_tokens == freed
    short = RENDERER.render(_request(messages, [_clear(**base, clear_at_least={"type": "input_tokens", "value": freed + 1})]))
    assert short.context_management.applied_edits == []
    assert short.token_ids == _plain(messages).token_ids


def _thinking_turns() -> list[dict[str, Any]]:
    """Three assistant turns with thinking; the second is a tool loop of two messages."""
    think = lambda text: {"type": "thinking", "thinking": text, "signature": "s"}  # noqa: E731
    return [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": [think("T1"), {"type": "text", "text": "a1"}]},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": [think("T2a"), {"type": "tool_use", "id": "c", "name": "Read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c", "content": "r"}]},
        {"role": "assistant", "content": [think("T2b"), {"type": "redacted_thinking", "data": "zz"},
                                          {"type": "text", "text": "a2"}]},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": [think("T3"), {"type": "text", "text": "a3"}]},
        {"role": "user", "content": "four"},
    ]


def _thinking_left(request: MessageCreateParams, keep: Any) -> tuple[list[str], Any]:
    from pensieve.chat.context_edits import clear_thinking
    from pensieve.protocol.context_management import BetaClearThinking20251015EditParam

    edit = BetaClearThinking20251015EditParam.model_validate({"type": "clear_thinking_20251015", "keep": keep})
    edited, turns = clear_thinking(request, edit)
    left = [b.thinking if b.type == "thinking" else b.type for m in edited.messages
            if isinstance(m.content, list) for b in m.content if b.type in ("thinking", "redacted_thinking")]
    return left, turns


def test_clear_thinking_keeps_the_most_recent_turns_tool_loops_included():
    request = _request(_thinking_turns(), None, thinking={"type": "enabled", "budget_tokens": 64})
    assert _thinking_left(request, {"type": "thinking_turns", "value": 1}) == (["T3"], 2)
    assert _thinking_left(request, {"type": "thinking_turns", "value": 2}) == (["T2a", "T2b", "redacted_thinking", "T3"], 1)
    assert _thinking_left(request, {"type": "thinking_turns", "value": 5})[1] == 0
    assert _thinking_left(request, {"type": "thinking_turns", "value": 0}) == ([], 3)
    assert _thinking_left(request, "all")[1] == 0
    assert _thinking_left(request, {"type": "all"})[1] == 0


def test_clear_thinking_is_reported_with_the_tokens_it_freed():
    messages = _thinking_turns()
    prompt = RENDERER.render(_request(messages, [{"type": "clear_thinking_20251015"}],
                                      thinking={"type": "enabled", "budget_tokens": 64}))
    [edit] = prompt.context_management.applied_edits
    assert edit.type == "clear_thinking_20251015" and edit.cleared_thinking_turns == 2
    # this template never renders earlier turns' thinking: dropping it frees no prompt token
    plain = RENDERER.render(_request(messages, None, thinking={"type": "enabled", "budget_tokens": 64}))
    assert edit.cleared_input_tokens == plain.num_tokens - prompt.num_tokens == 0


def test_both_edits_apply_in_order_and_each_reports_its_own_savings():
    messages = _conversation(4)
    edits = [{"type": "clear_thinking_20251015", "keep": "all"},
             _clear(trigger={"type": "input_tokens", "value": 0}, keep={"type": "tool_uses", "value": 2})]
    prompt = RENDERER.render(_request(messages, edits))
    assert [e.type for e in prompt.context_management.applied_edits] == ["clear_tool_uses_20250919"]
    assert prompt.original_input_tokens - prompt.num_tokens == prompt.context_management.applied_edits[0].cleared_input_tokens


@pytest.mark.parametrize("edits, fragment", [
    ([_clear(keep={"type": "tool_uses", "value": -1})], "keep"),
    ([_clear(trigger={"type": "seconds", "value": 3})], "trigger"),
    ([{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": -1}}], "keep"),
])
def test_malformed_context_management_is_refused(edits, fragment):
    with pytest.raises(ContextManagementError, match=fragment):
        RENDERER.render(_request(_conversation(1), edits))


def test_an_unknown_edit_type_is_ignored():
    messages = _conversation(2)
    prompt = RENDERER.render(_request(messages, [{"type": "clear_everything_20990101"}]))
    assert prompt.token_ids == _plain(messages).token_ids and prompt.context_management.applied_edits == []


def test_a_compaction_block_sent_back_replaces_what_came_before_it():
    messages = [
        *_conversation(3),
        {"role": "assistant", "content": [{"type": "compaction", "content": "The user wants the project inspected."},
                                          {"type": "text", "text": "Continuing."}]},
        {"role": "user", "content": "And now?"},
    ]
    prompt = RENDERER.render(_request(messages, [{"type": "compact_20260112"}]))
    assert COMPACTION_PREFIX + "The user wants the project inspected." in prompt.text
    assert "RESULT-0" not in prompt.text and "Inspect the project." not in prompt.text
    assert "Continuing." in prompt.text and "And now?" in prompt.text
    failed = [*messages[:-2], {"role": "assistant", "content": [{"type": "compaction", "content": None},
                                                                 {"type": "text", "text": "Continuing."}]}, messages[-1]]
    kept = RENDERER.render(_request(failed, None))
    assert "RESULT-0" in kept.text and "Continuing." in kept.text  # a null summary is a no-op


def test_edits_apply_in_the_order_given():
    """The API wants clear_thinking first; given later it is applied later, not refused (a
    server stricter than the API breaks clients)."""
    messages = _conversation(3)
    edits = [_clear(trigger={"type": "input_tokens", "value": 0}, keep={"type": "tool_uses", "value": 1}),
             {"type": "clear_thinking_20251015"}]
    prompt = RENDERER.render(_request(messages, edits))
    assert [e.type for e in prompt.context_management.applied_edits] == ["clear_tool_uses_20250919"]
