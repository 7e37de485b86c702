"""ChatTemplate renders exactly as transformers does (its own renderer is the oracle)."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from pensieve.chat import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError

# Exercises trim/lstrip blocks, loopcontrols, tojson with non-ASCII and HTML, namespace,
# the generation tag, bos/eos, tools and extra variables.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% if tools %}
Tools: {{ tools | tojson }}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ message['role'] }}>
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] | trim }}{% endgeneration %}{{ eos_token }}
    {% else %}
{{ message['content'] }}
    {% endif %}
    {% if ns.n > 5 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}<no_think>{% endif %}
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "Be brief. <b>&'\""},
    {"role": "user", "content": "héllo 😀"},
    {"role": "skip", "content": "ignored"},
    {"role": "assistant", "content": "  hi  "},
    {"role": "user", "content": "bye"},
]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "ünïcode <x>", "parameters": {}}}]


@pytest.mark.parametrize("template", [RICH_TEMPLATE, CHATML_TEMPLATE])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(template: str, add_generation_prompt: bool) -> None:
    kwargs = dict(messages=MESSAGES, tools=TOOLS, add_generation_prompt=add_generation_prompt,
                  bos_token="<s>", eos_token="</s>", enable_thinking=False)
    expected = _compile_jinja_template(template).render(**kwargs)
    ours = ChatTemplate(template).render(
        MESSAGES, tools=TOOLS, add_generation_prompt=add_generation_prompt,
        bos_token="<s>", eos_token="</s>", enable_thinking=False,
    )
    assert ours == expected
    assert "ünïcode <x>" in ours or template is CHATML_TEMPLATE


def test_raise_exception_becomes_chat_template_error() -> None:
    template = ChatTemplate("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        template.render([{"role": "system", "content": "x"}])


def test_strftime_now_is_available() -> None:
    out = ChatTemplate("{{ strftime_now('%Y') }}").render([])
    assert out.isdigit() and len(out) == 4


def test_sandbox_refuses_escapes() -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([])


def test_syntax_error_is_reported_at_compile() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
