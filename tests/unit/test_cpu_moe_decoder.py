"""MoE layers on the one-call CPU decoder (``moe_decoder.py``, ``moe_layer_source.py``).

The C router against ``models.moe.Router`` (the same picks in the same order, ties included;
weights to float32 rounding), and a tiny Qwen3-MoE GGUF decoded by the engine on the one-call
path against the module path (``PENSIEVE_CPU_MOE_DECODER=0``): logits within a stated
tolerance (the router's logits are dot products that round differently from PyTorch's matmul),
the same greedy tokens, one and two sequences at once.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from pensieve.backends.cpu_quant import load_kernels
from pensieve.backends.cpu_quant.moe_decoder import MoeWeights
from pensieve.backends.torch_backend import build_model, torch_engine
from pensieve.engine.config import EngineConfig
from pensieve.engine.types import SamplingParams
from pensieve.loaders.registry import load_checkpoint
from pensieve.models.args import ModelArgs, MoEArgs
from pensieve.models.moe import Router, moe_paths
from tests.helpers.paged_run import BLOCK, prompt
from tests.helpers.tiny_families import VOCAB

transformers = pytest.importorskip("transformers")

from tests.helpers.tiny_moe import moe_model, write_moe_gguf  # noqa: E402
from tests.unit.test_cpu_moe_codes import DIMS, random_blocks  # noqa: E402

KERNELS = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")

# logits of the one-call path against the module path (magnitude ~3): the router weights differ
# in their last bits (max |diff| measured 2.7e-6 at one sequence; 4e-5 at two, where the module
# path runs the rows that share an expert as one multi-row call)
LOGITS_ATOL = 1e-4


def torch_router(x: torch.Tensor, weight: torch.Tensor, k: int, norm: bool,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    args = ModelArgs(architecture="qwen3_moe", vocab_size=8, hidden_size=x.shape[1],
                     intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                     moe=MoEArgs(num_experts=weight.shape[0], top_k=k, expert_size=8,
                                 norm_topk=norm, scale=scale))
    router = Router(args)
    with torch.no_grad():
        router.weight.copy_(weight)
        return router(x)


def c_router(x: torch.Tensor, weight: torch.Tensor, k: int, norm: bool,
             scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    mw = MoeWeights(weight.data_ptr(), None, None, weight.shape[0], k, int(norm), scale)
    w, ids = torch.empty(x.shape[0], k), torch.empty(x.shape[0], k, dtype=torch.long)
    KERNELS.lib.pq_moe_route(x.data_ptr(), x.shape[0], x.shape[1], ctypes.addressof(mw),
                             w.data_ptr(), ids.data_ptr())
    return w, ids


@pytest.mark.parametrize("e,k", [(8, 2), (8, 8), (60, 4), (128, 8), (128, 1), (256, 2)])
@pytest.mark.parametrize("norm,scale", [(True, 1.0), (False, 1.0), (True, 2.5)])
def test_router_picks_what_torch_picks(e, k, norm, scale):
    g = torch.Generator().manual_seed(e * 10 + k)
    x, weight = torch.randn(16, 200, generator=g), torch.randn(e, 200, generator=g) / 10
    w, ids = c_router(x, weight, k, norm, scale)
    ref_w, ref_ids = torch_router(x, weight, k, norm, scale)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("e,k", [(8, 2), (8, 4), (8, 8), (64, 8), (128, 2), (128, 8)])
def test_router_ties_pick_what_torch_topk_picks(e, k):
    """Tied probabilities (logits from a few values: x one-hot, so the dots are exact on both
    sides): torch.topk's CPU order, whatever its sorts make of ties, in every row."""
    g = torch.Generator().manual_seed(e + k)
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    weight = torch.zeros(e, 32)
    levels = torch.tensor([0.0, 0.5, 1.0, 2.0])
    for trial in range(16):  # two or four levels: many ties, some across the k-th place
        weight[:, 0] = levels[torch.randint(0, 4 if trial % 2 else 2, (e,), generator=g)]
        w, ids = c_router(x, weight, k, True)
        ref_w, ref_ids = torch_router(x, weight, k, True)
        assert torch.equal(ids, ref_ids), (weight[:, 0].tolist(), ids, ref_ids)
        torch.testing.assert_close(w, ref_w, rtol=2e-6, atol=1e-7)
    weight[:, 0] = 0.25  # all tied
    assert torch.equal(c_router(x, weight, k, True)[1], torch_router(x, weight, k, True)[1])


def test_families_declare_the_path_where_the_router_is_softmax_without_shared_experts():
    base = dict(architecture="qwen3_moe", vocab_size=8, hidden_size=64, intermediate_size=8,
                num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64)
    plain = MoEArgs(num_experts=8, top_k=2, expert_size=8, norm_topk=True)
    assert moe_paths(ModelArgs(**base, moe=plain), 64).cpu_moe_decoder
    for moe in (MoEArgs(num_experts=8, top_k=2, expert_size=8, shared_size=8),
                MoEArgs(num_experts=8, top_k=2, expert_size=8, gating="sigmoid")):
        assert not moe_paths(ModelArgs(**base, moe=moe), 64).cpu_moe_decoder


# --- a tiny Qwen3-MoE GGUF through the engine -------------------------------------------------

CONTEXT = 64


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    from gguf import GGMLQuantizationType as Q

    model = moe_model(transformers.Qwen3MoeConfig(**DIMS))
    seeds = iter(range(100))
    return write_moe_gguf(tmp_path_factory.mktemp("moe_decoder") / "q4k.gguf", model, "qwen3moe",
                          expert_qtype=Q.Q4_K, matrix_qtype=Q.Q8_0,
                          expert_blocks=lambda shape: random_blocks(Q.Q4_K, shape, next(seeds)))


def decode(path: Path, one_call: bool, monkeypatch, prompts: list[list[int]],
           steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of each prompt (run together) and every step's logits."""
    monkeypatch.setenv("PENSIEVE_CPU_MOE_DECODER", "1" if one_call else "0")
    ckpt = load_checkpoint(path, keep_int4=True)
    model = build_model(ckpt, EngineConfig(context_length=CONTEXT))
    engine = torch_engine(model, ckpt.args, ckpt.tokenizer, EngineConfig(
        context_length=CONTEXT, block_size=BLOCK, max_num_seqs=2, max_num_batched_tokens=16))
    assert (engine.runner.cpu_decoder is not None) == one_call
    logits: list[torch.Tensor] = []
    run = engine.runner._run_cpu

    def recorded(*a, **kw):  # noqa: ANN002, ANN003
        out = run(*a, **kw)
        logits.append(out.clone())
        return out

    engine.runner._run_cpu = recorded
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for delta in engine.step():
            tokens[delta.request_id].extend(delta.token_ids)
    return list(tokens.values()), logits


@pytest.mark.parametrize("n", [1, 2])
def test_engine_one_call_matches_the_module_path(gguf_path, monkeypatch, n):
    prompts = [prompt(9 + 4 * i, VOCAB, seed=i) for i in range(n)]
    new_tokens, new_logits = decode(gguf_path, True, monkeypatch, prompts, 16)
    old_tokens, old_logits = decode(gguf_path, False, monkeypatch, prompts, 16)
    assert new_tokens == old_tokens and all(len(t) == 16 for t in new_tokens)
    assert len(new_logits) == len(old_logits)
    for a, b in zip(new_logits, old_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=LOGITS_ATOL)


def test_thread_tuner_recovers_from_slow_first_steps():
    """A server's first steps fault in its mapped weights (slow, the 2-thread ones most) and a
    step may be preempted: neither may park decode on 1 thread for long."""
    from pensieve.backends.cpu_quant.decoder import ThreadTuner

    tuner = ThreadTuner(2)
    quiet = {1: 0.040, 2: 0.026}
    early = iter([0.056, 0.045, 0.063, 0.080, 0.070, 0.060])  # 1, 1, then 2, 2 (and on)
    used = []
    for step in range(200):
        t = tuner.pick()
        used.append(t)
        tuner.record(t, next(early, None) or quiet[t], 1)
    assert used[:4] == [1, 1, 2, 2]
    assert used.index(2, 4) <= 4 + tuner.explore  # back on 2 threads by the first exploration
    assert used[40:].count(1) <= len(used[40:]) // tuner.explore + 1
    tuner.record(2, 1.0, 1)  # one step preempted for a second: counted as OUTLIER× at most
    assert tuner.per_token[2] <= 0.026 * (1 + tuner.alpha * (tuner.OUTLIER - 1)) + 1e-9
    assert tuner.pick() == 2
