"""What the scripted engine cannot show, on the real engine over a tiny random Llama (byte
tokenizer), through the SDK: a thinking budget forced by the engine and counted in
``output_tokens_details`` (SmolLM2 has no reasoning), effort alone leaving thinking off, and
the context filling before ``max_tokens``. (The byte tokenizer has no xgrammar vocabulary:
grammars are tested on SmolLM2, tests/integration/test_structured_outputs.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from pensieve.api import ApiConfig, create_app
from pensieve.chat import PromptRenderer
from pensieve.engine.client import EngineClient
from tests.helpers.server import serve_app_in_thread
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

MODEL = "claude-sonnet-5"
GREEDY = {"temperature": 0}
HI = [{"role": "user", "content": "hi"}]
# Opens thinking in the generation prompt (the Qwen 3 / DeepSeek-R1 shape).
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)
CLOSE = len(b"</think>")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    engine = tiny_engine()
    client = EngineClient(engine, "tiny")
    client.start()
    app = create_app(ApiConfig(model_id="tiny", context_length=engine.context_length), client,
                     PromptRenderer(ByteTokenizer(), THINK_TEMPLATE))
    try:
        with serve_app_in_thread(app) as base:
            yield base
    finally:
        client.shutdown()


def sdk(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=120)


@pytest.mark.parametrize("display", [None, "omitted"])
def test_the_engine_forces_the_end_of_thinking_at_the_budget_and_counts_it(url: str, display: str | None) -> None:
    thinking = {"type": "enabled", "budget_tokens": 6, **({"display": display} if display else {})}
    kwargs = dict(model=MODEL, max_tokens=40, messages=HI, thinking=thinking, extra_body=GREEDY)
    plain = sdk(url).messages.create(**kwargs)  # type: ignore[arg-type]
    with sdk(url).messages.stream(**kwargs) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_message()
    for m in (plain, streamed):
        assert m.content[0].type == "thinking" and m.content[0].signature
        if display == "omitted":
            assert m.content[0].thinking == ""
        details = m.usage.output_tokens_details
        assert details is not None
        # 6 thinking tokens, then the forced close marker (one token a byte here)
        assert details.thinking_tokens == 6 + CLOSE, details
        assert details.thinking_tokens < m.usage.output_tokens <= 40
    assert [b.model_dump() for b in plain.content] == [b.model_dump() for b in streamed.content]


def test_effort_alone_leaves_thinking_off_on_the_real_engine(url: str) -> None:
    message = sdk(url).messages.create(model=MODEL, max_tokens=20, messages=HI, extra_body=GREEDY,
                                       output_config={"effort": "max"})
    assert all(b.type != "thinking" for b in message.content)
    assert message.usage.output_tokens_details is None


def test_output_filling_the_context_is_model_context_window_exceeded(url: str) -> None:
    long = [{"role": "user", "content": "x" * 440}]  # 512-token context, byte tokens
    counted = sdk(url).messages.count_tokens(model=MODEL, messages=long).input_tokens
    message = sdk(url).messages.create(model=MODEL, max_tokens=64000, messages=long, extra_body={
        **GREEDY, "thinking": {"type": "disabled"}})
    if message.stop_reason == "end_turn":  # the random model wrote its end token first
        pytest.skip("the tiny model ended its turn before the context filled")
    assert message.stop_reason == "model_context_window_exceeded"
    assert counted + message.usage.output_tokens == 512
