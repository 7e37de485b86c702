"""Bytes a loaded Q6_K weight's ``Int8Groups`` holds, and the time to build it, on the CPU:
the eager form the loader built before (int8 codes, float16 steps, the file's factors) vs
``Q6KGroups`` (the file's bytes only).

    .venv/bin/python -m bench.q6k_groups_bytes                      # [128·2048, 768]
    .venv/bin/python -m bench.q6k_groups_bytes --rows 4096 --cols 4096 --repeats 3

The loader keeps every quantised weight as codes until the model is built (on a GPU too, where
it converts there), so what one object references at load is what the whole model's Q6_K
tensors hold at the peak. Both are built from the same random Q6_K blocks (sane float16 d, of
either sign); held bytes are those of the distinct tensor storages the object references
(``bench.q4k_groups_bytes.held_bytes``), in bits a weight, then again after asking for every
derived form. Time: median wall clock of ``--repeats`` builds; then of the ``six`` layout's
two buffers (``cuda_q6k.pack_six``) from held codes, from derived ones, and straight from the
file's bytes (``Q6KGroups.six_packed``, what ``cuda_q6k.six_of`` takes).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from bench.q4k_groups_bytes import held_bytes, median_seconds

if TYPE_CHECKING:
    from pensieve.loaders.int4_codes import Int8Groups

Q6_K = GGMLQuantizationType.Q6_K


def random_q6_k(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random Q6_K bytes for a [rows, cols] weight, d float16 in ±(0.0005..0.01)."""
    block, size = GGML_QUANT_SIZES[Q6_K]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    d = rng.uniform(0.0005, 0.01, size=(raw.shape[0], 1)) * rng.choice((-1, 1), (raw.shape[0], 1))
    raw[:, 208:210] = d.astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(-1))


def eager_q6_k(raw: torch.Tensor, rows: int, cols: int) -> Int8Groups | None:
    """The ``Int8Groups`` the loader built for Q6_K before ``Q6KGroups`` (its code, kept as
    the reference): int8 codes [N, K], float16 d·sc [N, K/16] and the file's factors; None
    where a step overflows float16."""
    from pensieve.loaders.int4_codes import Int8Groups
    from pensieve.loaders.quants import _q6_k_codes, _q6_k_steps

    blocks = raw.reshape(-1, GGML_QUANT_SIZES[Q6_K][1])
    codes, scales = _q6_k_codes(blocks), _q6_k_steps(blocks).half()
    k_scales = None
    if cols % 256 == 0:
        k_scales = (blocks[:, 192:208].contiguous().view(torch.int8).reshape(rows, cols // 16),
                    blocks[:, 208:210].contiguous().view(torch.float16).reshape(rows, cols // 256))
    if not torch.isfinite(scales).all():
        return None
    return Int8Groups(codes=codes.reshape(rows, cols).contiguous(),
                      scales=scales.reshape(rows, cols // 16).contiguous(), offsets=None,
                      group_size=16, ggml_type="Q6_K", k_scales=k_scales)


def main() -> None:
    from pensieve.loaders.int4_codes import int8_groups

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=128 * 2048)  # Qwen3-30B-A3B's ffn_down_exps
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shape = (args.rows, args.cols)
    weights = args.rows * args.cols
    raw = random_q6_k(*shape)
    bits = lambda n: 8 * n / weights  # noqa: E731
    print(f"Q6_K [{args.rows}, {args.cols}]: file {raw.numel() / 2**20:.1f} MiB "
          f"({bits(raw.numel()):.3f} bits a weight); torch threads {torch.get_num_threads()}")
    builds = {"eager (before)": lambda: eager_q6_k(raw, *shape),
              "Q6KGroups (now)": lambda: int8_groups(raw, Q6_K, shape)}
    for name, build in builds.items():
        groups = build()
        held = held_bytes(groups)
        groups.codes, groups.scales, groups.k_scales  # noqa: B018  (derived where not kept)
        after = held_bytes(groups)
        seconds = median_seconds(build, args.repeats)
        print(f"{name:16s} held at load {held / 2**20:8.1f} MiB  {bits(held):.3f} bits a weight;"
              f" after accessors {bits(after):.3f}; build {seconds * 1e3:.0f} ms "
              f"(median of {args.repeats})")
    from pensieve.backends.cuda_q6k import pack_six

    eager, lazy = builds["eager (before)"](), builds["Q6KGroups (now)"]()
    held = median_seconds(lambda: pack_six(eager.codes), args.repeats)
    derived = median_seconds(lambda: pack_six(lazy.codes), args.repeats)
    now = median_seconds(lazy.six_packed, args.repeats)
    print(f"six layout (CUDA MoE / cuda_q6k): pack_six(held codes) {held * 1e3:.0f} ms, "
          f"pack_six(derived codes) {derived * 1e3:.0f} ms, six_packed() from the file's "
          f"bytes {now * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
