"""GPU weight bytes against a GGUF's tensor bytes, computed (issue 11: ≤ 1.1×), on any machine.

From a file's tensor list (``--gguf PATH``) or from ``bench/make_random_gguf.py``'s for a shape
and mix without writing it, each tensor's stored bytes beside what the CUDA model holds for it
(``backends/weight_bytes.cuda_bytes``; tests/unit/test_cuda_weight_bytes.py checks that this
equals a built model's ``held_bytes`` on a small file of the same mix), by GGML type:

    python -m bench.gpu_weight_bytes --arch qwen3 --dtype q4_k_m --hidden 4096 --layers 36 \\
        --heads 32 --kv-heads 8 --head-dim 128 --intermediate 12288 --vocab-size 151936
    python -m bench.gpu_weight_bytes --arch qwen3moe --hidden 2048 --layers 48 --heads 32 \
        --kv-heads 4 --head-dim 128 --experts 128 --expert-intermediate 768   # Qwen3-30B-A3B
    python -m bench.gpu_weight_bytes --gguf /tmp/qwen3-8b.gguf
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from pensieve.backends.weight_bytes import cuda_bytes

Tensor = tuple[str, Q, tuple[int, ...], int]  # name, type, torch-order shape, stored bytes


def shape_tensors(a: argparse.Namespace) -> Iterator[Tensor]:
    """``make_random_gguf``'s tensors for the shape and mix in ``a`` (``vocab_size`` tokens)."""
    from bench.make_random_gguf import block_type, tensor_specs

    a = argparse.Namespace(**{"head_dim": None, "experts": None, "expert_intermediate": None,
                              **vars(a)})
    for name, shape, small in tensor_specs(a, a.vocab_size):
        n = int(np.prod(shape))
        qtype = None if small else block_type(name, shape, a)
        if qtype is None:
            yield name, Q.F32 if small else Q.F16, shape, n * (4 if small else 2)
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            yield name, qtype, shape, n // block * size


def file_tensors(path: str) -> Iterator[Tensor]:
    from pensieve.loaders.gguf_file import GGUFFile

    for info in GGUFFile(path).tensors.values():
        yield info.name, info.ggml_type, info.shape, info.nbytes


def table(tensors: Iterator[Tensor]) -> dict[str, tuple[int, int]]:
    """GGML type name → (stored bytes, CUDA bytes)."""
    out: dict[str, tuple[int, int]] = {}
    for _, qtype, shape, stored in tensors:
        s, h = out.get(qtype.name, (0, 0))
        out[qtype.name] = (s + stored, h + cuda_bytes(qtype, shape))
    return out


def ratio(a: argparse.Namespace) -> tuple[int, int]:
    """(stored bytes, CUDA bytes) of the shape in ``a``."""
    rows = table(shape_tensors(a)).values()
    return sum(s for s, _ in rows), sum(h for _, h in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_weight_bytes", description=__doc__)
    p.add_argument("--gguf", default=None, help="a file's own tensor list")
    p.add_argument("--arch", default="qwen3")
    p.add_argument("--dtype", default="q4_k_m")
    for name, default in (("hidden", 4096), ("layers", 36), ("heads", 32), ("kv-heads", 8),
                          ("head-dim", 128), ("intermediate", 12288), ("vocab-size", 151936)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--experts", type=int, default=None, help="qwen3moe: experts a layer")
    p.add_argument("--expert-intermediate", type=int, default=None)
    a = p.parse_args(argv)
    rows = table(file_tensors(a.gguf) if a.gguf else shape_tensors(a))
    print(f"{'type':8} {'stored GB':>10} {'CUDA GB':>10} {'ratio':>6}")
    for name, (s, h) in sorted(rows.items()):
        print(f"{name:8} {s / 1e9:10.3f} {h / 1e9:10.3f} {h / s:6.3f}")
    s, h = sum(s for s, _ in rows.values()), sum(h for _, h in rows.values())
    print(f"{'all':8} {s / 1e9:10.3f} {h / 1e9:10.3f} {h / s:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
