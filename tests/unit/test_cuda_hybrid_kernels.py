"""A hybrid layout's attention on the batched CUDA kernels (``backends/cuda_hybrid.py``) equals
the per-sequence loop (``paged_attention`` without a backend) for each kind of layer group:
full attention with and without gpt-oss's sinks, a sliding window with and without sinks whose
tables point freed blocks at the null block, RoPE fused (full width) and partial — decode rows
interleaved with a prefill chunk, decode-only steps, decodes first. The null block holds NaN
for the batched run: a decode row that read a freed block would come out NaN.

Under the Triton interpreter on the CPU (tiny shapes); compiled where there is a GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HQ, HK, D, PAGE, WINDOW = 4, 2, 16, 4, 8
# layer → (window, sinks, rotary dims): full; full + sinks; window + sinks; window + partial
# rotary; the first two page in group 0 (full), the others in group 1 (windowed)
LAYERS = [(None, False, D), (None, True, 0), (WINDOW, True, D), (WINDOW, False, 8)]
LAYER_GROUP = (0, 0, 1, 1)
BLOCKS = 100  # per group's pool; index BLOCKS is the null block


def _cos_sin(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (100.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = positions.double()[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), -1)[:, None, :]
    return ang.cos().float(), ang.sin().float()


def _step(steps: list[tuple[int, int]], g: torch.Generator):
    """Per sequence (cached, new): its block tables in both groups (the windowed group's
    blocks wholly before every new token's window point at the null block), slots, slices."""
    from pensieve.models.forward_context import SequenceSlice

    perm = [torch.randperm(BLOCKS, generator=g).tolist() for _ in range(2)]
    used = [0, 0]
    seqs: list[list[SequenceSlice]] = [[], []]
    slots: list[list[int]] = [[], []]
    start = 0
    for cached, new in steps:
        end = cached + new
        n_blocks = -(-end // PAGE)
        for grp in range(2):
            table = perm[grp][used[grp]:used[grp] + n_blocks]
            used[grp] += n_blocks
            if grp == 1:  # freed: every key of the block is out of the first new token's window
                first_seen = max(cached + 1 - WINDOW, 0)
                table = [BLOCKS if (b + 1) * PAGE <= first_seen else blk
                         for b, blk in enumerate(table)]
            slots[grp].extend(table[p // PAGE] * PAGE + p % PAGE for p in range(cached, end))
            seqs[grp].append(SequenceSlice(start, new, end, torch.tensor(table)))
        start += new
    positions = torch.cat([torch.arange(c, c + n) for c, n in steps])
    return seqs, [torch.tensor(s) for s in slots], positions


def check(device: str, dtype: torch.dtype, tol: float) -> None:
    from pensieve.backends import cuda_hybrid
    from pensieve.models.forward_context import ForwardContext, PagedGroups, paged_attention

    g = torch.Generator().manual_seed(0)
    calls: list[str] = []
    real = {n: getattr(cuda_hybrid, n) for n in ("paged_decode", "paged_chunk", "attend_cached",
                                                 "prefill_attention")}
    for n, f in real.items():
        setattr(cuda_hybrid, n, lambda *a, _n=n, _f=f, **kw: calls.append(_n) or _f(*a, **kw))
    sinks = 2 * torch.randn(HQ, generator=g)
    for steps in ([(22, 1), (6, 5), (4, 1), (36, 1)],  # decodes around a prefill chunk
                  [(22, 1), (36, 1), (0, 1)],  # decode only
                  [(30, 1), (0, 7), (9, 6)],  # decodes first, a window masks a chunk
                  [(0, 5), (3, 1)],  # within the window: varlen prefill for every layer
                  [(2, 66), (40, 1)],  # a long chunk: full + sinks on the loop
                  [(280, 70), (40, 1)]):  # a follow-up turn: full + sinks on the chunk kernel
        seqs, slots, positions = _step(steps, g)
        t = positions.numel()
        base_k = [torch.randn(BLOCKS + 1, PAGE, HK, D, generator=g) for _ in LAYERS]
        base_v = [torch.randn(BLOCKS + 1, PAGE, HK, D, generator=g) for _ in LAYERS]
        for c in base_k + base_v:
            c[BLOCKS] = 0.0  # the null block, as HybridCaches zeroes it

        def caches(nan: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            ks = [c.clone().to(device, dtype) for c in base_k]
            vs = [c.clone().to(device, dtype) for c in base_v]
            if nan:
                for c in ks + vs:
                    c[BLOCKS] = float("nan")
            return ks, vs

        dev_seqs = [[replace(s, block_table=s.block_table.to(device)) for s in grp] for grp in seqs]
        dev_slots = [s.to(device) for s in slots]
        groups = PagedGroups(LAYER_GROUP, dev_slots, dev_seqs)
        ref_k, ref_v = caches(nan=False)
        ref_ctx = ForwardContext(ref_k, ref_v, dev_slots[0], dev_seqs[0],
                                 torch.zeros(0, dtype=torch.long, device=device), groups=groups)
        k_caches, v_caches = caches(nan=True)
        builder = cuda_hybrid.CudaHybridBuilder(k_caches, v_caches, LAYER_GROUP, [None, WINDOW],
                                                PAGE, torch.device(device), num_sms=4)
        backend = builder.build(LAYER_GROUP, dev_seqs, dev_slots)
        ctx = replace(ref_ctx, k_caches=k_caches, v_caches=v_caches, attention=backend)
        for layer, (window, with_sinks, rot) in enumerate(LAYERS):
            q = torch.randn(t, HQ, D, generator=g).to(device, dtype)
            k = torch.randn(t, HK, D, generator=g).to(device, dtype)
            v = torch.randn(t, HK, D, generator=g).to(device, dtype)
            cs = tuple(x.to(device, dtype) for x in _cos_sin(positions, rot)) if rot else None
            s = sinks.to(device) if with_sinks else None
            want = paged_attention(layer, q, k, v, ref_ctx, cs, window=window, sinks=s)
            got = paged_attention(layer, q, k, v, ctx, cs, window=window, sinks=s)
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            assert err < tol, (steps, layer, err)
            for new, old in ((k_caches, ref_k), (v_caches, ref_v)):
                written = new[layer].view(-1, HK, D)[dev_slots[LAYER_GROUP[layer]]]
                assert torch.allclose(written.float(), old[layer].view(-1, HK, D)[
                    dev_slots[LAYER_GROUP[layer]]].float(), atol=tol, rtol=tol), (steps, layer)
    for n, f in real.items():
        setattr(cuda_hybrid, n, f)
    assert calls.count("paged_decode") == 6 * len(LAYERS), calls  # every layer, every step
    # the chunk kernel: chunks with sinks up to CHUNK_ROWS rows, chunks a window masks within
    # and the 70-row follow-up over 280 cached tokens (16); the 66-row chunk of the full layer
    # with sinks over 2 cached: the loop; the full layer without sinks: varlen, once a step
    # with chunks, and layer 3 once within its window
    assert calls.count("paged_chunk") == 16 and calls.count("attend_cached") == 1, calls
    assert calls.count("prefill_attention") == 5 + 1, calls


@pytest.mark.slow
def test_batched_hybrid_attention_equals_the_loop_in_the_triton_interpreter():
    run_in_triton_interpreter("import torch; from tests.unit.test_cuda_hybrid_kernels import "
                              "check; check('cpu', torch.float32, 1e-5); print('ok')")


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_compiled_batched_hybrid_attention_equals_the_loop(dtype, tol):
    check("cuda", dtype, tol)


def test_which_chunks_with_sinks_take_the_chunk_kernel():
    """Short chunks, and a follow-up turn's new tokens over a long cached context (gpt-oss's
    Claude Code turn 2: 82 over 17k); a cold or long chunk keeps the loop."""
    from pensieve.backends.cuda_hybrid import chunk_kernel
    from pensieve.models.forward_context import SequenceSlice

    def seq(cached: int, new: int) -> SequenceSlice:
        return SequenceSlice(0, new, cached + new, torch.zeros(1, dtype=torch.long))

    assert chunk_kernel(seq(0, 64)) and chunk_kernel(seq(17392, 82))
    assert chunk_kernel(seq(1536, 512)) and not chunk_kernel(seq(1535, 512))
    assert not chunk_kernel(seq(0, 65)) and not chunk_kernel(seq(100, 2048))
    assert not chunk_kernel(seq(20000, 513))


def test_which_layers_take_the_kernels():
    """Plain K/V of at most 256 dims: yes; latent (values narrower, or none), an empty
    KV-shared placeholder, 512-dim heads, a recurrent layer: the per-sequence loop."""
    from pensieve.backends.cuda_hybrid import enabled, kernel_layers

    def kv(heads: int, dk: int, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(2, 4, heads, dk), torch.empty(2, 4, heads, dv)

    shapes = [kv(2, 64, 64), kv(1, 40, 0), kv(0, 0, 0), kv(2, 512, 512), kv(2, 256, 256),
              kv(2, 64, 64)]
    group = (0, 0, 1, 0, 1, None)
    got = kernel_layers([k for k, _ in shapes], [v for _, v in shapes], group)
    assert got == {0, 4}
    assert enabled({}) and enabled({"PENSIEVE_HYBRID_KERNELS": "1"})
    assert not enabled({"PENSIEVE_HYBRID_KERNELS": "0"})


def test_group_metadata_from_the_sequences():
    """The builder's decode tables, context lengths and prefill cache slots (host logic; no
    Triton): a decode row's table is its sequence's, padded with its last block; a prefill
    row's slots are every context token's, through the null block where freed."""
    from pensieve.backends.cuda_hybrid import CudaHybridBuilder

    g = torch.Generator().manual_seed(3)
    seqs, slots, _ = _step([(22, 1), (6, 5), (4, 1)], g)
    k = [torch.empty(BLOCKS + 1, PAGE, HK, D) for _ in LAYERS]
    builder = CudaHybridBuilder(k, k, LAYER_GROUP, [None, WINDOW], PAGE, torch.device("cpu"),
                                num_sms=4)
    step = builder.build(LAYER_GROUP, seqs, slots)
    assert torch.equal(step.decode_rows, torch.tensor([0, 6]))
    assert step.prefill_rows == slice(1, 6) and step.max_prefill_context == 11
    for grp, batch in enumerate(step.groups):
        table = batch.decode.block_tables
        a, c = seqs[grp][0].block_table, seqs[grp][2].block_table
        assert torch.equal(table[0], a.int())
        assert torch.equal(table[1, :len(c)], c.int()) and (table[1, len(c):] == c[-1]).all()
        assert batch.decode.context_lens.tolist() == [23, 5]
        b = seqs[grp][1].block_table
        want = torch.tensor([int(b[p // PAGE]) * PAGE + p % PAGE for p in range(11)])
        assert torch.equal(batch.prefill.kv_slots, want)
        assert batch.prefill.cu_seqlens_q.tolist() == [0, 5]
        assert batch.prefill.cu_seqlens_k.tolist() == [0, 11]
        (chunk,) = batch.chunks
        assert chunk.start.tolist() == [6] and chunk.num_tokens.tolist() == [5]
        assert torch.equal(chunk.block_table, b.int())
    assert (step.groups[1].decode.block_tables[0, :3] == BLOCKS).all()  # freed: the null block


def engine_check() -> None:
    """gpt-oss (a 32-token window and sinks) through the engine twice on the CPU, the second
    time with the batched backend the CUDA runner builds: the same greedy tokens, a prefix hit
    past freed blocks, every attention layer's decode rows on the kernel."""
    import tempfile
    from pathlib import Path

    from pensieve.backends import cuda_hybrid
    from pensieve.backends.torch_backend import build_model, torch_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.types import SamplingParams
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.tiny_families import hf_model, save_hf
    from tests.helpers.tiny_gpt_oss import config

    torch.manual_seed(0)
    ckpt = load_checkpoint(save_hf(Path(tempfile.mkdtemp()) / "hf", hf_model(config(
        sliding_window=32, max_position_embeddings=1024))))
    cfg = EngineConfig(device="cpu", dtype=torch.float32, context_length=1024, block_size=16,
                       max_num_seqs=4, max_num_batched_tokens=256, num_kv_blocks=64,
                       state_checkpoint_interval=64)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 250, (90,), generator=gen).tolist()
    follow = prompt + torch.randint(3, 250, (10,), generator=gen).tolist()
    calls = []
    kernel = cuda_hybrid.paged_decode
    cuda_hybrid.paged_decode = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)

    def turns(batched: bool) -> list[list[int]]:
        engine = torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg)
        r = engine.runner
        if batched:  # what ModelRunner._init_hybrid builds on CUDA
            r.cuda_hybrid = cuda_hybrid.CudaHybridBuilder(
                r.k_caches, r.v_caches, r.hybrid.layer_group,
                [g.window for g in r.cache_plan.paged], r.block_size, torch.device("cpu"), 4)
        out = []
        for rid, ids in (("a", prompt), ("b", follow)):
            engine.add_request(rid, ids, SamplingParams(max_tokens=4, temperature=0.0,
                                                        ignore_eos=True, retain_prefix=True))
            tokens, last = [], None
            while engine.has_work():
                for d in engine.step():
                    tokens.extend(d.token_ids)
                    last = d
            out.append(tokens)
        assert last.num_cached_tokens >= 64, last.num_cached_tokens
        return out

    want = turns(batched=False)
    assert not calls
    assert turns(batched=True) == want, want
    assert len(calls) == 2 * 3 * 3, calls  # 2 turns × 3 decode steps × 3 layers


@pytest.mark.slow
def test_gpt_oss_engine_on_the_batched_backend_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_hybrid_kernels import engine_check; "
                              "engine_check(); print('ok')")
