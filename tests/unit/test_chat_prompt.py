"""PromptRenderer: Anthropic conversations → template messages → prompt text and ids."""

from __future__ import annotations

import pytest

from pensieve.chat import PromptRenderer
from pensieve.protocol import MessageCountTokensParams, MessageCreateParams
from tests.helpers.api_fakes import CharTokenizer

# SmolLM2's shape: ChatML with a default system prompt when none is given.
SMOL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's shape: no system role at all.
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<turn>' + message['role'] + '\n' + message['content'] | trim + '<end>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<turn>model\n' }}{% endif %}"
)
# Mistral's shape: a system message only first, then strict alternation.
SYSTEM_FIRST_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {% if loop.first %}{{ sys }}{% endif %}{{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}</s>{% endif %}{% endfor %}"
)
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def request(messages: list[dict], **extra: object) -> MessageCreateParams:
    return MessageCreateParams.model_validate({"model": "m", "max_tokens": 10, "messages": messages, **extra})


def renderer(template: str | None = None, *, add_bos: bool = False) -> PromptRenderer:
    return PromptRenderer(CharTokenizer(add_bos=add_bos), template)


def test_chatml_fallback_renders_system_blocks_and_turns() -> None:
    req = request(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        system=[
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3.f3a; cc_entrypoint=cli;"},
            {"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be terse."},
        ],
    )
    prompt = renderer().render(req)
    assert prompt.text == (
        "<|im_start|>system\nYou are helpful.\n\nBe terse.<|im_end|>\n"
        "<|im_start|>user\na\n\nb<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.token_ids == CharTokenizer().encode(prompt.text)
    assert prompt.prefill == ""


def test_billing_header_does_not_change_the_prompt() -> None:
    def with_header(suffix: str) -> MessageCreateParams:
        return request([{"role": "user", "content": "hi"}], system=[
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.3.{suffix};"},
            {"type": "text", "text": "System."},
        ])
    r = renderer()
    assert r.render(with_header("a1b")).token_ids == r.render(with_header("c2d")).token_ids


def test_mid_conversation_system_joins_the_user_turn_it_precedes() -> None:
    req = request([
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "system", "content": "NOTE"},
        {"role": "user", "content": "three"},
    ])
    text = renderer(SMOL_TEMPLATE).render(req).text
    assert "<|im_start|>assistant\ntwo<|im_end|>\n<|im_start|>user\nNOTE\n\nthree<|im_end|>" in text
    assert text.startswith("<|im_start|>system\nYou are SmolLM.")
    assert text.count("<|im_start|>system") == 1


def test_system_after_the_prompt_goes_before_the_users_words() -> None:
    """Claude Code's shape: the environment as a system message after the user's prompt.
    The request stays the last thing before the reply, and the next turn (history resent
    with more appended) renders the same prefix."""
    turn1 = [
        {"role": "user", "content": [{"type": "text", "text": "<reminder>"}, {"type": "text", "text": "Say hi."}]},
        {"role": "system", "content": "# Environment"},
    ]
    r = renderer(SMOL_TEMPLATE)
    first = r.render(request(turn1, system="SYS"))
    assert first.text.endswith(
        "<|im_start|>user\n# Environment\n\n<reminder>\n\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    turn2 = [*turn1, {"role": "assistant", "content": "Hi!"},
             {"role": "user", "content": "Bye."}, {"role": "system", "content": "later"}]
    second = r.render(request(turn2, system="SYS"))
    cut = first.text.rindex("<|im_start|>assistant")
    assert second.text.startswith(first.text[:cut])
    assert second.text.endswith("<|im_start|>user\nlater\n\nBye.<|im_end|>\n<|im_start|>assistant\n")


def test_system_with_no_user_turn_beside_it_keeps_its_own_turn() -> None:
    req = request([
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "system", "content": "NOTE"},
        {"role": "assistant", "content": "three"},
    ])
    text = renderer(SMOL_TEMPLATE).render(req).text
    assert "two<|im_end|>\n<|im_start|>system\nNOTE<|im_end|>\n<|im_start|>assistant\nthree" in text


def test_system_is_merged_into_user_turns_when_the_template_has_no_system_role() -> None:
    req = request([
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "system", "content": "NOTE"},
        {"role": "user", "content": "three"},
    ], system="SYS")
    r = renderer(NO_SYSTEM_TEMPLATE)
    assert not r.caps.system_first and not r.caps.system_anywhere
    text = r.render(req).text
    assert text == (
        "<s><turn>user\nSYS\n\none<end>\n<turn>assistant\ntwo<end>\n"
        "<turn>user\nNOTE\n\nthree<end>\n<turn>model\n"
    )


def test_system_first_only_template_keeps_leading_system_and_merges_later_ones() -> None:
    req = request([
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "system", "content": "NOTE"},
        {"role": "user", "content": "three"},
    ], system="SYS")
    r = renderer(SYSTEM_FIRST_TEMPLATE)
    assert r.caps.system_first and not r.caps.system_anywhere
    assert r.render(req).text == "[INST] SYS\none [/INST]two</s>[INST] NOTE\n\nthree [/INST]"


def test_consecutive_same_role_turns_are_merged() -> None:
    req = request([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert renderer(NO_SYSTEM_TEMPLATE).render(req).text == "<s><turn>user\na\n\nb<end>\n<turn>model\n"


def test_trailing_assistant_message_is_continued() -> None:
    req = request([{"role": "user", "content": "Pick A or B"}, {"role": "assistant", "content": "The answer is ("}])
    prompt = renderer().render(req)
    assert prompt.text.endswith("<|im_start|>assistant\nThe answer is (")
    assert prompt.prefill == "The answer is ("
    # The same through a template that trims contents.
    prompt = renderer(NO_SYSTEM_TEMPLATE).render(req)
    assert prompt.text.endswith("<turn>assistant\nThe answer is (")


def test_empty_trailing_assistant_message_is_no_prefill() -> None:
    req = request([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    prompt = renderer().render(req)
    assert prompt.text.endswith("<|im_start|>assistant\n") and prompt.prefill == ""


def test_bos_is_prepended_only_when_the_template_did_not_write_it() -> None:
    req = request([{"role": "user", "content": "hi"}])
    ids = renderer(add_bos=True).render(req).token_ids
    assert ids[0] == 0 and ids[1] != 0
    ids = renderer(NO_SYSTEM_TEMPLATE, add_bos=True).render(req).token_ids
    assert ids[0] == 0 and ids[1] != 0
    assert renderer().render(req).token_ids[0] != 0


def test_tool_blocks_render_in_hermes_format_and_thinking_and_images_do_not_break_anything() -> None:
    req = request([
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "SECRET THOUGHT", "signature": "s"},
            {"type": "text", "text": "Running it."},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
             "content": [{"type": "text", "text": "no such dir"}]},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "DOC BODY"}},
            {"type": "search_result", "source": "s", "title": "t", "content": []},
        ]},
    ])
    text = renderer().render(req).text
    assert "look\n\n[image]" in text
    assert "SECRET THOUGHT" not in text
    assert 'Running it.\n\n<tool_call>\n{"name": "Bash", "arguments": {"command": "ls"}}\n</tool_call>' in text
    assert "<tool_response>\nError: no such dir\n</tool_response>" in text
    assert "DOC BODY" in text


def test_client_tools_are_offered_and_server_tools_are_not() -> None:
    req = request([{"role": "user", "content": "hi"}], tools=[
        {"name": "Bash", "description": "run", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search"},
    ])
    # This template lists tools but cannot render tool calls: the built-in tool prompt is used.
    r = renderer(TOOLS_TEMPLATE)
    assert not r.caps.native_tools
    text = r.render(req).text
    assert text.startswith("system: # Tools") and '{"name":"Bash","description":"run"' in text
    assert "web_search" not in text and "TOOLS:" not in text
    assert "Tools" not in r.render(request([{"role": "user", "content": "hi"}])).text


def test_count_tokens_equals_the_rendered_prompt_length() -> None:
    messages = [{"role": "user", "content": "hello there"}]
    r = renderer(SMOL_TEMPLATE, add_bos=True)
    create = request(messages, system="S")
    count = MessageCountTokensParams.model_validate({"model": "m", "messages": messages, "system": "S"})
    assert r.count_tokens(count) == r.render(create).num_tokens == len(r.render(create).token_ids)


def test_template_kwargs_are_passed() -> None:
    template = "{% if enable_thinking is defined and not enable_thinking %}NOTHINK{% endif %}"
    r = PromptRenderer(CharTokenizer(), template, template_kwargs={"enable_thinking": False})
    assert r.render(request([{"role": "user", "content": "x"}])).text == "NOTHINK"


@pytest.mark.parametrize("template", [None, "", SMOL_TEMPLATE])
def test_chatml_family_supports_system_everywhere(template: str | None) -> None:
    caps = renderer(template).caps
    assert caps.system_first and caps.system_anywhere
