"""One GLM-4.7-Flash-shaped latent-attention layer (20 heads, q_lora 768, kv_lora 512, rope 64,
nope 192, v 256, hidden 2048; random weights, bf16) on CUDA: a decode step of B streams, and a
follow-up chunk of a few tokens over a cached context, through the whole ``MLAttention`` module
(projections, ``W_UK``/``W_UV``, the cache write) — the per-sequence torch loop (what runs
without ``backends/cuda_mla.py``) against the batched latent kernel.

Prints ms per layer call (loop, kernel, the ratio) and the step's metadata build (once a step
for all layers); checks the two agree (relative error < 3e-2).

    .venv/bin/python -m bench.mla_attention [--batches 1 8] [--contexts 4096 20000] [--chunk 8]
    TRITON_INTERPRET=1 .venv/bin/python -m bench.mla_attention --device cpu --dtype float32 \\
        --batches 2 --contexts 40 --rounds 1   # a smoke run of the script on the CPU
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from bench.hybrid_attention import timed
from bench.mla_decode import layer
from pensieve.backends.cuda_hybrid import CudaHybridBuilder
from pensieve.models.forward_context import ForwardContext, SequenceSlice
from pensieve.models.rope import RotaryEmbedding

BLOCK = 16


def step(lens: list[tuple[int, int]], device: torch.device
         ) -> tuple[list[SequenceSlice], torch.Tensor, torch.Tensor, int]:
    """(cached, new) per sequence → its slices over shuffled blocks, new slots, positions."""
    per = [-(-(c + n) // BLOCK) for c, n in lens]
    blocks = sum(per)
    perm = torch.randperm(blocks).tolist()
    seqs, slots, start, used = [], [], 0, 0
    for (cached, new), p in zip(lens, per):
        table = perm[used:used + p]
        used += p
        slots.extend(table[i // BLOCK] * BLOCK + i % BLOCK for i in range(cached, cached + new))
        seqs.append(SequenceSlice(start, new, cached + new, torch.tensor(table, device=device)))
        start += new
    positions = torch.cat([torch.arange(c, c + n) for c, n in lens]).to(device)
    return seqs, torch.tensor(slots, device=device), positions, blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 20000])
    ap.add_argument("--chunk", type=int, default=8, help="the follow-up chunk's tokens")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    module, args = layer()
    module.to(device, dtype)
    rope = RotaryEmbedding(64, max(a.contexts) + a.chunk + 1, 10000.0, None)
    print(f"{'step':16} {'B':>3} {'context':>7} {'loop ms':>8} {'kernel ms':>9} {'ratio':>6}"
          f" {'build ms':>8}")
    for context in a.contexts:
        cases = [(f"decode x{b}", [(context - 1, 1)] * b) for b in a.batches]
        cases.append((f"chunk of {a.chunk}", [(context - a.chunk, a.chunk)]))
        for name, lens in cases:
            seqs, slots, positions, blocks = step(lens, device)
            cache = torch.randn(blocks + 1, BLOCK, 1, 576, device=device, dtype=dtype)
            v = torch.empty(blocks + 1, BLOCK, 1, 0, device=device, dtype=dtype)
            ctx = ForwardContext([cache], [v], slots, seqs,
                                 torch.zeros(0, dtype=torch.long, device=device))
            builder = CudaHybridBuilder([cache], [v], (0,), [None], BLOCK, device,
                                        num_sms=None if device.type == "cuda" else 4,
                                        latent_heads=args.num_heads)
            fast = replace(ctx, attention=builder.build((0,), [seqs], [slots]))
            assert fast.attention.latent_rows(0) is not None, "the kernel takes these rows"
            cos_sin = tuple(c.to(device=device, dtype=dtype) for c in rope.lookup(positions.cpu()))
            x = torch.randn(len(positions), args.hidden_size, device=device, dtype=dtype)

            def run(c: ForwardContext) -> torch.Tensor:
                with torch.no_grad():
                    return module(x, cos_sin, c)

            want, got = run(ctx).float(), run(fast).float()
            err = ((got - want).norm() / want.norm()).item()
            assert err < 3e-2, (name, context, err)
            loop_ms = timed(lambda: run(ctx), a.rounds, device)
            fast_ms = timed(lambda: run(fast), a.rounds, device)
            build_ms = timed(lambda: builder.build((0,), [seqs], [slots]), a.rounds, device)
            print(f"{name:16} {len(lens):3d} {context:7d} {loop_ms:8.3f} {fast_ms:9.3f} "
                  f"{loop_ms / fast_ms:5.1f}x {build_ms:8.3f}", flush=True)


if __name__ == "__main__":
    main()
