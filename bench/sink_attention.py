"""Attention sinks on the CPU: the two exact ways ``models/sink_attention.py`` chooses between.

``by-hand``: scores, a log-sum-exp with the sink, one matmul with V. ``sink-column``: SDPA over
the keys plus a zero key whose mask entry is the head's sink logit (and a zero value row).
gpt-oss-20b's heads (64 query, 8 KV, 64 dims), one layer, float32; median of ``--rounds``.

    .venv/bin/python -m bench.sink_attention
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pensieve.models.sink_attention import _by_hand, _sink_column

SHAPES = ((1, 128), (1, 2048), (1, 8192), (64, 2048), (256, 256), (512, 1024))


def causal(n: int, ctx: int) -> torch.Tensor | None:
    if n == 1:
        return None
    rows = torch.arange(n).unsqueeze(1) + ctx - n
    return torch.zeros(n, ctx).masked_fill(torch.arange(ctx).unsqueeze(0) > rows, float("-inf"))


def timed(fn, *args, rounds: int) -> float:  # noqa: ANN001
    fn(*args)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("queries × context   by-hand ms   sink-column ms   by-hand / sink-column")
    for n, ctx in SHAPES:
        q = torch.randn(n, 64, 64, generator=g)
        k, v = torch.randn(ctx, 8, 64, generator=g), torch.randn(ctx, 8, 64, generator=g)
        sinks, mask = torch.randn(64, generator=g), causal(n, ctx)
        torch.testing.assert_close(_by_hand(q, k, v, sinks, mask),
                                   _sink_column(q, k, v, sinks, mask), atol=1e-5, rtol=1e-4)
        a = timed(_by_hand, q, k, v, sinks, mask, rounds=rounds)
        b = timed(_sink_column, q, k, v, sinks, mask, rounds=rounds)
        print(f"{n:>5} × {ctx:<6}      {a:9.2f}   {b:14.2f}   {a / b:8.2f}")


if __name__ == "__main__":
    main()
