"""The API over the real EngineClient and engine (a tiny random Llama, byte tokenizer),
served by uvicorn in-process and driven by the anthropic SDK: what a scripted engine
cannot show — real concurrency, real aborts, the engine's own limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from pensieve.api import ApiConfig, create_app
from pensieve.chat import PromptRenderer
from pensieve.engine.client import EngineClient
from tests.helpers.server import serve_app_in_thread
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, EngineClient]]:
    engine = tiny_engine()
    client = EngineClient(engine, "tiny")
    client.start()
    app = create_app(ApiConfig(model_id="tiny", context_length=engine.context_length), client,
                     PromptRenderer(ByteTokenizer(), None))
    try:
        with serve_app_in_thread(app) as url:
            yield url, client
    finally:
        client.shutdown()


@pytest.fixture
def url(served: tuple[str, EngineClient]) -> str:
    return served[0]


def test_stream_and_create_agree_and_usage_adds_up(url: str) -> None:
    sdk = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
    kwargs = dict(model="claude-sonnet-5", max_tokens=12, messages=HI, extra_body=GREEDY)
    plain = sdk.messages.create(**kwargs)  # type: ignore[arg-type]
    with sdk.messages.stream(**kwargs) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    counted = sdk.messages.count_tokens(model="tiny", messages=HI).input_tokens  # type: ignore[arg-type]
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in plain.content]
    assert final.stop_reason == plain.stop_reason and final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= 12
    # input_tokens excludes tokens read from or written to the cache; the three add up to the
    # prompt, and the second identical prompt reads from the prefix cache what the first wrote.
    for message in (plain, final):
        usage = message.usage
        total = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
        assert total == counted
    assert plain.usage.cache_creation_input_tokens > 0 and final.usage.cache_read_input_tokens > 0


async def test_concurrent_streams_all_finish(url: str) -> None:
    sdk = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)

    async def one(i: int) -> anthropic.types.Message:
        async with sdk.messages.stream(model="claude-haiku-4-5", max_tokens=16, extra_body=GREEDY,
                                       messages=[{"role": "user", "content": f"request {i % 2}"}]) as stream:
            return await stream.get_final_message()

    messages = await asyncio.gather(*(one(i) for i in range(6)))
    assert all(m.stop_reason in ("end_turn", "max_tokens") for m in messages)
    texts = [m.content[0].text if m.content else "" for m in messages]  # type: ignore[union-attr]
    assert texts[0::2] == [texts[0]] * 3 and texts[1::2] == [texts[1]] * 3  # greedy: same prompt, same text


def test_disconnect_aborts_the_engine_request(served: tuple[str, EngineClient],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url, client = served
    engine = client.engine
    aborted: list[str] = []
    real_abort, real_step = engine.abort, engine.step

    def spy_abort(request_id: str):  # noqa: ANN202
        aborted.append(request_id)
        return real_abort(request_id)

    def slow_step():  # noqa: ANN202 - ~5 ms a token: 400 tokens outlast the test's read
        time.sleep(0.005)
        return real_step()

    monkeypatch.setattr(engine, "abort", spy_abort)
    monkeypatch.setattr(engine, "step", slow_step)
    body = {"model": "tiny", "max_tokens": 400, "messages": HI, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=30) as response:
        request_id = response.headers["request-id"]
        lines = response.iter_lines()
        while "content_block_delta" not in next(lines):
            pass
    deadline = time.monotonic() + 5
    while (engine.has_work() or not aborted) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert aborted == [request_id], "the engine kept generating for a client that left"
    assert not engine.has_work()


def test_prompt_beyond_the_context_is_the_compaction_error(url: str) -> None:
    sdk = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: \d+ tokens > 512 maximum"):
        sdk.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "x" * 600}])
    assert sdk.messages.create(model="tiny", max_tokens=3, messages=HI).usage.output_tokens > 0
