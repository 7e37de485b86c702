"""GGUF → MLX through Pensieve's own loader (tiny random llama/qwen2 GGUFs): the converted
float32 folder gives the torch backend's greedy tokens; a GGUF served on MLX is converted once
and then reused; `pensieve convert` end to end; the MLX serve path's context rules and KV
budget. Skipped only where mlx cannot be imported."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'pensieve[mlx]')")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install 'pensieve[mlx]')")

from pensieve.backends import mlx_backend  # noqa: E402
from pensieve.backends.mlx_backend import load_mlx_model, mlx_engine  # noqa: E402
from pensieve.backends.mlx_convert import convert  # noqa: E402
from pensieve.backends.mlx_runner import plan_blocks  # noqa: E402
from pensieve.backends.torch_backend import build_engine  # noqa: E402
from pensieve.cli.main import main  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.engine.types import SamplingParams  # noqa: E402
from pensieve.loaders.registry import load_checkpoint  # noqa: E402
from tests.helpers.tiny_families import VOCAB, hf_model, write_gguf  # noqa: E402

CONFIG = EngineConfig(context_length=128, block_size=4, max_num_seqs=3, max_num_batched_tokens=16)


def tiny_gguf(path: Path, family: str) -> Path:
    import transformers

    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}[family]
    config = getattr(transformers, cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=family == "llama")
    return write_gguf(path, hf_model(config, seed=5), family)


def greedy(engine, prompts: list[list[int]], steps: int = 8) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=steps, temperature=0.0,
                                                     ignore_eos=True))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for delta in engine.step():
            out[delta.request_id].extend(delta.token_ids)
    return [out[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_converted_float32_matches_torch_on_the_gguf(tmp_path: Path, family: str) -> None:
    """Q/K row order, biases, tied/untied heads and the vocabulary survive the conversion."""
    gguf = tiny_gguf(tmp_path / "m.gguf", family)
    folder = convert(gguf, tmp_path / "mlx", q_bits=0, dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (7, 19)]
    on_mlx = greedy(mlx_engine(load_mlx_model(folder), CONFIG), prompts)
    on_torch = greedy(build_engine(load_checkpoint(gguf), CONFIG), prompts)
    assert on_mlx == on_torch
    ckpt = load_checkpoint(gguf)
    loaded = load_mlx_model(folder)
    text = "<|im_start|>hello world"
    assert loaded.tokenizer.encode(text) == ckpt.tokenizer.encode(text)
    assert loaded.tokenizer.eos_token_ids == ckpt.tokenizer.eos_token_ids
    assert loaded.activation_itemsize == 4  # float32 weights: a float32 KV pool is budgeted


def test_a_gguf_served_on_mlx_is_converted_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mlx_backend, "MLX_CACHE", tmp_path / "cache")
    gguf = tiny_gguf(tmp_path / "tiny.gguf", "llama")
    first = load_mlx_model(gguf)
    assert first.path.parent == tmp_path / "cache" and first.name == "tiny"
    assert json.loads((first.path / "config.json").read_text())["quantization"]["bits"] == 4
    assert first.activation_itemsize == 2  # 4-bit codes, bfloat16 norms and activations
    stamp = (first.path / "config.json").stat().st_mtime_ns
    second = load_mlx_model(gguf)
    assert second.path == first.path
    assert (second.path / "config.json").stat().st_mtime_ns == stamp  # not converted again


def test_convert_command(tmp_path: Path, capsys) -> None:
    gguf = tiny_gguf(tmp_path / "tiny.gguf", "llama")
    out = tmp_path / "out"
    assert main(["convert", str(gguf), str(out), "--q-bits", "8", "--q-group-size", "32"]) == 0
    assert "serve it with: pensieve serve --backend mlx" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert main(["convert", str(gguf), str(out)]) == 2  # exists: a clear error, not a traceback
    assert "already exists" in capsys.readouterr().err


def test_mlx_context_rules() -> None:
    from pensieve.cli.errors import StartupError
    from pensieve.cli.serve_mlx import mlx_context

    def settings(**kw):
        return argparse.Namespace(context_length=None, rope_scale=None, **kw)

    assert mlx_context(settings(), 4096) == 4096
    assert mlx_context(argparse.Namespace(context_length=1024, rope_scale=None), 4096) == 1024
    with pytest.raises(StartupError, match="does not scale RoPE"):
        mlx_context(argparse.Namespace(context_length=8192, rope_scale=None), 4096)
    with pytest.raises(StartupError, match="--rope-scale"):
        mlx_context(argparse.Namespace(context_length=None, rope_scale=2.0), 4096)


def test_kv_blocks_follow_the_memory_budget() -> None:
    per_token = 2 * 30 * 3 * 64 * 2  # SmolLM2-135M in bf16
    config = EngineConfig(context_length=2048, block_size=16, max_num_seqs=8,
                          kv_cache_bytes=64 << 20)
    blocks = plan_blocks(per_token, config)
    assert blocks * 16 * per_token <= 64 << 20 and blocks >= 2048 // 16
    assert plan_blocks(per_token, EngineConfig(context_length=2048, block_size=16,
                                               kv_cache_bytes=1 << 20)) == 128  # one context
    roomy = EngineConfig(context_length=2048, block_size=16, max_num_seqs=2, kv_cache_bytes=1 << 34)
    assert plan_blocks(per_token, roomy) == 2 * 128  # never past max_num_seqs full contexts
