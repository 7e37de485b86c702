"""Hybrid families on CUDA take the batched attention kernels (``backends/cuda_hybrid.py``), and
their greedy tokens equal the per-sequence loop's (``PENSIEVE_HYBRID_KERNELS=0``).

Each tiny family of ``test_cuda_hybrid.py`` (float32, random weights) runs a 150-token prompt
and a follow-up sharing it (a prefix hit: the windowed groups' freed blocks, the recurrent
state checkpoints) through the real engine, once on the kernels and once on the loop. The
kernel calls are counted: every attention layer's decode rows go through the Triton decode
kernel (gpt-oss with its window and sinks, Gemma 4's windows); no layer the kernels take falls
back; GLM-4.7-Flash's latent layers take none of these (``cuda_mla``'s kernel instead:
``test_cuda_mla.py``). Skips without CUDA.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
transformers = pytest.importorskip("transformers")

from pensieve.backends import cuda_hybrid  # noqa: E402
from tests.unit.test_cuda_hybrid import FAMILIES as HYBRID, _engine, _run  # noqa: E402


def _gemma3(tmp):  # noqa: ANN001, ANN202 - windows of 32 (3 of 4 layers), query scale, 32 dims
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.tiny_families import VOCAB, hf_model, save_hf

    return load_checkpoint(save_hf(tmp / "hf", hf_model(transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, head_dim=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"], sliding_window=32, query_pre_attn_scalar=24))))


FAMILIES = {**HYBRID, "gemma3": _gemma3}
# attention layers the kernels serve in each tiny config (KV-shared and latent layers: none)
KERNEL_LAYERS = {"qwen3_5": {1, 3}, "qwen3_next": {1, 3}, "gpt_oss": {0, 1, 2},
                 "gemma4": {0, 1, 2}, "glm4_moe_lite": set(), "gemma3": {0, 1, 2, 3}}


def _count(monkeypatch: pytest.MonkeyPatch, calls: Counter) -> None:
    for name in ("paged_decode", "paged_chunk", "prefill_attention", "attend_cached",
                 "per_sequence"):
        real = getattr(cuda_hybrid, name)

        def counted(*args, _real=real, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cuda_hybrid, name, counted)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hybrid_family_takes_the_kernels_with_the_loops_tokens(tmp_path, monkeypatch, name):
    if name in ("qwen3_5", "qwen3_next") and not hasattr(transformers, "Qwen3_5Config"):
        pytest.skip("this transformers lacks Qwen3.5")
    ckpt = FAMILIES[name](tmp_path)
    gen = torch.Generator().manual_seed(2)
    vocab = min(ckpt.args.vocab_size, 250)
    prompt = torch.randint(3, vocab, (150,), generator=gen).tolist()
    follow = prompt + torch.randint(3, vocab, (20,), generator=gen).tolist()

    monkeypatch.setenv(cuda_hybrid.ENV_SWITCH, "0")
    loop = _engine(ckpt, "cuda")
    assert loop.runner.cuda_hybrid is None
    loop_tokens = [_run(loop, "a", prompt)[0], _run(loop, "b", follow)[0]]

    monkeypatch.delenv(cuda_hybrid.ENV_SWITCH)
    calls: Counter = Counter()
    _count(monkeypatch, calls)
    fast = _engine(ckpt, "cuda")
    assert fast.runner.cuda_hybrid is not None
    assert fast.runner.cuda_hybrid.kernels == KERNEL_LAYERS[name]
    first, _ = _run(fast, "a", prompt)
    second, last = _run(fast, "b", follow)
    assert last.num_cached_tokens >= 128, last.num_cached_tokens
    assert [first, second] == loop_tokens

    layers = len(KERNEL_LAYERS[name])
    # 2 × (NEW - 1) decode steps, each layer the kernels take once a step
    assert calls["paged_decode"] >= 2 * 11 * layers, calls
    assert calls["per_sequence"] == 0, calls  # no layer the kernels take fell back
    if layers:
        assert calls["prefill_attention"] + calls["paged_chunk"] > 0, calls
