"""RMSNorm and paged attention on the compiled CPU kernels against the PyTorch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pensieve.backends.cpu_quant import load_kernels
from pensieve.backends.cpu_quant.layers import CpuAttention, CpuRMSNorm, swap_norms
from pensieve.models.forward_context import ForwardContext, SequenceSlice, paged_attention
from pensieve.models.llama import RMSNorm
from pensieve.models.rope import RotaryEmbedding

KERNELS = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")


def test_rmsnorm_matches_pytorch_on_rows_views_and_batches():
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576)
    fast = CpuRMSNorm(KERNELS, norm)
    x = torch.randn(7, 3 * 576) * 3
    for inp in (x[:, :576], x[:1, 576:1152], x.view(7, 3, 576)):  # strided rows, one row, 3-D
        want = F.rms_norm(inp, (576,), norm.weight, 1e-5)
        torch.testing.assert_close(fast(inp), want, rtol=1e-5, atol=1e-6)
    assert fast(x[:, :576].double()).dtype == torch.float64  # other dtypes: PyTorch's op


def test_swap_norms_keeps_the_weights():
    model = torch.nn.Sequential(RMSNorm(64, 1e-6), torch.nn.Linear(64, 64), RMSNorm(64, 1e-6))
    first = model[0].weight
    assert swap_norms(model, KERNELS) == 2 and type(model[0]) is CpuRMSNorm
    assert model[0].weight is first


def _batch(hq: int, hk: int, d: int, block: int, gen: torch.Generator, kv_dtype: torch.dtype):
    """A step of two decoding sequences and one prefill chunk over a cached prefix, with
    the caches already holding the earlier tokens (scattered, non-contiguous blocks)."""
    num_blocks = 64
    k_cache = torch.randn(num_blocks, block, hk, d, generator=gen).to(kv_dtype)
    v_cache = torch.randn(num_blocks, block, hk, d, generator=gen).to(kv_dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    specs = [(1, 23), (5, 37), (1, 1)]  # (new tokens, context after this step)
    sequences, slots, positions, start, used = [], [], [], 0, 0
    for new, ctx_len in specs:
        n = -(-ctx_len // block)
        table = perm[used : used + n]
        used += n
        sequences.append(SequenceSlice(start, new, ctx_len, table))
        for p in range(ctx_len - new, ctx_len):
            slots.append(int(table[p // block]) * block + p % block)
            positions.append(p)
        start += new
    t = start
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen)  # views of a fused output, as the model has
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    rotary = RotaryEmbedding(d, 128, 10000.0, None)
    cos_sin = rotary.lookup(torch.tensor(positions))
    ctx = ForwardContext([k_cache], [v_cache], torch.tensor(slots), sequences, torch.tensor([0]))
    return q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d), ctx, cos_sin


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hk,d,block,threads", [(9, 3, 64, 16, 1), (6, 2, 32, 4, 2), (4, 4, 128, 8, 1)])
def test_attention_matches_the_pytorch_path(hq, hk, d, block, threads, kv_dtype):
    gen = torch.Generator().manual_seed(hq * d)
    q, k, v, ctx, cos_sin = _batch(hq, hk, d, block, gen, kv_dtype)
    ref_caches = ([ctx.k_caches[0].clone()], [ctx.v_caches[0].clone()])
    want = paged_attention(0, q.clone(), k.clone(), v.clone(),
                           ForwardContext(*ref_caches, ctx.slot_mapping, ctx.sequences, ctx.logits_indices),
                           cos_sin)
    step = CpuAttention(KERNELS, threads).step(ctx.sequences)
    assert step.num_decode == 2 and len(step.longer) == 1
    got = step(0, q, k, v, ctx, cos_sin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ctx.k_caches[0], ref_caches[0][0], rtol=1e-6, atol=1e-6)  # fp16: ≤ 1 ulp
    assert torch.equal(ctx.v_caches[0], ref_caches[1][0])


def test_attention_fits_only_float32_caches_with_head_size_a_multiple_of_16():
    cache = torch.empty(4, 16, 3, 64)
    assert CpuAttention.fits([cache], torch.float32)
    assert CpuAttention.fits([cache.half()], torch.float32)
    assert not CpuAttention.fits([cache.bfloat16()], torch.float32)
    assert not CpuAttention.fits([cache], torch.bfloat16)
    assert not CpuAttention.fits([torch.empty(4, 16, 3, 40)], torch.float32)


def _q4_tiny_engine(decoder: bool, kv_dtype: torch.dtype | None = None):
    """The tiny engine's model with every linear weight q4 (and a q8 head), as a Q4 GGUF's."""
    from pensieve.backends.quantize import int8_lm_head, swap_in
    from pensieve.engine.config import EngineConfig
    from pensieve.backends.torch_backend import torch_engine
    from pensieve.models.quant_linear import Int4Groups
    from tests.helpers.tiny_engine import ByteTokenizer, tiny_args, tiny_model

    model, gen = tiny_model(), torch.Generator().manual_seed(1)
    int4 = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            n, k = m.weight.shape
            int4[name] = Int4Groups(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen),
                                    torch.rand(n, k // 32, generator=gen) * 0.05,
                                    torch.rand(n, k // 32, generator=gen) * -0.4, 32)
    swap_in(model, int4)
    int8_lm_head(model)
    cfg = EngineConfig(context_length=512, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                       kv_dtype=kv_dtype)
    engine = torch_engine(model, tiny_args(), ByteTokenizer(), cfg)
    assert engine.runner.cpu_decoder is not None
    if not decoder:
        engine.runner.cpu_decoder = None
    return engine


@pytest.mark.parametrize("kv_dtype", [None, torch.float16])
def test_one_call_decoder_gives_the_module_path_tokens(kv_dtype):
    """Three sequences decoding side by side (prefills of different lengths first, then
    decode-only steps through ``pq_decode_layers``): the same tokens, step for step."""
    from pensieve.engine.types import SamplingParams

    outputs = []
    for decoder in (True, False):
        engine = _q4_tiny_engine(decoder, kv_dtype)
        assert engine.runner.k_caches[0].dtype == (kv_dtype or torch.float32)
        calls = []
        if decoder:  # count the kernel calls
            dec = engine.runner.cpu_decoder
            fn = dec._fn
            dec._fn = lambda *a: calls.append(1) or fn(*a)
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(["hello there", "a", "the quick brown fox jumps over"]):
            engine.add_request(str(i), list(prompt.encode()), params)
        tokens: dict[str, list[int]] = {}
        while engine.has_work():
            for d in engine.step():
                tokens.setdefault(d.request_id, []).extend(d.token_ids)
        outputs.append(tokens)
        assert not decoder or len(calls) > 30
    assert outputs[0] == outputs[1] and all(len(t) == 40 for t in outputs[0].values())


def test_thread_tuner_follows_the_faster_setting_and_keeps_exploring():
    from pensieve.backends.cpu_quant.decoder import ThreadTuner

    tuner = ThreadTuner(2, explore=4, alpha=0.5)
    cost = {1: 0.010, 2: 0.006}  # a quiet machine: 2 threads faster
    picks = []
    for _ in range(40):
        t = tuner.pick()
        picks.append(t)
        tuner.record(t, cost[t] * 3, tokens=3)
    # each setting timed twice first (the first a warm-up); 1 thread explored every 4th step
    # until it has EVIDENCE timings, then, clearly slower (1.67× > CLEAR), every 4 · 4th only
    assert picks[:4] == [1, 1, 2, 2] and picks[10:].count(1) == 4
    assert [i + 1 for i, t in enumerate(picks) if t == 1] == [1, 2, 8, 12, 16, 20, 32]
    cost = {1: 0.010, 2: 0.030}  # another job takes a core: 2 threads now slower
    picks = [t for t in (tuner.pick() for _ in range(40)) if tuner.record(t, cost[t], 1) or True]
    # switched at the second slow step (the first counts OUTLIER× the figure at most), no
    # exploring needed
    assert picks[2:7] == [1] * 5
    assert picks[-20:].count(1) == 18
    tuner = ThreadTuner(2, explore=4, alpha=0.5)
    cost = {1: 0.010, 2: 0.009}  # close: explored every 4th step
    picks = [t for t in (tuner.pick() for _ in range(40)) if tuner.record(t, cost[t], 1) or True]
    assert picks[10:].count(1) == 8
    assert ThreadTuner(1).options == [1]


def test_short_prefills_run_as_decoder_rows_with_the_module_path_logits():
    """A step of short prompts (and a chunk over a cached prefix) runs on the one-call decoder
    as one row per new token; its logits match the PyTorch module path's."""
    from pensieve.backends.model_runner import ROWS_AS_DECODE
    from pensieve.engine.types import SamplingParams

    results = []
    for decoder in (True, False):
        engine = _q4_tiny_engine(decoder)
        rows_seen, logits = [], []
        if decoder:
            dec = engine.runner.cpu_decoder
            call = dec.__call__
            engine.runner.cpu_decoder = lambda ids, *a, **k: rows_seen.append(
                (ids.shape[0], "logits_rows" in k)) or call(ids, *a, **k)
            engine.runner.cpu_decoder.can_run = dec.can_run
        run = engine.runner.run
        engine.runner.run = lambda chunks, *c: logits.append(run(chunks, *c)) or logits[-1]
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        prompts = ["hello there", "the quick brown fox", "hello there, again"]
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), list(prompt.encode()), params)
        while engine.has_work():
            engine.step()
        engine.add_request("later", list(b"hello there, again and again"), params)  # a cached prefix
        while engine.has_work():
            engine.step()
        results.append(logits)
        if decoder:  # the first step: the three prompts as rows; the follow-up's new tokens too
            n = sum(len(p) for p in prompts)
            assert rows_seen[0] == (n, True) and n <= ROWS_AS_DECODE
            assert sum(1 for r, as_rows in rows_seen if as_rows) == 2
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert a.shape == b.shape and ((a - b).norm() / b.norm()).item() < 1e-3
        assert torch.equal(a.argmax(-1), b.argmax(-1))
