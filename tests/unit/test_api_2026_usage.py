"""Stop reasons, usage and thinking as the 2026 API reports them, over the real app (scripted
engine, CharTokenizer), checked on the wire and through the SDK's message and stream
accumulator: ``model_context_window_exceeded``, ``stop_details``, ``usage.cache_creation``
by ttl, ``output_tokens_details.thinking_tokens``, ``server_tool_use`` null, thinking
``display: "omitted"``, and what ``effort`` does to the thinking budget."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from pensieve.chat.thinking import EFFORT_BUDGETS
from pensieve.engine.types import FinishReason, GenerationDelta
from tests.helpers.api_fakes import CharTokenizer, ScriptedEngine, fake_server, text_script

MODEL = "claude-sonnet-5"
HI = [{"role": "user", "content": "hi"}]
THINK_TEMPLATE = (  # the Qwen 3 shape: reasoning markers, enable_thinking, reasoning_content
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
THOUGHT = "<think>\nPonder the greeting.\n</think>\n\nHello!"


def sdk(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=30)


def both(url: str, **kw: object) -> tuple[anthropic.types.Message, anthropic.types.Message]:
    client = sdk(url)
    plain = client.messages.create(model=MODEL, **kw)  # type: ignore[arg-type]
    with client.messages.stream(model=MODEL, **kw) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_message()
    return plain, streamed


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def cached_script(cached: int, created: int):
    def script(prompt_ids, params, request_id):
        return [GenerationDelta(request_id, text="ok", num_prompt_tokens=len(prompt_ids), num_output_tokens=1),
                GenerationDelta(request_id, finish_reason=FinishReason.EOS, num_prompt_tokens=len(prompt_ids),
                                num_cached_tokens=cached, num_new_cached_tokens=created, num_output_tokens=2)]
    return script


def test_output_that_fills_the_context_before_max_tokens_is_model_context_window_exceeded() -> None:
    engine = ScriptedEngine(text_script("a", "b", finish=FinishReason.MAX_TOKENS))
    with fake_server(engine, context_length=64) as url:
        full, full_streamed = both(url, max_tokens=32000, messages=HI)
        limit = engine.calls[0].params.max_tokens
        cut, _ = both(url, max_tokens=5, messages=HI)
    assert limit < 32000  # clamped to what the context leaves
    assert full.stop_reason == full_streamed.stop_reason == "model_context_window_exceeded"
    assert cut.stop_reason == "max_tokens"  # the request's own limit came first


def test_engine_context_finish_is_model_context_window_exceeded() -> None:
    engine = ScriptedEngine(text_script("a", finish=FinishReason.CONTEXT))
    with fake_server(engine) as url:
        plain, streamed = both(url, max_tokens=50, messages=HI)
    assert plain.stop_reason == streamed.stop_reason == "model_context_window_exceeded"


def test_stop_details_and_server_tool_use_are_null_and_never_a_false_refusal() -> None:
    engine = ScriptedEngine(text_script("I can't help with that."))
    with fake_server(engine) as url:
        raw = httpx.post(f"{url}/v1/messages", json={"model": MODEL, "max_tokens": 20, "messages": HI}, timeout=30)
        plain, streamed = both(url, max_tokens=20, messages=HI)
    body = raw.json()
    assert body["stop_reason"] == "end_turn" and body["stop_details"] is None
    assert body["usage"]["server_tool_use"] is None and body["usage"]["output_tokens_details"] is None
    for m in (plain, streamed):
        assert m.stop_reason == "end_turn" and m.stop_details is None and m.usage.server_tool_use is None


@pytest.mark.parametrize(("cache_control", "ttl"), [
    (None, "5m"), ({"type": "ephemeral"}, "5m"), ({"type": "ephemeral", "ttl": "1h"}, "1h")])
def test_cache_creation_is_split_by_the_ttl_asked(cache_control: dict | None, ttl: str) -> None:
    engine = ScriptedEngine(cached_script(cached=4, created=6))
    extra = {"cache_control": cache_control} if cache_control else {}
    with fake_server(engine) as url:
        plain = sdk(url).messages.create(model=MODEL, max_tokens=20, messages=HI, extra_body=extra)
        events = []
        with httpx.stream("POST", f"{url}/v1/messages", timeout=30,
                          json={"model": MODEL, "max_tokens": 20, "messages": HI, "stream": True, **extra}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ") and "message_delta" in line]
    usage = plain.usage
    assert usage.cache_read_input_tokens == 4 and usage.cache_creation_input_tokens == 6
    assert usage.input_tokens == len(engine.calls[0].prompt_ids) - 10
    split = usage.cache_creation
    assert (split.ephemeral_5m_input_tokens, split.ephemeral_1h_input_tokens) == ((6, 0) if ttl == "5m" else (0, 6))
    assert f'"ephemeral_{ttl}_input_tokens":6' in events[0]  # raw stream clients see the split too


def test_thinking_tokens_are_counted_when_the_request_thinks() -> None:
    engine = ScriptedEngine(text_script(*pieces(THOUGHT)))
    with fake_server(engine, template=THINK_TEMPLATE) as url:
        plain, streamed = both(url, max_tokens=200, messages=HI, thinking={"type": "enabled", "budget_tokens": 1024})
        unthinking = sdk(url).messages.create(model=MODEL, max_tokens=200, messages=HI)
    thinking_pieces = len(pieces(THOUGHT.split("</think>")[0] + "</think>"))
    for m in (plain, streamed):
        assert [b.type for b in m.content] == ["thinking", "text"]
        details = m.usage.output_tokens_details
        assert details is not None and 0 < details.thinking_tokens < m.usage.output_tokens
        assert thinking_pieces - 1 <= details.thinking_tokens <= thinking_pieces + 1
    assert unthinking.usage.output_tokens_details is None  # no thinking asked: no breakdown


def test_display_omitted_streams_an_empty_thinking_block_whose_signature_brings_it_back() -> None:
    engine = ScriptedEngine(text_script(*pieces(THOUGHT)))
    thinking = {"type": "adaptive", "display": "omitted"}
    with fake_server(engine, template=THINK_TEMPLATE) as url:
        client = sdk(url)
        with client.messages.stream(model=MODEL, max_tokens=200, messages=HI, thinking=thinking) as stream:
            kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
            final = stream.get_final_message()
        plain = client.messages.create(model=MODEL, max_tokens=200, messages=HI, thinking=thinking)
        block = plain.content[0]
        history = [*HI, {"role": "assistant", "content": [block.model_dump(), {"type": "text", "text": "Hello!"}]},
                   {"role": "user", "content": "again"}]
        client.messages.create(model=MODEL, max_tokens=20, messages=history, thinking=thinking)
        shown = CharTokenizer().decode(engine.calls[-1].prompt_ids)
        forged = [*HI, {"role": "assistant", "content": [{"type": "thinking", "thinking": "",
                                                          "signature": block.signature[:-6] + "AAAAA="},
                                                         {"type": "text", "text": "Hello!"}]},
                  {"role": "user", "content": "again"}]
        client.messages.create(model=MODEL, max_tokens=20, messages=forged, thinking=thinking)
        forged_shown = CharTokenizer().decode(engine.calls[-1].prompt_ids)
    assert "thinking_delta" not in kinds and "signature_delta" in kinds
    for m in (final, plain):
        assert m.content[0].type == "thinking" and m.content[0].thinking == "" and m.content[0].signature
        assert m.content[1].text == "Hello!"
    assert "Ponder the greeting." in shown  # the sealed signature carried the thinking back
    assert "Ponder the greeting." not in forged_shown


def budget_of(engine: ScriptedEngine) -> int | None:
    budget = engine.calls[-1].params.thinking_budget
    return None if budget is None else budget.budget_tokens


@pytest.mark.parametrize("effort", ["low", "medium", "high", "xhigh", "max"])
def test_effort_sets_the_adaptive_thinking_budget(effort: str) -> None:
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine, template=THINK_TEMPLATE) as url:
        sdk(url).messages.create(model=MODEL, max_tokens=20000, messages=HI, thinking={"type": "adaptive"},
                                 output_config={"effort": effort})
    assert not CharTokenizer().decode(engine.calls[-1].prompt_ids).endswith("</think>\n\n")  # thinking on
    assert budget_of(engine) == EFFORT_BUDGETS[effort]  # xhigh, max: no cap below max_tokens


def test_effort_without_thinking_does_not_turn_thinking_on() -> None:
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine, template=THINK_TEMPLATE) as url:
        sdk(url).messages.create(model=MODEL, max_tokens=200, messages=HI, output_config={"effort": "max"})
        enabled = sdk(url).messages.create(model=MODEL, max_tokens=200, messages=HI, output_config={"effort": "low"},
                                           thinking={"type": "enabled", "budget_tokens": 2048})
    assert CharTokenizer().decode(engine.calls[0].prompt_ids).endswith("<think>\n\n</think>\n\n")  # told: off
    assert engine.calls[0].params.thinking_budget is None
    assert budget_of(engine) == 2048 and enabled.content[0].text == "ok"  # explicit budget wins over effort


def test_adaptive_thinking_on_a_model_without_reasoning_gives_no_thinking_block() -> None:
    engine = ScriptedEngine(text_script("Plain ", "answer."))
    with fake_server(engine) as url:  # ChatML: no reasoning markers
        plain, streamed = both(url, max_tokens=50, messages=HI, thinking={"type": "adaptive"},
                               output_config={"effort": "high"})
    for m in (plain, streamed):
        assert [b.type for b in m.content] == ["text"] and m.usage.output_tokens_details is None
    assert engine.calls[0].params.thinking_budget is None


def test_a_per_turn_effort_on_a_system_message_overrides_the_top_level_one() -> None:
    engine = ScriptedEngine(text_script("ok"))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "system", "content": "Think less now.", "output_config": {"effort": "low"}},
                {"role": "user", "content": "and now?"}]
    with fake_server(engine, template=THINK_TEMPLATE) as url:
        sdk(url).messages.create(model=MODEL, max_tokens=20000, messages=messages, thinking={"type": "adaptive"},
                                 output_config={"effort": "high"})
        per_turn = budget_of(engine)
        sdk(url).messages.create(model=MODEL, max_tokens=20000, messages=messages[:2] + messages[3:],
                                 thinking={"type": "adaptive"}, output_config={"effort": "high"})
    assert per_turn == EFFORT_BUDGETS["low"] and budget_of(engine) == EFFORT_BUDGETS["high"]
