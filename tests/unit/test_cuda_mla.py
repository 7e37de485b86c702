"""Latent (MLA) attention on the batched kernel (``backends/cuda_mla.py``) equals the model's own
per-sequence absorbed path (``MLAttention`` without a backend).

One latent-attention layer (tiny GLM-4.7-Flash-shaped dims: 4 heads with a power-of-two latent,
and 20 heads — a decode token's heads in one 32-row tile, a chunk's (token, head) rows across
tiles — with a latent of 24, padded in the kernel) runs a step of decodes of different lengths,
short chunks over a cached context, a short cold prompt (the kernel's since issue 15), a cold
one past ``COLD_TOKENS`` and a chunk too long for the kernel,
sequences in shuffled blocks of a pool, several blocks each, split-K over the context. Every
cache slot outside the sequences' contexts holds NaN: a read past a context, or of a block
not in a table, would come out NaN. Then the engine: a tiny GLM-4.7-Flash config's greedy
tokens with the kernel equal those without it, a follow-up turn served from the prefix cache.

Under the Triton interpreter on the CPU (tiny shapes); compiled where there is a GPU (this file
is among ``bench/gpu_tests.sh``'s).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PAGE, POOL = 4, 160
# (cached, new) per sequence; the kernel takes decodes, chunks of ≤ CHUNK_TOKENS (256) tokens
# over a context at least twice as long and cold prompts of ≤ COLD_TOKENS (64): all but the
# 65-token cold prompt (0, 65); with the limit at 16 (``SHORT``) the 17-token chunk (60, 17)
# keeps the model's path too
STEPS = [(22, 1), (30, 6), (0, 7), (4, 1), (0, 1), (300, 1), (60, 17), (9, 3), (0, 65)]
TAKEN = {0, 1, 2, 3, 4, 5, 6, 7}
SHORT = 16


def _layer(heads: int, rank: int):  # noqa: ANN202
    from pensieve.models.args import MLAArgs, ModelArgs, MoEArgs
    from pensieve.models.deepseek_mla import MLAttention, softmax_scale

    mla = MLAArgs(q_lora_rank=24, kv_lora_rank=rank, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=12, softmax_scale=softmax_scale(24, None))
    args = ModelArgs(architecture="glm4_moe_lite", vocab_size=8, hidden_size=32,
                     intermediate_size=8, num_layers=1, num_heads=heads, num_kv_heads=1,
                     head_dim=rank + 8, mla=mla, moe=MoEArgs(4, 1, 8))
    torch.manual_seed(heads)
    module = MLAttention(args, 0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return module.eval(), args


def _step(g: torch.Generator):
    """The sequences in shuffled blocks of the pool, their new tokens' slots, positions."""
    from pensieve.models.forward_context import SequenceSlice

    perm = torch.randperm(POOL, generator=g).tolist()
    used = start = 0
    seqs, slots = [], []
    for cached, new in STEPS:
        end = cached + new
        table = perm[used:used + -(-end // PAGE)]
        used += len(table)
        slots.extend(table[p // PAGE] * PAGE + p % PAGE for p in range(cached, end))
        seqs.append(SequenceSlice(start, new, end, torch.tensor(table)))
        start += new
    positions = torch.cat([torch.arange(c, c + n) for c, n in STEPS])
    return seqs, torch.tensor(slots), positions


def _cache(seqs, rank: int, g: torch.Generator) -> torch.Tensor:  # noqa: ANN001
    """Random latents where a context is cached, NaN everywhere else (the new tokens' slots are
    written by the layer before it attends)."""
    cache = torch.full((POOL + 1, PAGE, 1, rank + 8), float("nan"))
    flat = cache.view(-1, rank + 8)
    for s in seqs:
        held = torch.tensor([int(s.block_table[p // PAGE]) * PAGE + p % PAGE
                             for p in range(s.context_len)])
        flat[held] = torch.randn(len(held), rank + 8, generator=g)
    return cache


def check(device: str, dtype: torch.dtype, tol: float) -> None:
    from pensieve.backends import cuda_hybrid, cuda_mla
    from pensieve.models.forward_context import ForwardContext
    from pensieve.models.rope import RotaryEmbedding

    calls: list[int] = []
    real = cuda_hybrid.latent_attention
    cuda_hybrid.latent_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    for heads, rank, sms in ((4, 16, 1), (20, 24, 64)):
        g = torch.Generator().manual_seed(heads)
        module, args = _layer(heads, rank)
        module.to(device, dtype)
        seqs, slots, positions = _step(g)
        seqs = [replace(s, block_table=s.block_table.to(device)) for s in seqs]
        slots = slots.to(device)
        cache = _cache(seqs, rank, g).to(device, dtype)
        cos_sin = tuple(c.to(device, dtype) for c in RotaryEmbedding(  # tables on the CPU
            8, 512, 1000.0, None).lookup(positions))
        x = torch.randn(len(positions), args.hidden_size, generator=g).to(device, dtype)
        v = torch.empty(POOL + 1, PAGE, 1, 0, dtype=dtype, device=device)
        rows = torch.zeros(0, dtype=torch.long, device=device)
        ref_ctx = ForwardContext([cache.clone()], [v], slots, seqs, rows)
        with torch.no_grad():
            want = module(x, cos_sin, ref_ctx)
        builder = cuda_hybrid.CudaHybridBuilder([cache], [v], (0,), [None], PAGE,
                                                torch.device(device), num_sms=sms,
                                                latent_heads=heads)
        assert builder.latent == {0} and not builder.kernels
        backend = builder.build((0,), [seqs], [slots])
        served, _ = backend.latent_rows(0)
        assert served == TAKEN
        batch = backend.groups[0].latent
        assert (batch.num_splits > 1) == (sms == 64), batch.num_splits  # split-K: the 301 keys
        with torch.no_grad():
            got = module(x, cos_sin, replace(ref_ctx, k_caches=[cache], attention=backend))
        assert torch.isfinite(got).all()
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err < tol, (heads, err)
        for s in (seqs[2], seqs[8]):  # a cold prompt's rows (kernel, loop): the same numbers
            r = slice(s.query_start, s.query_start + s.query_len)
            assert torch.allclose(got[r].float(), want[r].float(), atol=tol, rtol=tol)
        assert cuda_mla.block_m(heads) == (16 if heads == 4 else 32)
    cuda_hybrid.latent_attention = real
    assert len(calls) == 2, calls


@pytest.mark.slow
def test_latent_kernel_equals_the_models_path_in_the_triton_interpreter():
    run_in_triton_interpreter("import torch; from tests.unit.test_cuda_mla import check; "
                              "check('cpu', torch.float32, 1e-5); print('ok')")


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_compiled_latent_kernel_equals_the_models_path(dtype, tol):
    check("cuda", dtype, tol)


def test_latent_metadata_from_the_sequences():
    """The chosen sequences, their rows of the flat batch, each row's causal key count, the
    tiles of (token, head) rows (never across sequences), padded tables (host logic)."""
    from pensieve.backends import cuda_mla
    from pensieve.backends.cuda_mla import build_latent, enabled, latent_layers

    seqs, _, _ = _step(torch.Generator().manual_seed(3))
    assert build_latent(seqs, 20, torch.device("cpu"), num_sms=4).sequences == TAKEN
    default, cuda_mla.CHUNK_TOKENS = cuda_mla.CHUNK_TOKENS, SHORT
    try:
        batch = build_latent(seqs, 20, torch.device("cpu"), num_sms=4)
    finally:
        cuda_mla.CHUNK_TOKENS = default
    assert batch.sequences == TAKEN - {6}
    # rows: seq 0 (row 0), seq 1 (1-6), seq 2 (7-13, the cold prompt: keys 1..7, causal over
    # its own), seq 3 (14), seq 4 (15), seq 5 (16), seq 7 (34-36); seq 8 (0, 65) is not taken
    assert torch.equal(batch.rows, torch.tensor(list(range(17)) + [34, 35, 36]))
    assert batch.token_ctx.tolist() == [23, 31, 32, 33, 34, 35, 36, 1, 2, 3, 4, 5, 6, 7,
                                        5, 1, 301, 10, 11, 12]
    tiles = list(zip(batch.tile_seq.tolist(), batch.tile_lo.tolist(), batch.tile_hi.tolist()))
    # 20 heads a token, 32 rows a tile: seq 1's 6 tokens are flat rows 20-140 → 4 tiles
    assert tiles == [(0, 0, 20), (1, 20, 52), (1, 52, 84), (1, 84, 116), (1, 116, 140),
                     (2, 140, 172), (2, 172, 204), (2, 204, 236), (2, 236, 268),
                     (2, 268, 280), (3, 280, 300), (4, 300, 320), (5, 320, 340),
                     (6, 340, 372), (6, 372, 400)]
    chosen = sorted(TAKEN - {6})
    for k, i in enumerate(chosen):
        t = seqs[i].block_table
        assert torch.equal(batch.block_tables[k, :len(t)], t.int())
        assert (batch.block_tables[k, len(t):] == t[-1]).all()
    assert batch.block_tables.shape == (len(chosen), 76)  # the 301-token context's blocks
    assert build_latent([seqs[8]], 20, torch.device("cpu"), 4) is None
    latent = torch.empty(2, PAGE, 1, 24), torch.empty(2, PAGE, 1, 0)
    plain = torch.empty(2, PAGE, 2, 16), torch.empty(2, PAGE, 2, 16)
    assert latent_layers([latent[0], plain[0], latent[0]], [latent[1], plain[1], latent[1]],
                         (0, 0, None)) == {0}
    assert enabled({}) and not enabled({"PENSIEVE_LATENT_KERNEL": "0"})


def test_a_follow_up_turns_chunk_takes_the_kernel():
    """GLM-4.7-Flash's Claude Code turn 2 (64 new tokens over 20384 cached), chunks up to 256
    tokens over a context twice as long and cold prompts up to 64 tokens go to the kernel (a
    step of several short prompts then attends in one launch a layer, not a loop over them); a
    longer cold prompt, a 257-token chunk or one over too short a context keep the model's own
    path."""
    from pensieve.backends.cuda_mla import build_latent, takes
    from pensieve.models.forward_context import SequenceSlice

    def seq(cached: int, new: int) -> SequenceSlice:
        return SequenceSlice(0, new, cached + new, torch.arange(-(-(cached + new) // PAGE)))

    assert takes(seq(20384, 64)) and takes(seq(256, 256)) and takes(seq(17392, 82))
    assert takes(seq(0, 64)) and takes(seq(0, 2)) and takes(seq(0, 1))
    assert not takes(seq(255, 256)) and not takes(seq(20000, 257)) and not takes(seq(0, 65))
    assert not takes(seq(1, 64))  # a chunk over too short a cached context: not cold either
    batch = build_latent([seq(2048, 64)], 20, torch.device("cpu"), num_sms=132)
    assert batch.sequences == {0} and batch.rows == slice(0, 64)
    assert batch.token_ctx.tolist() == list(range(2049, 2049 + 64))  # causal within the chunk
    assert batch.tile_seq.numel() == 64 * 20 // 32 and batch.num_splits > 1  # fills the GPU


def test_a_latent_wider_than_the_kernel_takes_keeps_the_models_path():
    """rank 520 > 512: the backend declines (no kernel launch), every row on the loop."""
    from pensieve.backends import cuda_hybrid
    from pensieve.backends.cuda_mla import fits
    from pensieve.models.forward_context import ForwardContext
    from pensieve.models.rope import RotaryEmbedding

    assert fits(512, 576) and not fits(520, 528) and not fits(512, 512 + 256)
    g = torch.Generator().manual_seed(5)
    module, args = _layer(4, 520)
    seqs, slots, positions = _step(g)
    cache = _cache(seqs, 520, g)
    v = torch.empty(POOL + 1, PAGE, 1, 0)
    cos_sin = RotaryEmbedding(8, 512, 1000.0, None).lookup(positions)
    x = torch.randn(len(positions), args.hidden_size, generator=g)
    ctx = ForwardContext([cache.clone()], [v], slots, seqs, torch.zeros(0, dtype=torch.long))
    builder = cuda_hybrid.CudaHybridBuilder([cache], [v], (0,), [None], PAGE,
                                            torch.device("cpu"), num_sms=4, latent_heads=4)
    assert builder.latent == {0}  # the cache is a latent: asked, then declined
    backend = builder.build((0,), [seqs], [slots])
    with torch.no_grad():
        want = module(x, cos_sin, ctx)
        got = module(x, cos_sin, replace(ctx, k_caches=[cache], attention=backend))
    assert torch.equal(got, want)


def test_the_kernel_serves_only_a_model_that_declares_it():
    """The MLA families declare it and the hybrid runner keeps that one path on; a builder not
    given the model's heads (a model that did not declare it) serves no latent rows."""
    from pensieve.backends.cuda_hybrid import CudaHybridBuilder
    from pensieve.backends.torch_backend import build_model, torch_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.models.family import FastPaths
    from pensieve.models.registry import family
    from tests.unit.test_mla_families import config

    for name in ("glm4_moe_lite", "deepseek_v3"):
        fam = family(name)
        args = fam.args_from_hf(config(name).to_dict())
        assert fam.fast_paths(args, 64).cuda_latent_attention
    ckpt = _glm_lite()
    cfg = EngineConfig(device="cpu", dtype=torch.float32, context_length=256, block_size=16,
                       max_num_seqs=2, num_kv_blocks=16)
    runner = torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg).runner
    assert runner.hybrid is not None and runner.cuda_hybrid is None  # CPU: no kernels
    # the latent kernel and the fused blocks (switched at a CUDA build) stay declared
    assert runner.fast == FastPaths(cuda_latent_attention=True, cuda_fused_layers=True)
    seqs, slots, _ = _step(torch.Generator().manual_seed(3))
    cache = torch.empty(POOL + 1, PAGE, 1, 24), torch.empty(POOL + 1, PAGE, 1, 0)
    undeclared = CudaHybridBuilder([cache[0]], [cache[1]], (0,), [None], PAGE,
                                   torch.device("cpu"), num_sms=4)
    assert not undeclared.latent
    assert undeclared.build((0,), [seqs], [slots]).latent_rows(0) is None


def _glm_lite():  # noqa: ANN202
    import tempfile
    from pathlib import Path

    import transformers

    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.tiny_families import VOCAB, save_hf
    from tests.helpers.tiny_moe import moe_model

    return load_checkpoint(save_hf(Path(tempfile.mkdtemp()) / "hf", moe_model(
        transformers.Glm4MoeLiteConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=20, num_key_value_heads=20, max_position_embeddings=1024,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=1.8,
            norm_topk_prob=True, tie_word_embeddings=False, q_lora_rank=24,
            rope_interleave=True, rope_parameters={"rope_type": "default", "rope_theta": 1000.0}))))


def engine_tokens(device: str, kernel: bool, ckpt=None,  # noqa: ANN001
                  graphs: bool = False) -> tuple[list[list[int]], int]:
    """Two requests at once, then a follow-up sharing the first's prompt, greedy, through the
    engine; on the CPU ``kernel`` installs the builder the CUDA runner would (the interpreter
    runs its kernel), on CUDA it is the runner's own (``PENSIEVE_LATENT_KERNEL``). Returns the
    tokens and the kernel's calls."""
    import os

    from pensieve.backends import cuda_hybrid, cuda_hybrid_graphs, cuda_mla
    from pensieve.backends.torch_backend import build_model, torch_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.types import SamplingParams

    ckpt = ckpt or _glm_lite()
    cfg = EngineConfig(device=device, dtype=torch.float32, context_length=1024, block_size=16,
                       max_num_seqs=4, max_num_batched_tokens=128, num_kv_blocks=64)
    os.environ[cuda_mla.ENV_SWITCH] = "1" if kernel else "0"
    # graphs off unless asked: a captured decode step replays without calling the kernel's
    # Python entry, so only eager steps are counted below
    os.environ[cuda_hybrid_graphs.ENV_SWITCH] = "1" if graphs else "0"
    engine = torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg)
    r = engine.runner
    assert (r.hybrid_graphs is not None) == (graphs and kernel and device == "cuda")
    if device == "cpu" and kernel:  # what ModelRunner._init_hybrid builds on CUDA
        r.cuda_hybrid = cuda_hybrid.CudaHybridBuilder(
            r.k_caches, r.v_caches, r.hybrid.layer_group, [g.window for g in r.cache_plan.paged],
            r.block_size, torch.device("cpu"), 4, latent_heads=ckpt.args.num_heads)
    assert (r.cuda_hybrid is not None and bool(r.cuda_hybrid.latent)) == kernel
    calls: list[int] = []
    real = cuda_hybrid.latent_attention
    cuda_hybrid.latent_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    gen = torch.Generator().manual_seed(2)
    first = torch.randint(3, 250, (70,), generator=gen).tolist()
    other = torch.randint(3, 250, (40,), generator=gen).tolist()
    follow = first + torch.randint(3, 250, (5,), generator=gen).tolist()
    out = []
    try:
        for batch in ((("a", first), ("b", other)), (("c", follow),)):
            got: dict[str, list[int]] = {rid: [] for rid, _ in batch}
            for rid, ids in batch:
                engine.add_request(rid, ids, SamplingParams(
                    max_tokens=5, temperature=0.0, ignore_eos=True, retain_prefix=True))
            last = None
            while engine.has_work():
                for d in engine.step():
                    got[d.request_id].extend(d.token_ids)
                    last = d
            out.extend(got.values())
        assert last.num_cached_tokens >= 64, last.num_cached_tokens  # the follow-up hit
    finally:
        cuda_hybrid.latent_attention = real
        os.environ.pop(cuda_mla.ENV_SWITCH, None)
        os.environ.pop(cuda_hybrid_graphs.ENV_SWITCH, None)
    if r.hybrid_graphs is not None:
        assert r.hybrid_graphs.replays > 0  # the decode steps ran as the captured graphs
    return out, len(calls)


def engine_check(device: str) -> None:
    ckpt = _glm_lite()
    want, none = engine_tokens(device, kernel=False, ckpt=ckpt)
    got, calls = engine_tokens(device, kernel=True, ckpt=ckpt)
    assert none == 0 and got == want, (got, want)
    # 2 layers × the decode steps (4 with both a and b, 4 for c) and c's 5-token follow-up chunk
    assert calls >= 2 * 8, calls
    if device == "cuda":  # the served default: the kernel inside the hybrid decode graphs
        graphed, _ = engine_tokens(device, kernel=True, ckpt=ckpt, graphs=True)
        assert graphed == want, (graphed, want)


@pytest.mark.slow
def test_glm_lite_engine_on_the_latent_kernel_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_mla import engine_check; "
                              "engine_check('cpu'); print('ok')")


@needs_cuda
def test_glm_lite_engine_greedy_tokens_with_the_kernel_equal_without():
    engine_check("cuda")


def test_the_kernels_metadata_arrays_start_16_byte_aligned():
    """Whatever a step's token and tile counts, each int32 array ``latent_partial`` reads starts
    on 16 bytes (Triton would compile another specialisation for an unaligned one)."""
    from pensieve.backends.cuda_mla import build_latent
    from pensieve.models.forward_context import SequenceSlice

    for new in (1, 3, 5, 64, 82, 120):
        seqs = [SequenceSlice(0, new, 300 + new, torch.arange(-(-(300 + new) // PAGE)))]
        batch = build_latent(seqs, 20, torch.device("cpu"), num_sms=132)
        for t in (batch.token_ctx, batch.tile_seq, batch.tile_lo, batch.tile_hi):
            assert t.data_ptr() % 16 == 0 and t.dtype == torch.int32, new
        assert batch.token_ctx.numel() == new
        assert batch.tile_hi[-1].item() == new * 20 and batch.tile_lo[0].item() == 0
        assert (batch.tile_hi - batch.tile_lo).max().item() <= 32
