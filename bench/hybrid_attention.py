"""One hybrid decode step's attention on CUDA: the batched kernels per layer group
(``backends/cuda_hybrid.py``) against the per-sequence loop, per layer call, in real shapes with
random K/V:

- gpt-oss-20b: 64 query / 8 KV heads of 64 dims, sinks; a 128-token window layer (its table's
  freed blocks on the null block) and a full layer;
- Qwen3.5/3.6: 16 query / 2 KV heads of 256 dims, a gated full-attention layer.

Prints ms per layer call (loop, kernels, the ratio) and the step's metadata build (once a step
for all layers). bf16, B sequences decoding one token each over ``--contexts`` tokens.

    .venv/bin/python -m bench.hybrid_attention [--batches 1 8] [--contexts 4096 20000]
    TRITON_INTERPRET=1 .venv/bin/python -m bench.hybrid_attention --device cpu --dtype float32 \
        --batches 2 --contexts 40 --rounds 1   # a smoke run of the script on the CPU
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from pensieve.backends.cuda_hybrid import CudaHybridBuilder
from pensieve.models.forward_context import (
    ForwardContext, PagedGroups, SequenceSlice, paged_attention,
)

BLOCK, WINDOW = 16, 128
# name → (query heads, KV heads, head dim, window, sinks)
SHAPES = {"gpt-oss window": (64, 8, 64, WINDOW, True), "gpt-oss full": (64, 8, 64, None, True),
          "qwen3.5 full": (16, 2, 256, None, False)}


def step(batch: int, context: int, device: torch.device) -> tuple[list[list[SequenceSlice]],
                                                                  list[torch.Tensor], int]:
    """B decodes at ``context`` (the new token included): a full group's tables and a window
    group's (blocks wholly before the window on the null block, index ``blocks``)."""
    per = -(-context // BLOCK)
    blocks = batch * per
    perm = torch.randperm(blocks)
    seqs: list[list[SequenceSlice]] = [[], []]
    slots: list[list[int]] = [[], []]
    for b in range(batch):
        table = perm[b * per:(b + 1) * per].tolist()
        for g in range(2):
            t = table if g == 0 else [blocks if (i + 1) * BLOCK <= context - WINDOW else x
                                      for i, x in enumerate(table)]
            p = context - 1
            slots[g].append(t[p // BLOCK] * BLOCK + p % BLOCK)
            seqs[g].append(SequenceSlice(b, 1, context, torch.tensor(t, device=device)))
    return seqs, [torch.tensor(s, device=device) for s in slots], blocks


def timed(fn, rounds: int, device: torch.device) -> float:  # noqa: ANN001
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / rounds * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 20000])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    print(f"{'layer':16} {'B':>3} {'context':>7} {'loop ms':>8} {'kernels ms':>10} {'ratio':>6}"
          f" {'build ms':>8}")
    for batch in a.batches:
        for context in a.contexts:
            seqs, slots, blocks = step(batch, context, device)
            for name, (hq, hk, d, window, with_sinks) in SHAPES.items():
                group = 0 if window is None else 1
                layer_group = (group,)
                k = [torch.randn(blocks + 1, BLOCK, hk, d, device=device, dtype=dtype)]
                v = [torch.randn_like(k[0])]
                k[0][blocks] = v[0][blocks] = 0
                groups = PagedGroups(layer_group, slots, seqs)
                ctx = ForwardContext(k, v, slots[0], seqs[0],
                                     torch.zeros(0, dtype=torch.long, device=device),
                                     groups=groups)
                builder = CudaHybridBuilder(k, v, layer_group, [None, WINDOW], BLOCK, device,
                                            num_sms=None if device.type == "cuda" else 4)
                fast = replace(ctx, attention=builder.build(layer_group, seqs, slots))
                q = torch.randn(batch, hq, d, device=device, dtype=dtype)
                kk = torch.randn(batch, hk, d, device=device, dtype=dtype)
                vv = torch.randn_like(kk)
                sinks = torch.randn(hq, device=device) if with_sinks else None

                def run(c: ForwardContext) -> torch.Tensor:
                    return paged_attention(0, q, kk, vv, c, None, window=window, sinks=sinks)

                want, got = run(ctx).float(), run(fast).float()
                err = ((got - want).norm() / want.norm()).item()
                assert err < 3e-2, (name, batch, context, err)
                loop_ms, fast_ms = timed(lambda: run(ctx), a.rounds, device), timed(
                    lambda: run(fast), a.rounds, device)
                build_ms = timed(lambda: builder.build(layer_group, seqs, slots), a.rounds, device)
                print(f"{name:16} {batch:3d} {context:7d} {loop_ms:8.3f} {fast_ms:10.3f} "
                      f"{loop_ms / fast_ms:5.1f}x {build_ms:8.3f}", flush=True)


if __name__ == "__main__":
    main()
