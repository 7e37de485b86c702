"""The real server with async scheduling forced on (the CUDA default) on the CPU: concurrent
greedy streams give the same text as a synchronous server, and a client leaving mid-stream
does not disturb the others."""

from __future__ import annotations

import concurrent.futures

import anthropic
import httpx
import pytest

from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 plus 2?",
             "Write a haiku about the sea."]


def _answers(url: str, leave_one: bool) -> list[tuple[str, str | None, int]]:
    client = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)

    def ask(q: str) -> tuple[str, str | None, int]:
        with client.messages.stream(model="claude-sonnet-5", max_tokens=40, extra_body={"temperature": 0},
                                    messages=[{"role": "user", "content": q}]) as stream:
            final = stream.get_final_message()
        return final.content[0].text, final.stop_reason, final.usage.output_tokens

    def leave() -> None:
        with httpx.stream("POST", f"{url}/v1/messages", json={
                "model": "claude-sonnet-5", "max_tokens": 300, "stream": True,
                "messages": [{"role": "user", "content": "Write a long essay about rivers."}]}) as r:
            for line in r.iter_lines():
                if "content_block_delta" in line:
                    break

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        left = pool.submit(leave) if leave_one else None
        answers = list(pool.map(ask, QUESTIONS))
        if left:
            left.result()
    return answers


def test_async_scheduling_serves_the_same_text_as_sync():
    with pensieve_server("--async-scheduling", "off") as url:
        sync = _answers(url, leave_one=False)
    with pensieve_server("--async-scheduling", "on") as url:
        overlapped = _answers(url, leave_one=True)
        again = _answers(url, leave_one=False)
    assert all(text.strip() and n > 0 for text, _, n in sync)
    assert "Paris" in sync[0][0]
    assert overlapped == sync and again == sync
