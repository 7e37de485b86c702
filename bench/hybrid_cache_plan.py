"""What the grouped KV manager's sizing gives real hybrid layouts (computed, not measured).

For each layout: the blocks one table would get in the budget (every layer's K/V in every
block, as the runner allocated before layer groups) against the grouped plan (``backends/hybrid_cache.plan_cache``: full-attention blocks, window
blocks, state checkpoints), and what one request at the full context holds.

    .venv/bin/python -m bench.hybrid_cache_plan [--context 32768] [--budget-gib 20]
"""

from __future__ import annotations

import argparse

import torch

from pensieve.backends.hybrid_cache import group_block_bytes, plan_cache, state_bytes
from pensieve.engine.config import EngineConfig
from pensieve.engine.kv_plan import WINDOW, first_live_block
from pensieve.models.cache_spec import LayerCache, PagedKV, RecurrentState

LAYOUTS: dict[str, tuple[LayerCache, ...]] = {
    # Gemma 3 27B: 62 layers, every 6th global, window 1024, 16 KV heads × 128
    "gemma3-27b": tuple(PagedKV(16, 128, 128, None if (i + 1) % 6 == 0 else 1024) for i in range(62)),
    # gpt-oss-20b: 24 layers alternating 128-token windows and full, 8 KV heads × 64
    "gpt-oss-20b": tuple(PagedKV(8, 64, 64, 128 if i % 2 == 0 else None) for i in range(24)),
    # Qwen3.6-35B-A3B-like: 40 layers, 3 Gated DeltaNet : 1 gated attention (2 KV heads × 256);
    # conv over q/k/v channels (16·128·2 + 32·128) with kernel 4, state 32 heads × 128 × 128
    "qwen3.6-35b-a3b": tuple(PagedKV(2, 256, 256) if (i + 1) % 4 == 0 else
                             RecurrentState((3, 8192), (32, 128, 128)) for i in range(40)),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--budget-gib", type=float, default=20.0)
    p.add_argument("--seqs", type=int, default=8)
    a = p.parse_args()
    budget = int(a.budget_gib * 2**30)
    bs = 16
    for name, layout in LAYOUTS.items():
        cfg = EngineConfig(context_length=a.context, block_size=bs, max_num_seqs=a.seqs,
                           max_num_batched_tokens=2048, dtype=torch.bfloat16)
        plan = plan_cache(layout, cfg, budget)
        per_seq = -(-a.context // bs)
        # one table: what the runner allocated before layer groups — every layer the first
        # attention layer's K/V (recurrent ones included), as many blocks as the budget holds
        first = next(s for s in layout if isinstance(s, PagedKV))
        every = len(layout) * first.token_elements() * bs * 2
        one_table = max(per_seq, min(budget // every, per_seq * a.seqs))
        held = 0
        for g in plan.paged:
            cost = group_block_bytes(layout, g.layers, bs, torch.bfloat16)
            live = per_seq if g.kind != WINDOW else per_seq - first_live_block(a.context, g.window, bs) + 2048 // bs
            held += live * cost
        full = plan.paged[0]
        print(f"{name}: one table {one_table} blocks ({one_table / per_seq:.2f} contexts of {a.context}); "
              f"grouped: " + ", ".join(f"{g.kind}{'' if g.window is None else f'({g.window})'} {g.num_blocks}"
                                      for g in plan.paged)
              + f" blocks ({full.num_blocks / per_seq:.2f} contexts); {plan.checkpoints} checkpoints of "
              f"{state_bytes(layout) / 2**20:.1f} MiB; one request at the full context holds "
              f"{per_seq * every / 2**30:.2f} GiB with one table, {(held + state_bytes(layout)) / 2**30:.2f} GiB grouped")


if __name__ == "__main__":
    main()
