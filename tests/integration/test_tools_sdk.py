"""Tool calls and thinking through the real server, driven by the official anthropic SDK.

A scripted engine writes the model's text (Hermes tool calls, thinking); everything else is
real: the uvicorn server, prompt rendering, the segmenter and parser, SSE, the SDK's own
stream accumulator. One test runs the real SmolLM2 model with tools offered.
"""

from __future__ import annotations

import re
import time
from typing import Any

import anthropic
import pytest

from pensieve.engine.types import FinishReason
from tests.helpers.api_fakes import CharTokenizer, ScriptedEngine, fake_server, text_script
from tests.helpers.real_server import pensieve_server

MODEL = "claude-sonnet-5"
TOOL_ID = re.compile(r"toolu_[A-Za-z0-9]{24}")
BASH = {"name": "Bash", "description": "Run a shell command",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}
READ = {"name": "Read", "description": "Read a file",
        "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}}}
ASK = [{"role": "user", "content": "What is in this folder?"}]
CALL = '<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'
LS = CALL.format(name="Bash", args='{"command": "ls -la"}')
READ_CALL = CALL.format(name="Read", args='{"file_path": "/etc/hostname"}')
# Thinking-capable template (the Qwen 3 shape, written for these tests).
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def chunks(text: str, size: int = 4) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=30)


def both(url: str, **kw: Any) -> tuple[anthropic.types.Message, anthropic.types.Message, list[str]]:
    """The same request, non-streamed and streamed: (message, streamed message, delta types)."""
    sdk = client(url)
    plain = sdk.messages.create(model=MODEL, max_tokens=200, **kw)
    with sdk.messages.stream(model=MODEL, max_tokens=200, **kw) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    return plain, streamed, kinds


def same_content(a: anthropic.types.Message, b: anthropic.types.Message) -> None:
    def strip(m: anthropic.types.Message) -> list[dict]:
        return [{k: v for k, v in block.model_dump().items() if k != "id"} for block in m.content]
    assert strip(a) == strip(b) and a.stop_reason == b.stop_reason


def prompt_text(engine: ScriptedEngine, call: int = -1) -> str:
    return CharTokenizer().decode(engine.calls[call].prompt_ids)


def test_tool_call_is_a_tool_use_block_streamed_and_not() -> None:
    engine = ScriptedEngine(text_script(*chunks("Let me look.\n" + LS)))
    with fake_server(engine) as url:
        plain, streamed, kinds = both(url, messages=ASK, tools=[BASH, READ])
    same_content(plain, streamed)
    for message in (plain, streamed):
        assert [b.type for b in message.content] == ["text", "tool_use"]
        assert message.content[0].text == "Let me look."
        call = message.content[1]
        assert TOOL_ID.fullmatch(call.id) and call.name == "Bash" and call.input == {"command": "ls -la"}
        assert message.stop_reason == "tool_use"
    assert kinds.count("input_json_delta") > 3  # the arguments streamed as they came
    assert "# Tools" in prompt_text(engine) and '{"name":"Read"' in prompt_text(engine)


async def test_async_client_parallel_calls() -> None:
    engine = ScriptedEngine(text_script(*chunks(LS + "\n" + READ_CALL, 7)))
    with fake_server(engine) as url:
        sdk = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        plain = await sdk.messages.create(model=MODEL, max_tokens=200, messages=ASK, tools=[BASH, READ])
        async with sdk.messages.stream(model=MODEL, max_tokens=200, messages=ASK, tools=[BASH, READ]) as stream:
            streamed = await stream.get_final_message()
    same_content(plain, streamed)
    assert [(b.name, b.input) for b in plain.content] == [("Bash", {"command": "ls -la"}),
                                                         ("Read", {"file_path": "/etc/hostname"})]
    assert len({b.id for b in plain.content}) == 2 and plain.stop_reason == "tool_use"


def test_tool_result_round_trip_renders_the_call_and_the_result() -> None:
    engine = ScriptedEngine(text_script(*chunks(LS)))
    with fake_server(engine) as url:
        sdk = client(url)
        first = sdk.messages.create(model=MODEL, max_tokens=200, messages=ASK, tools=[BASH])
        call = first.content[0]
        history = [*ASK, {"role": "assistant", "content": first.content},
                   {"role": "user", "content": [
                       {"type": "tool_result", "tool_use_id": call.id, "content": "a.txt\nb.txt"},
                       {"type": "tool_result", "tool_use_id": "toolu_x", "is_error": True, "content": "denied"}]}]
        sdk.messages.create(model=MODEL, max_tokens=200, messages=history, tools=[BASH])
        counted = sdk.messages.count_tokens(model=MODEL, messages=history, tools=[BASH]).input_tokens
    second = prompt_text(engine)
    assert '<tool_call>\n{"name": "Bash", "arguments": {"command": "ls -la"}}\n</tool_call>' in second
    assert "<tool_response>\na.txt\nb.txt\n</tool_response>" in second
    assert "<tool_response>\nError: denied\n</tool_response>" in second
    assert counted == len(engine.calls[-1].prompt_ids)
    # The first prompt is a prefix of the second: the prefix cache keeps hitting.
    assert engine.calls[1].prompt_ids[: len(engine.calls[0].prompt_ids)] == engine.calls[0].prompt_ids


@pytest.mark.parametrize("choice", [{"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "Read"}])
def test_tool_choice_modes_parse_calls(choice: dict) -> None:
    engine = ScriptedEngine(text_script(*chunks(READ_CALL)))
    with fake_server(engine) as url:
        plain, streamed, _ = both(url, messages=ASK, tools=[BASH, READ], tool_choice=choice)
    same_content(plain, streamed)
    assert plain.content[0].type == "tool_use" and plain.stop_reason == "tool_use"
    prompt = prompt_text(engine)
    if choice["type"] == "any":
        assert "You must call at least one tool" in prompt
    if choice["type"] == "tool":
        assert 'You must call the tool "Read"' in prompt


def test_tool_choice_none_offers_no_tools_and_parses_nothing() -> None:
    engine = ScriptedEngine(text_script(*chunks(LS)))
    with fake_server(engine) as url:
        plain, streamed, _ = both(url, messages=ASK, tools=[BASH], tool_choice={"type": "none"})
    same_content(plain, streamed)
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text == LS
    assert plain.stop_reason == "end_turn" and "# Tools" not in prompt_text(engine)


def test_disable_parallel_tool_use_ends_the_turn_at_the_first_call() -> None:
    engine = ScriptedEngine(text_script(*chunks(LS + "\n" + READ_CALL + "\nand on and on" * 20), delay_s=0.001))
    choice = {"type": "auto", "disable_parallel_tool_use": True}
    with fake_server(engine) as url:
        plain, streamed, _ = both(url, messages=ASK, tools=[BASH, READ], tool_choice=choice)
        deadline = time.monotonic() + 5
        while not all(c.aborted.is_set() for c in engine.calls) and time.monotonic() < deadline:
            time.sleep(0.01)
    same_content(plain, streamed)
    assert [b.name for b in plain.content] == ["Bash"] and plain.stop_reason == "tool_use"
    assert all(c.aborted.is_set() for c in engine.calls)  # the generation was stopped
    assert "Call at most one tool in this reply." in prompt_text(engine)


def test_malformed_call_comes_back_as_text() -> None:
    bad = '<tool_call>\n{"name": Bash, "arguments": {"command": "ls"}}\n</tool_call>'
    engine = ScriptedEngine(text_script(*chunks(bad)))
    with fake_server(engine) as url:
        plain, streamed, _ = both(url, messages=ASK, tools=[BASH])
    same_content(plain, streamed)
    assert [(b.type, b.text) for b in plain.content] == [("text", bad)] and plain.stop_reason == "end_turn"


def test_call_broken_after_it_started_is_closed_and_kept_as_text() -> None:
    bad = '<tool_call>\n{"name": "Bash", "arguments": {"command": "ls", "n": x}}\n</tool_call>'
    engine = ScriptedEngine(text_script(*chunks(bad)))
    with fake_server(engine) as url:
        plain, streamed, _ = both(url, messages=ASK, tools=[BASH])
    same_content(plain, streamed)
    assert [b.type for b in plain.content] == ["tool_use", "text"]
    assert plain.content[0].input == {"command": "ls"}  # what was complete when it broke
    assert plain.content[1].text == bad and plain.stop_reason == "end_turn"  # nothing lost; no complete call


@pytest.mark.parametrize("thinking", [{"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"}])
def test_thinking_streams_signed_and_comes_back_in_history(thinking: dict) -> None:
    engine = ScriptedEngine(text_script(*chunks("<think>\nThe user wants files.\n</think>\n\n" + LS)))
    with fake_server(engine, template=THINK_TEMPLATE) as url:
        plain, streamed, kinds = both(url, messages=ASK, tools=[BASH], thinking=thinking)
        same_content(plain, streamed)
        assert [b.type for b in plain.content] == ["thinking", "tool_use"]
        assert plain.content[0].thinking == "The user wants files." and plain.content[0].signature
        assert "thinking_delta" in kinds and "signature_delta" in kinds
        assert not prompt_text(engine).endswith("</think>\n\n")  # enable_thinking=True
        call = plain.content[1]

        def follow_up(signature: str) -> str:
            content = [{"type": "thinking", "thinking": "The user wants files.", "signature": signature},
                       {"type": "tool_use", "id": call.id, "name": "Bash", "input": call.input}]
            history = [*ASK, {"role": "assistant", "content": content},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "x"}]}]
            client(url).messages.create(model=MODEL, max_tokens=50, messages=history, tools=[BASH], thinking=thinking)
            return prompt_text(engine)

        assert "<think>\nThe user wants files.\n</think>" in follow_up(plain.content[0].signature)
        assert "The user wants files." not in follow_up("EqQBCkgIARAB-from-another-server")


def test_models_without_reasoning_accept_thinking_requests() -> None:
    engine = ScriptedEngine(text_script("Just ", "an answer."))
    with fake_server(engine) as url:  # ChatML: no reasoning markers
        plain, streamed, _ = both(url, messages=ASK, thinking={"type": "enabled", "budget_tokens": 2048})
    same_content(plain, streamed)
    assert [b.type for b in plain.content] == ["text"] and plain.stop_reason == "end_turn"


def test_thinking_disabled_tells_the_template() -> None:
    engine = ScriptedEngine(text_script("Sure."))
    with fake_server(engine, template=THINK_TEMPLATE) as url:
        message = client(url).messages.create(model=MODEL, max_tokens=20, messages=ASK,
                                              thinking={"type": "disabled"})
    assert message.content[0].text == "Sure." and prompt_text(engine).endswith("<think>\n\n</think>\n\n")


def test_call_cut_short_by_max_tokens() -> None:
    engine = ScriptedEngine(text_script(*chunks('<tool_call>\n{"name": "Bash", "arguments": {"command": "ls'),
                                        finish=FinishReason.MAX_TOKENS))
    with fake_server(engine) as url:
        plain, streamed, _ = both(url, messages=ASK, tools=[BASH])
    same_content(plain, streamed)
    assert plain.content[0].input == {"command": "ls"} and plain.stop_reason == "max_tokens"


@pytest.mark.slow
def test_real_model_with_tools_offered_answers_a_valid_message() -> None:
    with pensieve_server() as url:
        sdk = client(url)
        kwargs = dict(model=MODEL, max_tokens=60, tools=[BASH, READ], extra_body={"temperature": 0},
                      messages=[{"role": "user", "content": "List the files in the current directory."}])
        plain = sdk.messages.create(**kwargs)
        with sdk.messages.stream(**kwargs) as stream:
            streamed = stream.get_final_message()
    for message in (plain, streamed):
        assert message.stop_reason in ("end_turn", "max_tokens", "tool_use")
        assert message.content
        for block in message.content:
            assert block.type in ("text", "tool_use")
            if block.type == "tool_use":
                assert TOOL_ID.fullmatch(block.id) and isinstance(block.input, dict)
                assert block.name in ("Bash", "Read") or block.name
    same_content(plain, streamed)  # greedy: the same answer either way
