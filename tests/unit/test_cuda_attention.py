"""CUDA attention over the paged cache and the CUDA engine path, against CPU references.

Skipped where there is no GPU (CI). On a GPU: the Triton decode kernel and the varlen prefill
match a float64 reference on scattered pages; a tiny random Llama on CUDA (eager batches and
CUDA graphs) gives the CPU engine's logits and greedy tokens, with prefix-cache hits,
chunked prefill and mixed decode/prefill steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from pensieve.engine.config import EngineConfig
from pensieve.backends.torch_backend import torch_engine
from pensieve.engine.types import SamplingParams
from tests.helpers.tiny_engine import ByteTokenizer, tiny_args, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def _scattered_cache(lens, hk, d, bs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // bs) for n in lens) + 7
    k = torch.randn(num_blocks, bs, hk, d, generator=g)
    v = torch.randn(num_blocks, bs, hk, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        nb = -(-n // bs)
        tables.append(perm[used:used + nb])
        used += nb
    return k.to(CUDA, dtype), v.to(CUDA, dtype), tables


def _reference(q, k_cache, v_cache, table, ctx):
    """float64 attention of q [L, Hq, D] (the last L of ctx tokens) over the sequence's pages."""
    hk, d = k_cache.shape[2], k_cache.shape[3]
    idx = torch.tensor(table, device=k_cache.device)
    k = k_cache[idx].reshape(-1, hk, d)[:ctx].double().cpu()
    v = v_cache[idx].reshape(-1, hk, d)[:ctx].double().cpu()
    group = q.shape[1] // hk
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("lhd,shd->hls", q.double().cpu(), k) / math.sqrt(d)
    ql = q.shape[0]
    rows = torch.arange(ql).unsqueeze(1) + (ctx - ql)
    s = s.masked_fill(torch.arange(ctx).unsqueeze(0) > rows, float("-inf"))
    return torch.einsum("hls,shd->lhd", s.softmax(-1), v)


def _rel(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hk,d,bs", [(32, 8, 128, 16), (9, 3, 64, 16), (4, 2, 16, 4)])
def test_decode_kernel_matches_reference(dtype, tol, hq, hk, d, bs):
    from pensieve.backends.cuda_attention import DecodeBatch, paged_decode

    lens = [1, 7, 16, 17, 300, 2049]
    k, v, tables = _scattered_cache(lens, hk, d, bs, dtype)
    width = max(len(t) for t in tables) + 3
    bt = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    q = torch.randn(len(lens), hq, d, device=CUDA, dtype=dtype)
    for splits in (1, 4, 32):
        meta = DecodeBatch(bt.to(CUDA), torch.tensor(lens, dtype=torch.int32, device=CUDA), splits)
        out = torch.full_like(q, float("nan"))
        out.copy_(paged_decode(q, k, v, meta))
        for i, n in enumerate(lens):
            assert _rel(out[i:i + 1], _reference(q[i:i + 1], k, v, tables[i], n)) < tol


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prefill_with_cached_prefix_matches_reference(dtype, tol):
    from pensieve.backends.cuda_attention import PrefillBatch, prefill_attention
    from pensieve.backends.cuda_batch import block_slots

    hq, hk, d, bs = 32, 8, 128, 16
    q_lens, k_lens = [5, 300, 64, 1000], [5, 333, 1000, 1000]  # cold, cached prefix, both
    k, v, tables = _scattered_cache(k_lens, hk, d, bs, dtype, seed=1)
    slots = torch.cat([torch.from_numpy(block_slots(t, bs, n)) for t, n in zip(tables, k_lens)])
    cu = lambda xs: torch.tensor([0] + list(torch.tensor(xs).cumsum(0)), dtype=torch.int32)  # noqa: E731
    meta = PrefillBatch(cu(q_lens).to(CUDA), cu(k_lens).to(CUDA), slots.to(CUDA),
                        max(q_lens), max(k_lens), tuple(q_lens), tuple(k_lens))
    q = torch.randn(sum(q_lens), hq, d, device=CUDA, dtype=dtype)
    out = prefill_attention(q, k, v, meta)
    start = 0
    for t, ql, kl in zip(tables, q_lens, k_lens):
        assert _rel(out[start:start + ql], _reference(q[start:start + ql], k, v, t, kl)) < tol
        start += ql


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hk,d,bs", [(32, 8, 128, 16), (9, 3, 64, 16), (4, 2, 16, 4)])
def test_short_chunk_kernel_matches_reference(dtype, tol, hq, hk, d, bs):
    from pensieve.backends.cuda_attention import ChunkBatch, paged_chunk

    k, v, tables = _scattered_cache([3000], hk, d, bs, dtype, seed=2)
    table = torch.tensor(tables[0], dtype=torch.int32, device=CUDA)
    for start, n, rows, splits in [(0, 5, 16, 1), (37, 13, 16, 3), (2900, 64, 64, 8), (7, 1, 16, 2)]:
        q = torch.randn(rows, hq, d, device=CUDA, dtype=dtype)
        meta = ChunkBatch(table, torch.tensor([start], dtype=torch.int32, device=CUDA),
                          torch.tensor([n], dtype=torch.int32, device=CUDA), splits)
        out = paged_chunk(q, k, v, meta)
        assert _rel(out[:n], _reference(q[:n], k, v, tables[0], start + n)) < tol


PREFIX = "You are a careful assistant with tools. " * 4


def _run(engine, prompts, staggered):
    """Greedy tokens per request and the logits of every step."""
    tok, params = ByteTokenizer(), SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    logits, out = [], {rid: [] for rid in prompts}
    inner = engine.runner.run

    def run(chunks, *carry):  # keep the logits on the device: async steps sample there
        result = inner(chunks, *carry)
        logits.append(result.float().cpu())
        return result

    engine.runner.run = run
    pending = list(prompts.items())
    step = 0
    while pending or engine.has_work():
        if pending and (not staggered or step % 3 == 0):
            rid, text = pending.pop(0)
            engine.add_request(rid, tok.encode(text), params)
            if not staggered:
                continue
        for delta in engine.step():
            out[delta.request_id].extend(delta.token_ids)
        step += 1
    return out, logits


def _engine(device, dtype, graphs=True, **overrides):
    cfg = dict(context_length=512, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
               device=device, dtype=dtype)
    cfg.update(overrides)
    model = tiny_model().to(device=device, dtype=dtype)
    engine = torch_engine(model, tiny_args(), ByteTokenizer(), EngineConfig(**cfg))
    if not graphs:
        engine.runner.graphs = engine.runner.chunk_graphs = None
    return engine


@needs_cuda
@pytest.mark.parametrize("staggered", [False, True])
@pytest.mark.parametrize("budget", [64, 7])
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("overlap", [True, False])
def test_cuda_engine_matches_cpu(staggered, budget, graphs, overlap):
    """CPU synchronous steps against CUDA steps with async scheduling on (the CUDA default:
    decode graphs take their ids from the previous step's device tensor) and off."""
    prompts = {f"r{i}": PREFIX + f"question {i} " * (i + 1) for i in range(6)}
    cpu_tokens, cpu_logits = _run(_engine("cpu", torch.float32, max_num_batched_tokens=budget),
                                  prompts, staggered)
    gpu = _engine("cuda", torch.float32, graphs, max_num_batched_tokens=budget,
                  async_scheduling=overlap)
    carried = []
    inner = gpu.runner.run
    gpu.runner.run = lambda chunks, *carry: carried.append(bool(carry)) or inner(chunks, *carry)
    gpu_tokens, gpu_logits = _run(gpu, prompts, staggered)
    assert any(carried) == (overlap and graphs)
    assert gpu_tokens == cpu_tokens
    assert len(gpu_logits) == len(cpu_logits)
    for a, b in zip(cpu_logits, gpu_logits):
        assert a.shape == b.shape
        if a.numel():  # a step of prefill chunks that complete nothing samples nothing
            assert (a - b).abs().max().item() < 1e-3 * max(1.0, a.abs().max().item())
    if graphs:
        assert gpu.runner.graphs.replays > 0
        if staggered:  # prompts arriving while others decode joined graph steps
            assert gpu.runner.graphs.mixed_replays > 0
    assert gpu.pool.num_free == gpu.pool.num_blocks


@needs_cuda
def test_cuda_bf16_close_to_cpu_float32():
    prompts = {f"r{i}": PREFIX + f"q{i}" for i in range(3)}
    _, cpu_logits = _run(_engine("cpu", torch.float32), prompts, False)
    gpu = _engine("cuda", torch.bfloat16)
    _, gpu_logits = _run(gpu, prompts, False)
    # the first step that samples (prefill of the first prompts) sees the same inputs
    a, b = next((a, b) for a, b in zip(cpu_logits, gpu_logits) if a.numel())
    assert a.shape == b.shape
    assert ((a - b).norm() / a.norm()).item() < 3e-2
    assert gpu.runner.graphs.replays > 0


@needs_cuda
def test_short_chunk_graphs_match_eager_bf16():
    """A follow-up over a long cached prefix runs as a chunk graph, a short prompt joins a
    decode graph; both as eager steps would."""
    long_prefix = PREFIX * 2  # > MAX_PREFILL_CONTEXT tokens: its follow-up cannot join decode graphs
    prompts = [long_prefix + "first question", long_prefix + "second question?", "short one"]

    def run_one_by_one(engine):
        out, logits = [], []
        for i, text in enumerate(prompts):
            tokens, step_logits = _run(engine, {f"r{i}": text}, False)
            engine.runner.run = type(engine.runner).run.__get__(engine.runner)
            out.append(tokens[f"r{i}"])
            logits += step_logits
        return out, logits

    graphed = _engine("cuda", torch.bfloat16)
    tokens, logits = run_one_by_one(graphed)
    eager_tokens, eager_logits = run_one_by_one(_engine("cuda", torch.bfloat16, graphs=False))
    assert graphed.runner.chunk_graphs.replays >= 1  # the follow-up
    assert graphed.runner.graphs.mixed_replays >= 1  # the short prompt
    assert tokens == eager_tokens
    for a, b in zip(logits, eager_logits):
        if a.numel():
            assert ((a - b).norm() / a.norm()).item() < 1e-2


def test_graph_buckets_cover_max_num_seqs():
    from pensieve.backends.cuda_graph_runner import bucket_sizes

    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
