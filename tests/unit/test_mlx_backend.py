"""The MLX backend on tiny random models (mlx[cpu] on Linux): the paged KV pool and its masks,
the runner through the real engine against mlx-lm's own generation, batching, conversion
(float and 4-bit), the CLI's backend and dtype choices. Skipped only where mlx cannot be
imported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'pensieve[mlx]')")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install 'pensieve[mlx]')")

from pensieve.backends.mlx_backend import load_mlx_model, mlx_engine  # noqa: E402
from pensieve.backends.mlx_convert import convert  # noqa: E402
from pensieve.backends.mlx_kv import PagedKVPool, StepLayout  # noqa: E402
from pensieve.backends.mlx_runner import layer_windows  # noqa: E402
from pensieve.cli.settings import default_dtype, resolve_backend  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.engine.types import SamplingParams  # noqa: E402
from tests.helpers.tiny_families import VOCAB, hf_model, save_hf  # noqa: E402

CONFIGS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
}


def tiny_hf(folder: Path, family: str) -> Path:
    import transformers

    cls, extra = CONFIGS[family]
    config = getattr(transformers, cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, **extra)
    return save_hf(folder, hf_model(config, seed=3))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny_mlx(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"mlx-{request.param}")
    return convert(tiny_hf(root / "hf", request.param), root / "mlx", q_bits=0, dtype="float32")


def prompts(n: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = np.random.default_rng(n)
    return [rng.integers(3, VOCAB, size=length).tolist() for length in lengths]


def engine_greedy(folder: Path, ids: list[list[int]], steps: int, **cfg) -> list[list[int]]:
    """Greedy tokens of the real engine over the MLX runner, all requests at once."""
    config = EngineConfig(context_length=128, block_size=4, max_num_seqs=4,
                          max_num_batched_tokens=cfg.pop("budget", 16), **cfg)
    engine = mlx_engine(load_mlx_model(folder), config)
    for i, p in enumerate(ids):
        engine.add_request(str(i), p, SamplingParams(max_tokens=steps, temperature=0.0,
                                                     ignore_eos=True))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(ids))}
    while engine.has_work():
        for delta in engine.step():
            out[delta.request_id].extend(delta.token_ids)
    return [out[str(i)] for i in range(len(ids))]


def mlx_lm_greedy(folder: Path, ids: list[int], steps: int) -> list[int]:
    """mlx-lm's own path: its model with its contiguous KVCache, argmax each step."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(steps):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


def test_engine_matches_mlx_lm_generation(tiny_mlx: Path) -> None:
    """Chunked prefill over shuffled-in-use blocks, batched decode of rows with different
    context lengths: the same greedy tokens as mlx-lm's unpaged generation."""
    ids = prompts(1, (5, 23, 11))
    got = engine_greedy(tiny_mlx, ids, steps=10)
    want = [mlx_lm_greedy(tiny_mlx, p, 10) for p in ids]
    assert got == want
    assert all(len(t) == 10 for t in got)


def test_batched_equals_one_at_a_time(tiny_mlx: Path) -> None:
    ids = prompts(2, (9, 17, 3, 30))
    together = engine_greedy(tiny_mlx, ids, steps=8)
    alone = [engine_greedy(tiny_mlx, [p], steps=8)[0] for p in ids]
    assert together == alone


def test_prefix_cache_hit_gives_the_same_tokens(tiny_mlx: Path) -> None:
    """A second request sharing a 16-token prefix reads it from the pool (cached tokens
    reported) and continues exactly as a cold run."""
    config = EngineConfig(context_length=128, block_size=4, max_num_seqs=2,
                          max_num_batched_tokens=64)
    engine = mlx_engine(load_mlx_model(tiny_mlx), config)
    prefix, tail = prompts(3, (16, 5))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    finals = {}
    for rid, ids in (("cold", prefix + [7]), ("warm", prefix + tail)):
        engine.add_request(rid, ids, params)
        tokens = []
        while engine.has_work():
            for delta in engine.step():
                tokens.extend(delta.token_ids)
                finals[rid] = delta
        finals[rid + "_tokens"] = tokens
    assert finals["warm"].num_cached_tokens == 16
    assert finals["warm_tokens"] == mlx_lm_greedy(tiny_mlx, prefix + tail, 6)


def test_pool_writes_gathers_and_grows_within_its_blocks() -> None:
    pool = PagedKVPool(num_layers=1, num_blocks=200, block_size=4)
    pool.ensure(0)
    assert pool.capacity == 64  # grows by whole chunks, not all 200 blocks at once
    keys = mx.arange(2 * 3 * 2, dtype=mx.float32).reshape(2, 3, 2)
    pool.write(0, mx.array([5, 9]), keys, -keys)
    got_k, got_v = pool.gather(0, mx.array([[9, 5]]))
    assert np.array_equal(np.array(got_k[0]), np.array(keys[::-1]))
    assert np.array_equal(np.array(got_v[0]), -np.array(keys[::-1]))
    pool.ensure(150)  # keeps what was written
    assert pool.capacity >= 151 and pool.keys[0].shape[0] == pool.capacity * 4
    assert np.array_equal(np.array(pool.gather(0, mx.array([[5]]))[0][0, 0]), np.array(keys[0]))
    with pytest.raises(ValueError, match="outside the pool"):
        pool.ensure(200)


def test_layout_mask_is_causal_per_row_and_hides_padding() -> None:
    layout = StepLayout(starts=[2, 5], ends=[3, 6], slots=mx.array([0, 1]),
                        index=mx.zeros((2, 6), dtype=mx.int32))
    mask = np.array(layout.mask(1))  # [B, 1, L, T]
    assert mask.shape == (2, 1, 1, 6)
    assert mask[0, 0, 0].tolist() == [True, True, True, False, False, False]
    assert mask[1, 0, 0].tolist() == [True] * 6
    windowed = np.array(layout.mask(1, window=2))
    assert windowed[1, 0, 0].tolist() == [False, False, False, False, True, True]
    assert np.array(layout.offset).tolist() == [2, 5]


def test_four_bit_conversion_loads_and_runs(tmp_path: Path) -> None:
    out = convert(tiny_hf(tmp_path / "hf", "llama"), tmp_path / "q4", q_bits=4, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    tokens = engine_greedy(out, prompts(4, (6,)), steps=4)[0]
    assert len(tokens) == 4 and all(0 <= t < VOCAB for t in tokens)
    assert tokens == mlx_lm_greedy(out, prompts(4, (6,))[0], 4)


def test_convert_refuses_an_existing_folder_and_bad_bits(tmp_path: Path) -> None:
    (tmp_path / "there").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        convert(tmp_path / "src", tmp_path / "there")
    with pytest.raises(ValueError, match="--q-bits"):
        convert(tmp_path / "src", tmp_path / "new", q_bits=7)


def test_layers_with_other_state_are_refused() -> None:
    from mlx_lm.models.cache import ArraysCache, KVCache

    class Hybrid:  # what a recurrent/hybrid mlx-lm model's make_cache returns
        layers = [0, 1]

        def make_cache(self):
            return [KVCache(), ArraysCache(size=2)]

    with pytest.raises(ValueError, match="layer 1 keeps a ArraysCache"):
        layer_windows(Hybrid())


def test_cpu_dtype_is_not_float32_off_x86() -> None:
    assert default_dtype("cpu", "aarch64") == "bfloat16"  # Linux arm64
    assert default_dtype("cpu", "arm64") == "bfloat16"  # a Mac without MLX
    assert default_dtype("cpu", "x86_64") == "float32"  # the x86-64 kernels' activations
    assert default_dtype("cuda", "x86_64") == "bfloat16"


def test_backend_choice() -> None:
    assert resolve_backend("auto", apple_silicon=True, mlx_installed=True) == "mlx"
    assert resolve_backend("auto", apple_silicon=True, mlx_installed=False) == "torch"
    assert resolve_backend("auto", apple_silicon=False, mlx_installed=True) == "torch"
    assert resolve_backend("torch", apple_silicon=True, mlx_installed=True) == "torch"
    assert resolve_backend("mlx", apple_silicon=False, mlx_installed=True) == "mlx"
    with pytest.raises(ValueError, match=r'pip install "pensieve\[mlx\]"'):
        resolve_backend("mlx", apple_silicon=True, mlx_installed=False)
    with pytest.raises(ValueError, match="--backend must be one of"):
        resolve_backend("metal")
