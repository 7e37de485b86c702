"""In-process GPU timings behind the served numbers (no HTTP, no tokenizer).

1. Decode attention over the paged cache: the Triton split-K kernel against SDPA over a
   padded gather of each sequence's pages, for batch × context sizes.
2. The 8B Llama shape (random bf16 weights built in place) through ``ModelRunner``:
   a decode step per CUDA-graph bucket, the same step eager, and a 12k-token cold prefill
   in chunks of 2048 and 8192 tokens, then a 32-token follow-up over the cached 12k.

    python -m bench.gpu_kernels --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
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


def model_table(max_num_seqs: int) -> dict:
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.model_runner import ModelRunner
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
    model.eval()
    cfg = EngineConfig(device="cuda", dtype=torch.bfloat16, context_length=16384,
                       max_num_seqs=max_num_seqs, max_num_batched_tokens=2048)
    t0 = time.perf_counter()
    runner = ModelRunner(model, args, cfg)
    res: dict = {"capture_s": time.perf_counter() - t0, "num_blocks": runner.num_blocks}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
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
    prefill = []
    base = 4096
    for chunk in (2048, 8192):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for c in prefill_chunks(runner, 12288, chunk, base):
            runner.run([c])
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        prefill.append({"chunk": chunk, "tokens": 12288, "ms": dt * 1e3,
                        "tok_s": 12288 / dt})
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for c in prefill_chunks(runner, 12288 + 32, 64, base, computed=12288):
        runner.run([c])
    torch.cuda.synchronize()
    prefill.append({"followup_32_tokens_over_12k_ms": (time.perf_counter() - t0) * 1e3})
    res["prefill"] = prefill
    del runner, model
    torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_kernels")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--skip-model", action="store_true")
    a = p.parse_args(argv)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["attention"] = attention_table()
    for r in result["attention"]:
        print(json.dumps(r), flush=True)
    if not a.skip_model:
        result["model"] = model_table(a.max_num_seqs)
        print(json.dumps(result["model"], indent=1), flush=True)
    Path(a.out, "gpu_kernels.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
