"""The int8-code decode GEMVs on CUDA at gpt-oss-20b's Q8_0 attention shapes, in process:
``gemv`` (``cuda_int8_kernels``) against ``gemv2`` (``cuda_int8_gemv2_kernels``: 16-byte loads
in one layout, any K step), every start-time candidate tile of each, at 1, 2 and 4 rows.

Per (shape, format, rows, route, tiles): GPU µs (median, launches queued behind a sleep as in
a CUDA graph: ``cuda_int4_tune.gpu_us``, cycling over 4 layers of the shape so L2 does not
hold the weight), GB/s of the code + scale bytes, and the relative error against the
dequantised weight (a wrong tile is marked, as the start-time race leaves it out). Then, per
shape and rows, each route's best and gemv2's speed-up.

    python -m bench.gpu_int8_gemv2                     # gpt-oss qkv/o Q8_0, + Q5_1 and Q6_K
    python -m bench.gpu_int8_gemv2 --reps 100 --rows 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

# (name, N, K, GGUF type)
SHAPES = (("qkv", 5120, 2880, "Q8_0"), ("o", 2880, 4096, "Q8_0"), ("qkv", 5120, 2880, "Q5_1"),
          ("o", 2880, 4096, "Q6_K"))


def main() -> None:
    from gguf import GGMLQuantizationType as Q

    from pensieve.backends.cuda_int4_tune import gpu_us
    from pensieve.backends.cuda_int8 import CudaInt8Linear, run_route
    from pensieve.backends.cuda_int8_tune import GEMV2_CANDIDATES, GEMV_CANDIDATES
    from tests.unit.test_cuda_int8 import groups

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rows", default="1,2,4")
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    cands = [("gemv", t) for t in GEMV_CANDIDATES] + [("gemv2", t) for t in GEMV2_CANDIDATES]
    print(f"device: {torch.cuda.get_device_name()}")
    for name, n, k, qt in SHAPES:
        layers = [CudaInt8Linear(groups(Q[qt], n, k, seed=s)).cuda() for s in range(4)]
        weight = layers[0].dequantize()
        nbytes = sum(b.numel() * b.element_size() for b in layers[0].buffers())
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), weight)
            best: dict[str, tuple[float, str]] = {}
            for route, t in cands:
                y = run_route(x, layers[0].blocks(), n, route, t)
                err = ((y.float() - ref).norm() / ref.norm()).item()

                def run(m: CudaInt8Linear, route: str = route, t=t) -> torch.Tensor:  # noqa: ANN001
                    return run_route(x, m.blocks(), n, route, t)

                us = gpu_us(run, layers, args.reps)
                tile = f"{t.block_n}x{t.block_k}w{t.num_warps}s{t.num_stages}"
                mark = "" if err < 2e-2 else "  WRONG"
                print(f"{name} {n}x{k} {qt} rows={rows} {route:5s} {tile:14s} {us:8.2f} us "
                      f"{nbytes / us / 1e3:7.0f} GB/s  err {err:.2e}{mark}")
                if err < 2e-2 and (route not in best or us < best[route][0]):
                    best[route] = (us, tile)
            if "gemv" in best and "gemv2" in best:
                print(f"  best: gemv {best['gemv'][0]:.2f} us ({best['gemv'][1]}), gemv2 "
                      f"{best['gemv2'][0]:.2f} us ({best['gemv2'][1]}): "
                      f"{best['gemv'][0] / best['gemv2'][0]:.2f}x")


if __name__ == "__main__":
    main()
