"""The new families on CUDA: Qwen3 (per-head q/k RMSNorm), Qwen2 (q/k/v biases) and Gemma 3
(interleaved sliding windows, two RoPE bases, sandwich norms) from llama.cpp-style GGUFs,
served by ``torch_engine`` on ``device="cuda"``, give the CPU engine's greedy tokens.

float32 on CUDA must match the CPU token for token; bf16 (the served dtype, Triton attention
kernels with the window) and the int4 path (Q4_0 codes kept, ``backends/cuda_int4.py``) must
agree on the first token — a greedy run of a tiny random model may part later on a near tie.
Skips without CUDA (CI); run on the GPU machine by ``bench/gpu_device_run.sh``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from pensieve.backends.torch_backend import build_model, torch_engine  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.engine.types import SamplingParams  # noqa: E402
from pensieve.loaders.registry import load_checkpoint  # noqa: E402
from tests.helpers.tiny_families import Q, VOCAB  # noqa: E402
from tests.unit.test_families_vs_transformers import (  # noqa: E402
    BLOCK, CASES, gguf_case, prompt,
)

STEPS = 8


def greedy(path, context: int, ids: list[int], device: str, dtype: torch.dtype,
           **load) -> list[int]:
    ckpt = load_checkpoint(path, **load)
    cfg = EngineConfig(context_length=context, block_size=BLOCK, max_num_seqs=2,
                       max_num_batched_tokens=16, device=device, dtype=dtype)
    model = build_model(ckpt, cfg)
    engine = torch_engine(model, ckpt.args, ckpt.tokenizer, cfg)
    engine.add_request("r", ids, SamplingParams(max_tokens=STEPS, temperature=0.0,
                                                ignore_eos=True))
    out: list[int] = []
    while engine.has_work():
        for delta in engine.step():
            out.extend(delta.token_ids)
    assert len(out) == STEPS
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda-families")


@pytest.mark.parametrize("name", ["qwen3", "qwen2", "gemma3"])
def test_cuda_float32_greedy_equals_cpu(root, name):
    case = CASES[name]
    _, path = gguf_case(root, name)
    ids = prompt(case.seq - 8, VOCAB, seed=3)  # past gemma3's window of 8
    cpu = greedy(path, case.context, ids, "cpu", torch.float32)
    assert greedy(path, case.context, ids, "cuda", torch.float32) == cpu


@pytest.mark.parametrize("name, qtype, int4", [
    ("qwen3", Q.F32, False), ("gemma3", Q.F32, False), ("qwen3", Q.Q4_0, True),
    ("gemma3", Q.Q4_0, True),
])
def test_cuda_bf16_first_token_equals_cpu(root, name, qtype, int4):
    case = CASES[name]
    _, path = gguf_case(root, name, qtype)
    ids = prompt(case.seq - 8, VOCAB, seed=4)
    cpu = greedy(path, case.context, ids, "cpu", torch.float32)
    got = greedy(path, case.context, ids, "cuda", torch.bfloat16, keep_int4=int4)
    print(f"{name} {qtype.name} int4={int4}: cpu {cpu} cuda-bf16 {got}")
    assert got[0] == cpu[0]
