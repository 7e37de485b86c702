"""CPU timings of the gated delta rule (models/gated_delta.py) in Qwen3.5-4B's linear-layer shape
(16 key heads, 32 value heads, 128 dims): the chunked form over a prompt against the recurrent
form fed the same prompt token by token, and one decode step for 1 and 8 sequences.

    .venv/bin/python -m bench.gated_delta_cpu [--tokens 512 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from pensieve.models import gated_delta as gd


def inputs(b: int, t: int, hk: int = 16, hv: int = 32, d: int = 128):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, t, hk, d, generator=g), torch.randn(b, t, hk, d, generator=g),
            torch.randn(b, t, hv, d, generator=g), -0.1 * torch.rand(b, t, hv, generator=g),
            torch.rand(b, t, hv, generator=g), torch.zeros(b, hv, d, d))


def best(fn, repeat: int = 3) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with torch.no_grad():
        for t in a.tokens:
            x = inputs(1, t)
            chunk = best(lambda: gd.chunk_gated_delta_rule(*x))
            rec = best(lambda: gd.recurrent_gated_delta_rule(*x), 1)
            print(f"prefill {t} tokens, one layer: chunked {chunk * 1e3:.1f} ms "
                  f"({t / chunk:.0f} tok/s), recurrent {rec * 1e3:.1f} ms ({rec / chunk:.1f}x)")
        for b in (1, 8):
            x = inputs(b, 1)
            step = best(lambda: gd.recurrent_gated_delta_rule(*x), 20)
            print(f"decode step, {b} sequence(s), one layer: {step * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
