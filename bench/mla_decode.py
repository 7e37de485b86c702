"""One GLM-4.7-Flash-shaped latent-attention layer (20 heads, q_lora 768, kv_lora 512, rope 64,
nope 192, v 256, hidden 2048; random weights) decoding one token over a cached context on the
CPU: the absorbed path (attention in latent space, what decode runs) against expanding the
context's K/V through ``kv_b_proj`` (the reference's way), and the cache bytes a token takes.

    .venv/bin/python -m bench.mla_decode [--contexts 1024 4096 16384] [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pensieve.models.args import MLAArgs, ModelArgs, MoEArgs
from pensieve.models.deepseek_mla import MLAttention, softmax_scale
from pensieve.models.forward_context import ForwardContext, SequenceSlice
from pensieve.models.rope import RotaryEmbedding

BLOCK = 16


def layer() -> tuple[MLAttention, ModelArgs]:
    mla = MLAArgs(q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64,
                  v_head_dim=256, softmax_scale=softmax_scale(256, None))
    args = ModelArgs(architecture="glm4_moe_lite", vocab_size=8, hidden_size=2048,
                     intermediate_size=8, num_layers=1, num_heads=20, num_kv_heads=1,
                     head_dim=576, mla=mla, moe=MoEArgs(4, 1, 8))
    torch.manual_seed(0)
    module = MLAttention(args, 0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return module.eval(), args


def time_decode(module: MLAttention, context: int, absorb: str, rounds: int) -> float:
    blocks = -(-(context + 1) // BLOCK)
    cache = torch.randn(blocks, BLOCK, 1, 576)
    table = torch.arange(blocks)
    seq = SequenceSlice(0, 1, context + 1, table)
    ctx = ForwardContext([cache], [torch.empty(0)], torch.tensor([context]), [seq],
                         torch.arange(1))
    rope = RotaryEmbedding(64, context + 1, 10000.0, None)
    cos_sin = rope.lookup(torch.tensor([context]))
    x = torch.randn(1, 2048)
    module.absorb = absorb
    times = []
    with torch.no_grad():
        for _ in range(rounds + 2):
            start = time.perf_counter()
            module(x, cos_sin, ctx)
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=20)
    opts = parser.parse_args()
    module, args = layer()
    latent = 576 * 2
    expanded = args.num_heads * (256 + 256) * 2
    print(f"cache per token per layer (bf16): latent {latent} B, expanded K+V {expanded} B "
          f"({expanded / latent:.1f}x)")
    print(f"threads {torch.get_num_threads()}")
    for context in opts.contexts:
        absorbed = time_decode(module, context, "always", opts.rounds)
        expanded_ms = time_decode(module, context, "never", opts.rounds)
        print(f"context {context:6d}: absorbed {absorbed:7.2f} ms, expanded {expanded_ms:7.2f} ms, "
              f"{expanded_ms / absorbed:.1f}x")


if __name__ == "__main__":
    main()
