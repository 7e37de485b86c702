"""Thinking: request → plan (markers, budget), template flags, signatures, history."""

from __future__ import annotations

import pytest

from pensieve.chat import PromptRenderer
from pensieve.chat.thinking import (
    EFFORT_BUDGETS,
    SIGNATURE_PREFIX,
    THINKING_KEY_ENV,
    ThinkingSigner,
    thinking_key_from_env,
)
from pensieve.protocol import MessageCreateParams
from tests.helpers.api_fakes import CharTokenizer

# Qwen 3-shaped: reads enable_thinking, renders reasoning_content, closes thinking at once
# when it is off. Written for these tests.
QWEN3_LIKE = """\
{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.role == 'assistant' and message.reasoning_content %}<think>
{{ message.reasoning_content }}
</think>

{% endif %}{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""
# DeepSeek R1-shaped: the generation prompt opens the thinking section itself.
OPENS_THINK = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
KEY = b"test-key"


def request(messages: list[dict] | None = None, **extra: object) -> MessageCreateParams:
    messages = messages or [{"role": "user", "content": "hi"}]
    return MessageCreateParams.model_validate({"model": "m", "max_tokens": 100, "messages": messages, **extra})


def renderer(template: str | None = None, key: bytes = KEY) -> PromptRenderer:
    return PromptRenderer(CharTokenizer(), template, thinking_key=key)


def test_signatures_verify_only_with_the_same_key_and_text() -> None:
    signer = ThinkingSigner(KEY)
    sig = signer.sign("deep thought")
    assert sig.startswith(SIGNATURE_PREFIX) and sig == signer.sign("deep thought")
    assert signer.verify("deep thought", sig)
    assert not signer.verify("deep thought!", sig)
    assert not ThinkingSigner(b"other").verify("deep thought", sig)
    assert not signer.verify("deep thought", "EqQBCkgIARABGAIiQL")  # an Anthropic-style signature
    with pytest.raises(ValueError):
        ThinkingSigner(b"")


def test_thinking_key_from_environment_or_random() -> None:
    assert thinking_key_from_env({THINKING_KEY_ENV: "s3cret"}) == b"s3cret"
    a, b = thinking_key_from_env({}), thinking_key_from_env({})
    assert len(a) == 32 and a != b


@pytest.mark.parametrize(("thinking", "output_config", "requested", "budget"), [
    (None, None, False, None),
    ({"type": "disabled"}, None, False, None),
    ({"type": "enabled", "budget_tokens": 2048}, None, True, 2048),
    ({"type": "adaptive"}, {"effort": "low"}, True, EFFORT_BUDGETS["low"]),
    ({"type": "adaptive"}, {"effort": "max"}, True, None),
    ({"type": "adaptive"}, None, True, None),
    ({"type": "something_new"}, None, False, None),
])
def test_plans(thinking: dict | None, output_config: dict | None, requested: bool, budget: int | None) -> None:
    extra = {k: v for k, v in (("thinking", thinking), ("output_config", output_config)) if v is not None}
    plan = renderer(QWEN3_LIKE).render(request(**extra)).thinking
    assert (plan.requested, plan.budget_tokens, plan.enabled) == (requested, budget, requested)
    assert (plan.open_marker, plan.close_marker) == ("<think>", "</think>")
    assert not plan.starts_open


def test_enable_thinking_follows_the_request() -> None:
    r = renderer(QWEN3_LIKE)
    assert r.caps.reads_enable_thinking and r.caps.reads_reasoning_content
    on = r.render(request(thinking={"type": "adaptive"})).text
    off = r.render(request(thinking={"type": "disabled"})).text
    assert on.endswith("<|im_start|>assistant\n") and off.endswith("<think>\n\n</think>\n\n")
    assert r.render(request()).text == off  # absent means disabled, as in the API
    # An operator default applies to requests that do not say.
    r = PromptRenderer(CharTokenizer(), QWEN3_LIKE, template_kwargs={"enable_thinking": True}, thinking_key=KEY)
    assert r.render(request()).text == on
    assert r.render(request(thinking={"type": "disabled"})).text == off


def test_models_without_markers_accept_thinking_and_plan_none() -> None:
    r = renderer()  # ChatML, like SmolLM2
    plan = r.render(request(thinking={"type": "enabled", "budget_tokens": 1024})).thinking
    assert plan.requested and not plan.enabled and plan.markers is None and plan.open_marker is None


def test_prompt_that_opens_thinking_starts_generation_inside_it() -> None:
    plan = renderer(OPENS_THINK).render(request(thinking={"type": "adaptive"})).thinking
    assert plan.starts_open and plan.enabled


def _history(signature: str, thinking: str = "I pondered.") -> list[dict]:
    return [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": thinking, "signature": signature},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "A."}]},
        {"role": "user", "content": "more"},
    ]


def test_signed_thinking_renders_back_and_foreign_thinking_is_dropped() -> None:
    r = renderer(QWEN3_LIKE)
    good = ThinkingSigner(KEY).sign("I pondered.")
    text = r.render(request(_history(good))).text
    assert "<|im_start|>assistant\n<think>\nI pondered.\n</think>\n\nA.<|im_end|>" in text
    for bad in ("", "forged", ThinkingSigner(b"other server").sign("I pondered.")):
        text = r.render(request(_history(bad))).text
        assert "I pondered." not in text and "<|im_start|>assistant\nA.<|im_end|>" in text
    assert "opaque" not in text
    # Edited thinking no longer verifies.
    assert "I pondered!" not in r.render(request(_history(good, "I pondered!"))).text


def test_signed_thinking_goes_into_content_when_the_template_has_no_field() -> None:
    template = OPENS_THINK.replace("<think>\\n", "<think>\n")
    r = renderer(template)
    assert not r.caps.reads_reasoning_content
    text = r.render(request(_history(ThinkingSigner(KEY).sign("I pondered.")))).text
    assert "<|im_start|>assistant\n<think>\nI pondered.\n</think>\n\nA.<|im_end|>" in text


def test_templates_without_markers_drop_all_thinking() -> None:
    text = renderer().render(request(_history(ThinkingSigner(KEY).sign("I pondered.")))).text
    assert "I pondered." not in text and "<|im_start|>assistant\nA.<|im_end|>" in text
