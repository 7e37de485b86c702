"""Fixtures for the Claude Code end-to-end tests: the CLI itself (npm, cached in the repo),
SmolLM2's real tokenizer and chat template, and scripted servers on loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pensieve.api import ApiConfig, create_app
from pensieve.chat import PromptRenderer
from pensieve.loaders.default_model import default_model_path
from pensieve.loaders.gguf_file import GGUFFile
from pensieve.loaders.tokenizer import TextTokenizer
from tests.e2e.claude_cli import install_claude_code
from tests.e2e.scripted import RecordingApp, ScriptedTokenEngine
from tests.helpers.real_server import pensieve_server
from tests.helpers.server import serve_app_in_thread

SERVED_ID = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def claude_bin() -> Path:
    """The real ``claude`` executable (npm install into .cache/claude-code on first use)."""
    return install_claude_code()


@pytest.fixture(scope="session")
def default_server_url() -> Iterator[str]:
    """The real `pensieve serve` with the default model and its trained 8k context, greedy
    for requests that send no temperature (Claude Code sends none)."""
    with pensieve_server("--default-temperature", "0") as url:
        yield url


@pytest.fixture(scope="session")
def smol_renderer() -> PromptRenderer:
    """SmolLM2's own tokenizer and chat template, read from the GGUF (no weights loaded)."""
    gguf = GGUFFile(default_model_path())
    template = gguf.get("tokenizer.chat_template")
    return PromptRenderer(TextTokenizer.from_gguf_metadata(gguf.metadata),
                          template if isinstance(template, str) else None)


@pytest.fixture
def scripted_server(smol_renderer: PromptRenderer) -> Callable:
    """``with scripted_server(reply) as (url, engine, recorder)``: the real app (routes,
    renderer, segmenter, tool parsers, SSE) over a scripted token source, recording bodies."""

    @contextmanager
    def start(reply: Callable[[str], str], context_length: int = 32768
              ) -> Iterator[tuple[str, ScriptedTokenEngine, RecordingApp]]:
        engine = ScriptedTokenEngine(smol_renderer.tokenizer, reply)
        config = ApiConfig(model_id=SERVED_ID, context_length=context_length)
        recorder = RecordingApp(create_app(config, engine, smol_renderer))
        with serve_app_in_thread(recorder) as url:
            yield url, engine, recorder

    return start
