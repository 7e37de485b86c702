"""Hybrid decode steps as CUDA graphs (``backends/cuda_hybrid_graphs.py``, on by default,
``PENSIEVE_HYBRID_GRAPHS=0`` off): greedy tokens with the graphs equal those without, for a tiny
Qwen3.5-MoE (Gated DeltaNet + gated attention), gpt-oss (windows + sinks) and GLM-4.7-Flash
(latent attention), over a first turn of several requests (async scheduling chaining the graph
steps) and a follow-up turn that resumes from a state checkpoint / the prefix cache. The graphs
must have been captured and replayed. Skips without CUDA (``bench/gpu_tests.sh`` runs it).
"""

from __future__ import annotations

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
from tests.helpers.tiny_hybrid_checkpoints import FAMILIES  # noqa: E402

BLOCK, INTERVAL, STEPS = 16, 64, 12


def _engine(ckpt: Any, graphs: bool, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    monkeypatch.setenv("PENSIEVE_HYBRID_GRAPHS", "1" if graphs else "0")
    cfg = EngineConfig(device="cuda", dtype=torch.float32, context_length=1024, block_size=BLOCK,
                       max_num_seqs=4, max_num_batched_tokens=256, num_kv_blocks=256,
                       state_checkpoint_interval=INTERVAL)
    return torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg)


def _turns(engine: Any) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(3)
    long = torch.randint(3, 250, (150,), generator=gen).tolist()
    first = {"a": long, "b": torch.randint(3, 250, (20,), generator=gen).tolist(), "c": [7]}
    follow = {"d": long + torch.randint(3, 250, (9,), generator=gen).tolist()}
    out = []
    for prompts in (first, follow):
        for rid, ids in prompts.items():
            engine.add_request(rid, ids, SamplingParams(max_tokens=STEPS, temperature=0.0,
                                                        ignore_eos=True, retain_prefix=True))
        tokens: dict[str, list[int]] = {}
        last = {}
        while engine.has_work():
            for d in engine.step():
                tokens.setdefault(d.request_id, []).extend(d.token_ids)
                last[d.request_id] = d
        out.append(tokens)
    assert last["d"].num_cached_tokens >= INTERVAL, last["d"].num_cached_tokens
    return out


@pytest.mark.parametrize("family", ["qwen3_5_moe", "gpt_oss", "glm4_moe_lite"])
def test_greedy_tokens_with_hybrid_graphs_equal_eager(tmp_path: Path, family: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = FAMILIES[family](tmp_path)
    want = _turns(_engine(ckpt, False, monkeypatch))
    engine = _engine(ckpt, True, monkeypatch)
    graphs = engine.runner.hybrid_graphs
    assert graphs is not None, "the hybrid decode graphs were not captured (see the log)"
    assert _turns(engine) == want
    assert graphs.replays >= 2 * STEPS - 4, graphs.replays
