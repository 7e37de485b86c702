"""CUDA int4 kernels at the 8B Llama shapes: correctness, a tile sweep, and the alternatives.

For each projection (qkv, o, gate_up, down) and each row count (1 = decode b=1, 8/16/32 =
decode batches, 64 = a short prefill chunk, 2048 = a prefill chunk): the error of
``cuda_int4.int4_linear`` against a float64 reference, then the median time
(``triton.testing.do_bench``, which flushes L2 between runs) of each tile configuration of
the Triton kernels, of dequantise + cuBLAS, of PyTorch's ``_weight_int4pack_mm`` (tinygemm)
where it exists, and of cuBLAS on a bf16 copy. Prints one JSON line per (shape, rows) and a
markdown table; writes ``gpu_int4.json`` under ``--out``.

    python -m bench.gpu_int4 --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from pensieve.backends import cuda_int4
from pensieve.backends.cuda_int4 import Tiles

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
GEMV_TILES = [Tiles(1, bn, bg, w, st) for bn, bg, w, st in (
    (4, 16, 4, 3), (8, 16, 4, 2), (4, 8, 2, 3), (8, 8, 4, 3), (16, 8, 4, 3), (4, 32, 4, 2),
    (2, 32, 2, 3), (8, 32, 8, 2))]
# the factored tensor-core kernel: BLOCK_G groups unrolled per loop step
MATMUL_TILES = [Tiles(bm, bn, bg, w, st) for bm in (16,) for bn, bg, w, st in (
    (32, 2, 4, 3), (32, 4, 4, 3), (64, 2, 4, 3), (64, 4, 4, 3), (128, 2, 4, 3), (128, 4, 8, 3),
    (64, 2, 4, 4), (32, 8, 4, 2))]
CHUNK_TILES = [Tiles(32, 64, 2, 4, 3), Tiles(64, 64, 2, 4, 3), Tiles(64, 128, 2, 8, 3),
               Tiles(32, 128, 2, 4, 3)]
CANDIDATES = {
    1: [("gemv", t) for t in GEMV_TILES] + [("matmul", t) for t in MATMUL_TILES[2:4]],
    2: [("gemv", t) for t in GEMV_TILES[:2]] + [("matmul", t) for t in MATMUL_TILES],
    4: [("gemv", t) for t in GEMV_TILES[:1]] + [("matmul", t) for t in MATMUL_TILES],
    8: [("matmul", t) for t in MATMUL_TILES],
    16: [("matmul", t) for t in MATMUL_TILES],
    32: [("matmul", t) for t in MATMUL_TILES + CHUNK_TILES[:1]],
    64: [("matmul", t) for t in CHUNK_TILES],
    2048: [],
}


def run_kernel(kind: str, x, packed, so, t: Tiles):
    if kind == "gemv":
        return cuda_int4.gemv(x, packed, so, t)
    return cuda_int4.matmul(x, packed, so, t)


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def random_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda", generator=gen)
    scales = torch.rand(n, k // 32, device="cuda", generator=gen) * 0.004 + 0.001
    offsets = -8 * scales + torch.randn(n, k // 32, device="cuda", generator=gen) * 1e-3
    return cuda_int4.pack_codes(codes), cuda_int4.pack_scale_offset(scales, offsets)


def tinygemm(n: int, k: int, gen: torch.Generator):
    """PyTorch's int4 mm on random packed bytes (for time only), or None where missing."""
    try:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
        packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
        sz = torch.rand(k // 32, n, 2, device="cuda", dtype=torch.bfloat16, generator=gen)
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, 32, sz)
    except Exception as exc:  # noqa: BLE001 - an op this build lacks
        print(f"tinygemm unavailable: {type(exc).__name__}: {exc}"[:300], flush=True)
        return None


def one_shape(name: str, n: int, k: int, gen: torch.Generator,
              rows: tuple[int, ...] = ()) -> list[dict]:
    packed, so = random_weight(n, k, gen)
    weight = cuda_int4.unpack(packed, so)  # float32 on the GPU
    dense = weight.to(torch.bfloat16)
    int4_bytes = packed.numel() + so.numel() * 4
    tg = tinygemm(n, k, gen)
    rows_out = []
    for m, candidates in CANDIDATES.items():
        if rows and m not in rows:
            continue
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        ref = x.double() @ weight.double().T
        y = cuda_int4.int4_linear(x, packed, so)
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        row = {"shape": name, "N": n, "K": k, "rows": m, "rel_err": rel,
               "default_ms": bench(lambda: cuda_int4.int4_linear(x, packed, so)),
               "cublas_bf16_ms": bench(lambda: F.linear(x, dense))}
        timed = []
        for kind, t in candidates:
            try:
                out = run_kernel(kind, x, packed, so, t)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    print(f"{name} m={m} {kind} {t}: rel err {err}", flush=True)
                    continue
                timed.append((bench(lambda: run_kernel(kind, x, packed, so, t)), kind, t))
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile
                print(f"{name} m={m} {kind} {t}: {type(exc).__name__}: {exc}"[:300], flush=True)
        if timed:
            best_ms, kind, best = min(timed, key=lambda p: p[0])
            row.update(best_ms=best_ms, best=f"{kind} {list(vars(best).values())}",
                       all_ms={f"{k} {list(vars(t).values())}": round(ms, 4)
                               for ms, k, t in timed},
                       best_GBps=int4_bytes / best_ms / 1e6)
        if m >= 64:
            row["dequant_cublas_ms"] = bench(
                lambda: F.linear(x, cuda_int4.dequantize(packed, so, torch.bfloat16)))
            row["dequant_only_ms"] = bench(lambda: cuda_int4.dequantize(packed, so, torch.bfloat16))
        if tg is not None:
            try:
                row["tinygemm_ms"] = bench(lambda: tg(x))
            except Exception as exc:  # noqa: BLE001
                row["tinygemm_error"] = str(exc)[:120]
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    return rows_out


def table(rows: list[dict]) -> str:
    lines = ["| shape | rows | rel err | default ms | best ms (tiles) | GB/s | cuBLAS bf16 ms "
             "| dequant+cuBLAS ms | tinygemm ms |", "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r['rel_err']:.1e} | {r['default_ms']:.4f} | "
            f"{r.get('best_ms', float('nan')):.4f} {r.get('best', '')} | "
            f"{r.get('best_GBps', float('nan')):.0f} | "
            f"{r['cublas_bf16_ms']:.4f} | {r.get('dequant_cublas_ms', float('nan')):.4f} | "
            f"{r.get('tinygemm_ms', float('nan')):.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_int4")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="", help="only these row counts (comma-separated)")
    a = p.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in a.shapes.split(","):
        rows += one_shape(name, *SHAPES[name], gen,
                          tuple(int(r) for r in a.rows.split(",")) if a.rows else ())
        torch.cuda.empty_cache()
    Path(a.out, "gpu_int4.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
