"""Hybrid-cache families on CUDA (issue 15): the per-layer caches, window freeing and recurrent
state checkpoints run on the GPU as on the CPU.

Each tiny family (random weights, float32) runs through the real engine on CUDA and on the CPU:
greedy tokens agree, and a follow-up sharing a long prefix is served from the prefix cache
(recurrent layers from a state checkpoint) with the tokens of a cold CUDA engine. Skips
without CUDA (CI has none; `bench/gpu_device_run.sh` runs it on the device).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
transformers = pytest.importorskip("transformers")

from pensieve.backends.torch_backend import build_model, torch_engine  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.engine.types import SamplingParams  # noqa: E402
from pensieve.loaders.registry import load_checkpoint  # noqa: E402
from tests.helpers.tiny_hybrid_checkpoints import glm_lite, gpt_oss, qwen  # noqa: E402

BLOCK, INTERVAL, NEW = 16, 64, 12


def _gemma4(tmp: Path) -> Any:
    from tests.helpers.tiny_families import save_hf
    from tests.unit.test_gemma4 import reference

    return load_checkpoint(save_hf(tmp / "hf", reference("dense")))


FAMILIES = {"qwen3_5": qwen("qwen3_5"), "qwen3_next": qwen("qwen3_next"),
            "gpt_oss": partial(gpt_oss, window=32), "gemma4": _gemma4, "glm4_moe_lite": glm_lite}


def _engine(ckpt: Any, device: str):  # noqa: ANN202
    cfg = EngineConfig(device=device, dtype=torch.float32, context_length=4096, block_size=BLOCK,
                       max_num_seqs=4, max_num_batched_tokens=256, num_kv_blocks=256,
                       state_checkpoint_interval=INTERVAL)
    return torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg)


def _run(engine, rid: str, ids: list[int], retain: bool = True) -> tuple[list[int], Any]:  # noqa: ANN001
    engine.add_request(rid, ids, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                retain_prefix=retain))
    tokens, last = [], None
    while engine.has_work():
        for d in engine.step():
            if d.request_id == rid:
                tokens.extend(d.token_ids)
                last = d
    return tokens, last


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hybrid_family_on_cuda(tmp_path, name):
    if name in ("qwen3_5", "qwen3_next") and not hasattr(transformers, "Qwen3_5Config"):
        pytest.skip("this transformers lacks Qwen3.5")
    ckpt = FAMILIES[name](tmp_path)
    gen = torch.Generator().manual_seed(1)
    vocab = min(ckpt.args.vocab_size, 250)
    prompt = torch.randint(3, vocab, (150,), generator=gen).tolist()
    follow = prompt + torch.randint(3, vocab, (20,), generator=gen).tolist()

    cpu_tokens, _ = _run(_engine(ckpt, "cpu"), "cpu", prompt)
    gpu = _engine(ckpt, "cuda")
    gpu_tokens, _ = _run(gpu, "turn-1", prompt)
    assert gpu_tokens[0] == cpu_tokens[0]
    agree = sum(a == b for a, b in zip(gpu_tokens, cpu_tokens))
    assert agree >= 0.75 * NEW, (gpu_tokens, cpu_tokens)

    tokens, last = _run(gpu, "turn-2", follow)
    assert last.num_cached_tokens >= 128, last.num_cached_tokens  # 150 → checkpoint/blocks at 128+
    cold, cold_last = _run(_engine(ckpt, "cuda"), "cold", follow)
    assert cold_last.num_cached_tokens == 0
    assert tokens == cold
