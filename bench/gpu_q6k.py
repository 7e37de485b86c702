"""Q6_K kernels on CUDA at Qwen3-8B's Q6_K shapes (``backends/cuda_q6k.py``), in process.

Per shape and row count: ``cuda_q6k``'s route (gemv for 1-2 rows, the dequantising gemm beyond)
with the tiles ``cuda_q6k_tune`` picks at start
against the int8 layout it replaced (``cuda_int8``: int8 codes + a float16 scale per 16, 1.4×
the bytes) and cuBLAS on a dense bf16 copy (3.1× the bytes; what no default path keeps), GPU µs
(medians, launches queued behind a sleep as in a CUDA graph: ``cuda_int4_tune.gpu_us``) and the
bandwidth the Q6_K codes' bytes make of it. ``--sweep``: every tile candidate below for each
(shape, rows), to choose ``cuda_q6k``'s GEMV/SKINNY/GEMM_SMALL/GEMM.

    python -m bench.gpu_q6k                 # the table
    python -m bench.gpu_q6k --sweep --reps 20
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

SHAPES = {"attn_v": (1024, 4096), "ffn_down": (4096, 12288), "output": (151936, 4096)}
ROWS = (1, 2, 4, 8, 16, 32, 256, 2048)


def q6k_groups(n: int, k: int, seed: int):
    from gguf import GGMLQuantizationType as Q

    from bench.make_random_gguf import random_q6_k_blocks
    from pensieve.loaders.int4_codes import quant_groups

    gen = torch.Generator().manual_seed(seed)
    raw = torch.from_numpy(random_q6_k_blocks((n, k), gen, "cpu", []).reshape(-1))
    return quant_groups(raw, Q.Q6_K, (n, k))


def candidates() -> dict[str, list]:
    from pensieve.backends.cuda_q6k import Tiles

    return {
        "gemv": [Tiles(1, bn, bg, nw, 2) for bn in (4, 8, 16) for bg in (4, 8, 16)
                 for nw in (2, 4)],
        "gemm16": [Tiles(16, bn, bg, nw, ns) for bn in (32, 64, 128) for bg in (4, 8)
                   for nw in (4,) for ns in (2, 3, 4)],
        "gemm": [Tiles(bm, bn, bg, nw, 3) for bm in (64, 128) for bn in (64, 128, 256)
                 for bg in (2, 4) for nw in (4, 8)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_q6k", description=__doc__)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    a = p.parse_args(argv)
    from pensieve.backends import cuda_q6k
    from pensieve.backends.cuda_int4_tune import gpu_us
    from pensieve.backends.cuda_int8 import CudaInt8Linear
    from pensieve.backends.cuda_q6k import CudaQ6KLinear
    from pensieve.backends.cuda_q6k_tune import plan_shape

    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(dev), "torch", torch.__version__)
    for name, (n, k) in SHAPES.items():
        g = q6k_groups(n, k, seed=n)
        layers = [CudaQ6KLinear(g).to(dev, dt)]
        layers[0].plan = plan_shape(layers, dt, a.reps, gpu_us)  # what a start would choose
        print(name, "plan:", layers[0].plan)
        old = [CudaInt8Linear(g).to(dev, dt)]
        dense = layers[0].dequantize().to(dt)
        q6_bytes = cuda_q6k.layout_bytes(n, k)
        for rows in map(int, a.rows.split(",")):
            x = torch.randn(rows, k, device=dev, dtype=dt)
            ref = F.linear(x.float(), dense.float())
            y = layers[0](x)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            t_new = gpu_us(lambda m: m(x), layers, a.reps)
            t_old = gpu_us(lambda m: m(x), old, a.reps)
            t_dense = gpu_us(lambda m: F.linear(x, dense), layers, a.reps)
            print(f"{name:8} {n:6}x{k:<5} rows {rows:4}: q6k {t_new:8.1f} µs "
                  f"({q6_bytes / t_new / 1e3:6.0f} GB/s, {cuda_q6k.route(rows)}, err {err:.1e})"
                  f"  int8 {t_old:8.1f}  bf16 cuBLAS {t_dense:8.1f}")
            if not a.sweep:
                continue
            kind = "gemv" if rows <= 2 else "gemm16" if rows <= 16 else "gemm"
            times = []
            w = layers[0].weight_buffers()
            for t in candidates()[kind]:
                run = (lambda m, t=t: cuda_q6k.gemv(x, w, torch.empty(rows, n, device=dev,
                                                                      dtype=dt), t)) \
                    if kind == "gemv" else \
                    (lambda m, t=t: cuda_q6k.gemm(x, w, torch.empty(rows, n, device=dev,
                                                                    dtype=dt), t))
                try:
                    times.append((gpu_us(run, layers, a.reps), t))
                except Exception as e:  # a tile Triton cannot build here
                    print(f"    {t}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            for us, t in sorted(times, key=lambda r: r[0])[:3]:
                print(f"    {us:8.1f} µs  {t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
