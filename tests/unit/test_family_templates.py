"""The new families' real chat templates (llama.cpp's copies: gpt-oss, GLM-4.6, GLM-4.7-Flash,
Qwen3.5, Gemma 4, DeepSeek-V3.1) render an Anthropic conversation — system, tools, signed
thinking, a tool call and its result — as transformers renders the same conversation, and each
template's tool-call format is picked from it.

Two checks per template: the messages Pensieve hands the template render to the same text
through transformers' ``render_jinja_template`` (template engine parity on what we really
pass); and for the templates that render tools natively, those messages are the ones a
transformers user would write (the text equals transformers' rendering of hand-written
messages: reasoning in the field the template reads, calls as ``tool_calls``, results as
``tool`` messages, the template's own thinking/effort switches).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pensieve.chat import PromptRenderer
from pensieve.chat.thinking import ThinkingSigner
from pensieve.protocol import MessageCreateParams
from tests.helpers.api_fakes import CharTokenizer
from tests.unit.test_chat_template_parity import real_templates_dir

chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

KEY = b"family-templates"
THOUGHT = "The forecast tool knows."
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                            "days": {"type": "integer", "description": "How many days"}},
           "required": ["city"]}
HF_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                              "parameters": WEATHER}}]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
NO_FORMAT = None  # the template's calls are not in Pensieve's table: the built-in tool prompt

# template → (the format picked, the field its reasoning goes in, the switches it is rendered with)
FAMILIES: dict[str, tuple[str | None, str | None, dict[str, Any]]] = {
    "openai-gpt-oss-120b": ("harmony", "thinking", {"reasoning_effort": "medium"}),
    "GLM-4.6": ("glm", "reasoning_content", {"enable_thinking": True}),
    "GLM-4.7-Flash": ("glm", "reasoning_content", {"enable_thinking": True}),
    "Qwen3.5-4B": ("qwen3_coder", "reasoning_content", {"enable_thinking": True}),
    "google-gemma-4-31B-it": ("gemma4", "reasoning_content", {"enable_thinking": True}),
    "deepseek-ai-DeepSeek-V3.1": (NO_FORMAT, None, {}),
}


def request() -> MessageCreateParams:
    signature = ThinkingSigner(KEY).sign(THOUGHT)
    return MessageCreateParams.model_validate({
        "model": "m", "max_tokens": 64, "system": "You are terse. Use the tools.",
        "thinking": {"type": "enabled", "budget_tokens": 8000},
        "tools": [{"name": "get_weather", "description": "Weather for a city.", "input_schema": WEATHER}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": THOUGHT, "signature": signature},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris", "days": 2}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "Sunny, 21°C <ok> & \"dry\""}]},
        ]})


def hand_written(field: str) -> list[dict[str, Any]]:
    call = {"id": "toolu_01", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
    return [
        {"role": "system", "content": "You are terse. Use the tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", field: THOUGHT, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "toolu_01", "name": "get_weather", "content": "Sunny, 21°C <ok> & \"dry\""},
    ]


def transformers_render(source: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                        **kwargs: Any) -> str:
    rendered, _ = chat_template_utils.render_jinja_template(
        [copy.deepcopy(messages)], tools=copy.deepcopy(tools), chat_template=source, add_generation_prompt=True,
        **SPECIAL, **kwargs)
    return rendered[0]


def rendered(name: str) -> tuple[str, PromptRenderer, str, list[tuple[list, Any, dict]]]:
    """(the template, its renderer, our prompt text, every render call the prompt made)."""
    source = (real_templates_dir() / f"{name}.jinja").read_text()
    renderer = PromptRenderer(CharTokenizer(), source, thinking_key=KEY)
    calls: list[tuple[list, Any, dict]] = []
    inner = renderer.template.render

    def spy(messages, **kwargs):
        calls.append((copy.deepcopy(list(messages)), copy.deepcopy(kwargs.get("tools")), dict(kwargs)))
        return inner(messages, **kwargs)

    renderer.template.render = spy  # type: ignore[method-assign]
    return source, renderer, renderer.render(request()).text, calls


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_format_is_picked_from_the_template(name: str) -> None:
    source = (real_templates_dir() / f"{name}.jinja").read_text()
    caps = PromptRenderer(CharTokenizer(), source, thinking_key=KEY).caps
    want = FAMILIES[name][0]
    assert (caps.tool_format if caps.native_tools else NO_FORMAT) == want


@pytest.mark.parametrize("name", list(FAMILIES))
def test_what_we_pass_renders_as_transformers_renders_it(name: str) -> None:
    source, _, text, calls = rendered(name)
    messages, tools, kwargs = calls[-1]
    assert kwargs["add_generation_prompt"] is True
    skip = ("tools", "bos_token", "eos_token", "documents", "add_generation_prompt")
    extra = {k: v for k, v in kwargs.items() if k not in skip}
    assert text == transformers_render(source, messages, tools, **extra)
    assert "Paris" in text and "Sunny, 21°C" in text and "get_weather" in text


@pytest.mark.parametrize("name", [n for n, (fmt, _, _) in FAMILIES.items() if fmt is not None])
def test_native_templates_get_the_messages_a_transformers_user_writes(name: str) -> None:
    fmt, field, switches = FAMILIES[name]
    assert field is not None
    source, _, text, _ = rendered(name)
    assert text == transformers_render(source, hand_written(field), HF_TOOLS, **switches)
    assert THOUGHT in text  # the signed thinking went back where the template reads it


@pytest.mark.parametrize("name", ["google-gemma-4-31B-it", "google-gemma-4-31B-it-interleaved"])
def test_gemma4_thinks_in_its_thought_channel(name: str) -> None:
    from pensieve.chat.segmenter import Segmenter
    from pensieve.chat.segments import TextSegment, ThinkingSegment

    source = (real_templates_dir() / f"{name}.jinja").read_text()
    markers = PromptRenderer(CharTokenizer(), source, thinking_key=KEY).caps.thinking_markers
    assert markers is not None and (markers.open, markers.close) == ("<|channel>thought\n", "<channel|>")
    segmenter = Segmenter(thinking=markers)
    text = "<|channel>thought\nThe user greets.<channel|>Hello!"
    out = [s for c in text for s in segmenter.feed(c)] + segmenter.finish()
    assert "".join(s.text for s in out if isinstance(s, ThinkingSegment)) == "The user greets."
    assert "".join(s.text for s in out if isinstance(s, TextSegment)) == "Hello!"
