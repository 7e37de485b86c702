"""The int4 kernels ``cuda_int4_tune`` chooses from, timed per weight shape of the 8B Llama,
Qwen3-8B and Qwen2.5-7B bodies on random codes (8 layers of a shape back to back, GPU time
only), with the opt-in tinygemm and dense copies made so that they are timed beside them.

    python -m bench.gpu_int4_plan --out "$OUT"      # prints the plans; gpu_int4_plan.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

SHAPES = {  # (N, K) of the fused projections: qkv, o, gate_up, down
    "llama8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "qwen3_8b": [(24576, 4096), (4096, 12288)],  # qkv and o as the 8B's
    "qwen25_7b": [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)],
}


def main(argv: list[str] | None = None) -> int:
    from pensieve.backends.cuda_int4 import CudaInt4Linear, skinny_workspace
    from pensieve.backends.cuda_int4_tune import _keep_dense, plan_shape
    from pensieve.models.quant_linear import Int4Groups

    p = argparse.ArgumentParser(prog="python -m bench.gpu_int4_plan")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--no-copies", action="store_true", help="without tinygemm/dense copies")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"gpu": torch.cuda.get_device_name(0), "shapes": {}}
    for model in a.models.split(","):
        for n, k in SHAPES[model]:
            layers = []
            for _ in range(a.layers):
                scales = torch.rand(n, k // 32, device="cuda", generator=gen) * 0.004 + 0.001
                codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda", generator=gen)
                layers.append(CudaInt4Linear([Int4Groups(codes, scales, -8 * scales, 32)]).cuda())
                del codes
            if not a.no_copies:
                _keep_dense(layers, torch.bfloat16, torch.device("cuda"))
            skinny_workspace(torch.device("cuda"), n)
            plan, note = plan_shape(layers, torch.bfloat16, 15)
            gb = layers[0].packed.nbytes + layers[0].scale_offset.nbytes
            print(f"{model} {n}x{k} ({gb / 1e6:.1f} MB of codes a layer): {note}", flush=True)
            result["shapes"][f"{model} {n}x{k}"] = {"mb": gb / 1e6, "plan": note}
            del layers
            torch.cuda.empty_cache()
    Path(a.out, "gpu_int4_plan.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
