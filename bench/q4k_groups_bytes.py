"""Bytes a loaded Q4_K weight's ``Int4Groups`` holds, and the time to build it, on the CPU.

    .venv/bin/python -m bench.q4k_groups_bytes                      # [128·1536, 2048]
    .venv/bin/python -m bench.q4k_groups_bytes --rows 4096 --cols 4096 --repeats 3

The loader keeps every quantised weight as codes until the model is built (on a GPU too, where
it converts there), so what one ``Int4Groups`` references at load is what the whole model's
Q4_K tensors hold at the peak. This builds one from random Q4_K blocks (sane float16 d/dmin)
as ``load_gguf(keep_int4=True)`` does and sums the bytes of the distinct tensor storages the
object references (its attributes, tuples of them included), in bits a weight; then the same
after asking for each derived form, for comparison. Time: median wall clock of ``--repeats``
builds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q4_K = GGMLQuantizationType.Q4_K


def random_q4_k(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random Q4_K bytes for a [rows, cols] weight, d and dmin float16 in 0.001..0.05."""
    block, size = GGML_QUANT_SIZES[Q4_K]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in (0, 2):
        raw[:, at:at + 2] = rng.uniform(0.001, 0.05, size=(raw.shape[0], 1)).astype(
            np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(-1))


def held_bytes(obj: object) -> int:
    """Bytes of the distinct tensor storages ``obj``'s attributes reference (views of one
    storage count once): what keeping the object alive keeps."""
    seen: dict[int, int] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    for value in vars(obj).values():
        visit(value)
    return sum(seen.values())


def median_seconds(build: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``build``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from pensieve.loaders.int4_codes import int4_groups

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=128 * 1536)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shape = (args.rows, args.cols)
    weights = args.rows * args.cols
    raw = random_q4_k(*shape)
    bits = lambda n: 8 * n / weights  # noqa: E731
    print(f"Q4_K [{args.rows}, {args.cols}]: file {raw.numel() / 2**20:.1f} MiB "
          f"({bits(raw.numel()):.3f} bits a weight); torch threads {torch.get_num_threads()}")
    groups = int4_groups(raw, Q4_K, shape)
    held = held_bytes(groups)
    print(f"held at load:          {held / 2**20:8.1f} MiB  {bits(held):.3f} bits a weight")
    groups.nibbles  # noqa: B018  (derives the float16 pair where it is not kept)
    groups.scales, groups.offsets  # noqa: B018
    after = held_bytes(groups)
    print(f"held after accessors:  {after / 2**20:8.1f} MiB  {bits(after):.3f} bits a weight")
    seconds = median_seconds(lambda: int4_groups(raw, Q4_K, shape), args.repeats)
    print(f"build: {seconds * 1e3:.0f} ms "
          f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
