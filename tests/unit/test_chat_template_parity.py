"""Pensieve's chat template renderer against transformers' own, on the 70 real templates
llama.cpp ships (models/templates/ of the llama-cpp-python sdist).

One conversation with tools — system, user, assistant with a tool call, tool result, user —
renders through ``pensieve.chat.template.ChatTemplate`` and through transformers'
``render_jinja_template``; the strings must be equal. Some templates refuse that exact
conversation, so a few variants are tried in order (an assistant answer after the tool
result, for templates that insist on user/assistant alternation; arguments as a JSON
string, for templates that concatenate them; no system message) and the first that
transformers renders is the one compared. Templates that transformers cannot render with any
variant are listed in ``TRANSFORMERS_CANNOT`` with the reason, and Pensieve must refuse them
too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pensieve.chat.template import ChatTemplate, ChatTemplateError

chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

_SDIST_TEMPLATES = (Path(__file__).parents[2] / ".cache" / "fixtures" / "llama_cpp_python-0.3.36"
                    / "vendor" / "llama.cpp" / "models" / "templates")


def real_templates_dir() -> Path:
    """The sdist's ``models/templates``: through the assets helper when the tree has it, else
    where the sdist was unpacked by hand. Missing → the tests fail (never skip)."""
    try:
        from tests.helpers.assets import llama_cpp_models_dir
    except ImportError:
        path = _SDIST_TEMPLATES
    else:
        path = llama_cpp_models_dir() / "templates"
    assert path.is_dir(), f"no real chat templates at {path}"
    return path


def real_templates() -> list[Path]:
    return sorted(real_templates_dir().glob("*.jinja"))


TEMPLATES = real_templates()

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city, today and the next days.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "days": {"type": "integer", "description": "How many days"}}, "required": ["city"]}}}]
CALL = {"id": "call00001", "type": "function",  # 9 characters: Mistral templates check
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
CONVERSATION = [
    {"role": "system", "content": "You are terse. Use the tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "Sunny, 21°C <ok> & \"dry\""},
    {"role": "user", "content": "Thanks. And in Rome?"},
]
ANSWER = {"role": "assistant", "content": "Sunny and 21°C."}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

# What transformers (5.x, jinja2 3.1.6) itself raises on every variant of the conversation.
TRANSFORMERS_CANNOT = {
    "Kimi-K2-Instruct.jinja": "calls list.append, which the immutable sandbox forbids",
    "Kimi-K2-Thinking.jinja": "calls list.append, which the immutable sandbox forbids",
    "fireworks-ai-llama-3-firefunction-v2.jinja": "reads a `functions` variable no renderer passes",
    "google-gemma-2-2b-it.jinja": "refuses system and tool roles (no tool support)",
    "llama-cpp-deepseek-r1.jinja": "passes a generator to tojson (written for llama.cpp's minja)",
}


def variants() -> list[tuple[str, list[dict[str, Any]]]]:
    answered = CONVERSATION[:4] + [ANSWER] + CONVERSATION[4:]
    out = [("as given", CONVERSATION), ("answer after the result", answered)]
    for name, conv in list(out):
        stringly = copy.deepcopy(conv)
        stringly[2]["tool_calls"][0]["function"]["arguments"] = json.dumps(CALL["function"]["arguments"])
        out.append((name + ", arguments as a string", stringly))
    out += [(name + ", no system", conv[1:]) for name, conv in list(out)]
    return out


def transformers_render(source: str, conversation: list[dict[str, Any]]) -> str:
    rendered, _ = chat_template_utils.render_jinja_template(
        [copy.deepcopy(conversation)], tools=copy.deepcopy(TOOLS), chat_template=source,
        add_generation_prompt=True, **SPECIAL)
    return rendered[0]


def reference(source: str) -> tuple[str | None, list[dict[str, Any]] | None, list[str]]:
    """(transformers' text, the conversation it rendered) for the first variant it renders,
    and why the others failed."""
    errors = []
    for name, conversation in variants():
        try:
            return transformers_render(source, conversation), conversation, errors
        except Exception as exc:  # noqa: BLE001 - whatever the template raises
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return None, None, errors


def test_all_seventy_templates_are_there() -> None:
    assert len(TEMPLATES) == 70


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_renders_as_transformers_renders_it(path: Path) -> None:
    source = path.read_text()
    expected, conversation, errors = reference(source)
    if expected is None:
        assert path.name in TRANSFORMERS_CANNOT, f"transformers cannot render {path.name}: {errors}"
        with pytest.raises((ChatTemplateError, TypeError)):  # and neither can we
            ChatTemplate(source).render(CONVERSATION, tools=TOOLS, **SPECIAL)
        return
    assert path.name not in TRANSFORMERS_CANNOT, "transformers renders it now: take it off the list"
    ours = ChatTemplate(source).render(copy.deepcopy(conversation), tools=copy.deepcopy(TOOLS), **SPECIAL)
    assert ours == expected
    assert "Paris" in ours and "Rome" in ours


REASONING = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "The tool knows.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "Sunny"},
    {"role": "assistant", "content": "Sunny.", "reasoning_content": "Say it.", "name": None},
    {"role": "user", "content": "Rome?"},
]


@pytest.mark.parametrize("name", ["openai-gpt-oss-120b.jinja", "Qwen-Qwen3-0.6B.jinja", "Qwen3.5-4B.jinja",
                                  "deepseek-ai-DeepSeek-V3.2.jinja", "MiniMax-M2.jinja"])
def test_reasoning_and_none_values_reach_the_template_as_transformers_passes_them(name: str) -> None:
    source = (real_templates_dir() / name).read_text()
    expected = transformers_render(source, REASONING)
    assert ChatTemplate(source).render(REASONING, tools=TOOLS, **SPECIAL) == expected
