"""In-process GPU timings behind the served numbers (no HTTP, no tokenizer).

1. Decode attention over the paged cache: the Triton split-K kernel against SDPA over a
   padded gather of each sequence's pages, for batch × context sizes.
2. The 8B Llama shape (random bf16 weights built in place; ``--int4``: the projections as
   ``CudaInt4Linear`` with random codes) through ``ModelRunner``:
   a decode step per CUDA-graph bucket, the same step eager, and a 12k-token cold prefill
   in chunks of 2048 and 8192 tokens, then a 32-token follow-up over the cached 12k.

    python -m bench.gpu_kernels --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def _time(fn, iters: int = 50) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs (CUDA events), after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def attention_table() -> list[dict]:
    from pensieve.backends.cuda_attention import DecodeBatch, choose_num_splits, paged_decode

    hq, hk, d, bs = 32, 8, 128, 16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for b in (1, 8, 32):
        for ctx in (512, 4096, 12288):
            nblk = -(-ctx // bs)
            k = torch.randn(b * nblk + 1, bs, hk, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            tables = torch.randperm(b * nblk, device="cuda").view(b, nblk).int()
            lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
            q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
            meta = DecodeBatch(tables, lens, choose_num_splits(b, hk, ctx, sms))
            t_triton = _time(lambda: paged_decode(q, k, v, meta))
            graph_meta = DecodeBatch(tables, lens, choose_num_splits(b, hk, 1 << 30, sms))
            t_graph_splits = _time(lambda: paged_decode(q, k, v, graph_meta))

            def sdpa():
                kk = k[tables.long()].view(b, -1, hk, d).transpose(1, 2)
                vv = v[tables.long()].view(b, -1, hk, d).transpose(1, 2)
                return F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, enable_gqa=True)

            t_sdpa = _time(sdpa)
            kv_bytes = 2 * b * ctx * hk * d * 2
            rows.append({"batch": b, "context": ctx, "triton_ms": t_triton,
                         "triton_graph_splits_ms": t_graph_splits, "sdpa_gather_ms": t_sdpa,
                         "triton_GBps": kv_bytes / t_triton / 1e6})
            del k, v
    return rows


def fake_chunks(runner, batch: int, ctx: int, start_block: int):
    """Decode chunks for ``batch`` sequences with ``ctx`` cached tokens each."""
    bs = runner.block_size
    nblk = -(-(ctx + 1) // bs)
    chunks = []
    for i in range(batch):
        blocks = list(range(start_block + i * nblk, start_block + (i + 1) * nblk))
        req = SimpleNamespace(prompt_ids=[7] * (ctx + 1), output_ids=[], block_ids=blocks,
                              num_computed_tokens=ctx)
        req.all_ids = req.prompt_ids
        chunks.append(SimpleNamespace(request=req, num_tokens=1, completes=True))
    return chunks


def prefill_chunks(runner, total: int, chunk: int, start_block: int, computed: int = 0):
    bs = runner.block_size
    blocks = list(range(start_block, start_block + -(-total // bs)))
    req = SimpleNamespace(prompt_ids=list(range(100, 100 + total)), output_ids=[],
                          block_ids=blocks, num_computed_tokens=computed)
    req.all_ids = req.prompt_ids
    while req.num_computed_tokens < total:
        n = min(chunk, total - req.num_computed_tokens)
        c = SimpleNamespace(request=req, num_tokens=n,
                            completes=req.num_computed_tokens + n == total)
        yield c
        req.num_computed_tokens += n


def gemv_table() -> list[dict]:
    """F.linear at the 8B shapes, batch 1 and 8: achieved weight bandwidth (cuBLAS), and a
    plain Triton GEMV for batch 1 (several weight copies rotate so L2 cannot hold them)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(X, W, Y, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + k).to(tl.float32)
            w = tl.load(W + n[:, None] * K + k[None, :], mask=n[:, None] < N, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
        tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=n < N)

    rows = []
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
              "down": (4096, 14336), "lm_head": (49152, 4096)}
    for name, (n, k) in shapes.items():
        copies = max(2, -(-400_000_000 // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        nbytes = n * k * 2
        row = {"shape": name, "N": n, "K": k}
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            it = iter(range(10**9))
            ms = _time(lambda: F.linear(x, ws[next(it) % copies]), 30)
            row[f"cublas_m{m}_GBps"] = nbytes / ms / 1e6
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(n, device="cuda", dtype=torch.bfloat16)
        best = None
        for bn, bk, warps in ((8, 512, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8), (4, 1024, 4)):
            it = iter(range(10**9))
            fn = lambda: gemv[(triton.cdiv(n, bn),)](x, ws[next(it) % copies], y, n, k,  # noqa: E731
                                                     BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
            ms = _time(fn, 30)
            if best is None or ms < best[0]:
                best = (ms, f"{bn}x{bk}w{warps}")
        ref = F.linear(x[None], ws[0])[0]
        gemv[(triton.cdiv(n, 16),)](x, ws[0], y, n, k, BLOCK_N=16, BLOCK_K=256, num_warps=4)
        row["triton_m1_GBps"] = nbytes / best[0] / 1e6
        row["triton_best"] = best[1]
        row["triton_rel_err"] = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ws
    return rows


def profile_step(runner, chunks, label: str, out_dir: str) -> None:
    """GPU time per kernel of one eager step (graphs hide kernels from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    graphs, runner.graphs = runner.graphs, None
    for _ in range(2):
        runner.run(chunks)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.run(chunks)
        torch.cuda.synchronize()
    runner.graphs = graphs
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70)
    print(f"--- profile {label} (3 steps)\n{table}", flush=True)


def int4_layers(model) -> None:
    """Replace the projections by ``CudaInt4Linear`` with random codes (built on the GPU)."""
    from pensieve.backends.cuda_int4 import CudaInt4Linear
    from pensieve.models.quant_linear import Int4Groups

    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in model.model.layers:
        for parent, attr in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            n, k = getattr(parent, attr).weight.shape
            scales = torch.rand(n, k // 32, device="cuda", generator=gen) * 0.004 + 0.001
            groups = Int4Groups(
                torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda", generator=gen),
                scales, -8 * scales, 32)
            setattr(parent, attr, CudaInt4Linear([groups]))
    torch.cuda.empty_cache()


def model_table(max_num_seqs: int, out_dir: str = ".", int4: bool = False,
                dense: bool = False, fuse: bool = True, keep_dense: bool = False) -> dict:
    from pensieve.engine.config import EngineConfig
    from pensieve.backends.model_runner import ModelRunner
    from pensieve.models.args import ModelArgs
    from pensieve.models.llama import LlamaForCausalLM

    args = ModelArgs(architecture="llama", vocab_size=49152, hidden_size=4096,
                     intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                     head_dim=128, rope_theta=500000.0, max_position_embeddings=16384)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary.materialize("cuda")
    if fuse:  # as torch_backend.build_model does on CUDA
        from pensieve.backends.cuda_layers import fuse_cuda_layers

        fuse_cuda_layers(model)
    if int4:
        int4_layers(model)
        if dense:
            from pensieve.backends.cuda_int4 import prepare_for_cuda

            prepare_for_cuda(model, torch.bfloat16, keep_dense=keep_dense)
    model.eval()
    cfg = EngineConfig(device="cuda", dtype=torch.bfloat16, context_length=16384,
                       max_num_seqs=max_num_seqs, max_num_batched_tokens=2048)
    t0 = time.perf_counter()
    runner = ModelRunner(model, args, cfg)
    res: dict = {"capture_s": time.perf_counter() - t0, "num_blocks": runner.num_blocks}
    weight_bytes = sum(p.numel() * p.element_size()
                       for p in [*model.parameters(), *model.buffers()])
    res["weight_GB"] = weight_bytes / 1e9
    decode = []
    for b in (1, 2, 4, 8, 16, 32):
        if b > max_num_seqs:
            break
        chunks = fake_chunks(runner, b, 512, 0)
        t_graph = _time(lambda: runner.run(chunks), 20)
        graphs, runner.graphs = runner.graphs, None
        t_eager = _time(lambda: runner.run(chunks), 5)
        runner.graphs = graphs
        decode.append({"batch": b, "graph_ms": t_graph, "eager_ms": t_eager,
                       "graph_tok_s": b * 1000 / t_graph,
                       "weights_GBps": weight_bytes / t_graph / 1e6})
    res["decode_ctx512"] = decode
    for b in (1, 8):
        chunks = fake_chunks(runner, b, 512, 0)
        runner.run(chunks)
        bucket = next(x for x in runner.graphs.buckets if x >= b)
        graph = runner.graphs._graphs[bucket]
        res[f"replay_only_b{b}_ms"] = _time(graph.replay, 20)
        profile_step(runner, chunks, f"eager_decode_b{b}", out_dir)
    prefill = []
    base = 4096
    for c in prefill_chunks(runner, 4096, 2048, base):  # warm up the prefill shapes
        runner.run([c])
    profile_step(runner, [next(prefill_chunks(runner, 12288, 2048, base, computed=10240))],
                 "eager_prefill_2048_after_10k", out_dir)
    for chunk in (2048, 4096, 8192):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for c in prefill_chunks(runner, 12288, chunk, base):
            runner.run([c])
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        prefill.append({"chunk": chunk, "tokens": 12288, "ms": dt * 1e3,
                        "tok_s": 12288 / dt})
    for label in ("graph", "eager"):
        saved = runner.chunk_graphs
        if label == "eager":
            runner.chunk_graphs = None
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for c in prefill_chunks(runner, 12288 + 32, 64, base, computed=12288):
                runner.run([c])
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        runner.chunk_graphs = saved
        prefill.append({f"followup_32_tokens_over_12k_{label}_ms": sorted(times)[2]})
    res["prefill"] = prefill
    del runner, model
    torch.cuda.empty_cache()
    return res


def tokenizer_timing() -> dict:
    """CPU time to encode the 12k-token benchmark prompt (part of every TTFT)."""
    from bench.client import filler_text
    from pensieve.loaders.gguf_file import GGUFFile
    from pensieve.loaders.tokenizer import TextTokenizer

    path = Path(".gpu/tokenizer.gguf")
    if not path.exists():
        return {}
    tok = TextTokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    text = filler_text(9500, "x")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        n = len(tok.encode(text))
        times.append((time.perf_counter() - t0) * 1e3)
    return {"encode_tokens": n, "encode_ms_median": sorted(times)[2]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_kernels")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--gemv", action="store_true", help="also time GEMV kernels")
    p.add_argument("--int4", action="store_true",
                   help="the model's projections as CUDA int4 layers (random codes)")
    p.add_argument("--dense", action="store_true",
                   help="with --int4: prepare_for_cuda (the timed per-shape kernel plans)")
    p.add_argument("--keep-dense", action="store_true",
                   help="with --dense: also the opt-in tinygemm + dense copies")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--unfused", action="store_true", help="without backends/cuda_layers fusion")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["tokenizer"] = tokenizer_timing()
    print(json.dumps(result["tokenizer"]), flush=True)
    if not a.skip_attention:
        result["attention"] = attention_table()
        for r in result["attention"]:
            print(json.dumps(r), flush=True)
    if a.gemv:
        result["gemv"] = gemv_table()
    if not a.skip_model:
        result["model"] = model_table(a.max_num_seqs, a.out, int4=a.int4, dense=a.dense,
                                      fuse=not a.unfused, keep_dense=a.keep_dense)
        print(json.dumps(result["model"], indent=1), flush=True)
    Path(a.out, "gpu_kernels.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
