"""The bf16 prefill path against the integer kernels, per Qwen2.5-Coder-1.5B projection shape.

    .venv/bin/python -m bench.bf16_prefill --rows 16 32 64 128 512 --threads 2

Random Q4 codes (Q4_K's kernel format), float32 activations; each shape through the
module as it runs (``CodesLinear``: the row-tile kernel or the panel GEMM) and forced onto
the bf16 path (dequantise to bf16 + one oneDNN matmul), and the fused MLP (gate_up 17920 ×
1536, down 1536 × 8960) both ways; ms per call, medians. Prints the CPU's AMX flags, whether
the path is on by default here, the dequantisation alone, and oneDNN's kernel name.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

SHAPES = {"qkv": (1536, 2048), "o": (1536, 1536), "gate_up": (1536, 17920), "down": (8960, 1536)}


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bench.cpu_kernels import random_groups
    from pensieve.backends.cpu_quant import bf16_prefill, load_kernels
    from pensieve.backends.cpu_quant.build import cpu_features
    from pensieve.backends.cpu_quant.codes_linear import CodesLinear
    from pensieve.backends.cpu_quant.mlp import Q4MLP

    kernels = load_kernels()
    print(f"torch {torch.__version__}, {args.threads} threads, features {cpu_features()}, "
          f"amx_bf16 path {bf16_prefill.amx_bf16()}, dequant isa {kernels.pqx_bf16_isa()}, "
          f"load {os.getloadavg()}", flush=True)
    layers = {name: CodesLinear(kernels, random_groups(n, k, seed=i), threads=args.threads)
              for i, (name, (k, n)) in enumerate(SHAPES.items())}
    gu = layers["gate_up"]
    down = CodesLinear(kernels, random_groups(1536, 8960, seed=9), threads=args.threads)
    mlp = Q4MLP(gu, down)
    for name, layer in layers.items():
        k, n = layer.in_features, layer.out_features
        t = timed(lambda: bf16_prefill.dequant_bf16(kernels, layer._address, k, 0, n,
                                                    args.threads), args.repeats)
        print(f"dequant→bf16 {name} {n}×{k}: {t:.1f} ms", flush=True)
    for m in args.rows:
        cells = []
        for name, layer in [*layers.items(), ("mlp", mlp)]:
            x = torch.randn(m, getattr(layer, "in_features", 1536))
            mods = [layer] if name != "mlp" else [gu, down]
            for mod in mods:
                mod.bf16_from = sys.maxsize
            t_int = timed(lambda: layer(x), args.repeats)
            for mod in mods:
                mod.bf16_from = 1
            t_bf = timed(lambda: layer(x), args.repeats)
            for mod in mods:
                mod.bf16_from = bf16_prefill.bf16_from()
            flop = 2 * m * (x.shape[1] * layer.out_features if name != "mlp" else 3 * 1536 * 8960)
            cells.append(f"{name} int {t_int:7.1f} bf16 {t_bf:7.1f} ms ({t_int / t_bf:4.2f}×, "
                         f"{flop / t_bf / 1e6:5.0f} GFLOP/s)")
        print(f"M={m:4d}: " + " | ".join(cells), flush=True)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
