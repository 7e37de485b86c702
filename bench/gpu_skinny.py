"""The tensor-core ``skinny`` int4 kernel (2-16 rows) at the 8B Llama shapes, on a GPU.

Per projection (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336): the error
against a float64 dequantised reference, then GPU µs per call at 8 rows (launches queued
behind a sleep kernel and cycled over 8 weight copies, so that each call reads its weight
from HBM as a decode step does, not from the 50 MB L2) for every ``SKINNY_SWEEP`` config
with 4 warps and 3 stages, then warps/stages variations of the best few; against tinygemm
and cuBLAS on a dense bf16 copy. Effective bandwidth counts the int4 codes plus the scale
pairs (4.5 bits a weight). Writes ``gpu_skinny.json`` under ``--out``.

    python -m bench.gpu_skinny --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pensieve.backends import cuda_int4, tinygemm
from pensieve.backends.cuda_int4 import SKINNY_SWEEP, Skinny, skinny

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
COPIES = 8


class W:
    def __init__(self, n: int, k: int, gen: torch.Generator) -> None:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda", generator=gen)
        scales = torch.rand(n, k // 32, device="cuda", generator=gen) * 0.004 + 0.001
        offsets = -8 * scales + torch.randn(n, k // 32, device="cuda", generator=gen) * 1e-3
        self.packed = cuda_int4.pack_codes(codes)
        self.so = cuda_int4.pack_scale_offset(scales, offsets)
        self.tiny = (tinygemm.pack(codes, scales, offsets)
                     if tinygemm.works() and tinygemm.supported(k) else None)
        self.dense = cuda_int4.dequantize(self.packed, self.so, torch.bfloat16)


def gpu_us(fn, ws: list[W], reps: int = 15) -> float:
    for w in ws:
        fn(w)
    samples = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)
        a.record()
        for _ in range(2):
            for w in ws:
                fn(w)
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / (2 * len(ws)))
    return sorted(samples)[reps // 2] * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_skinny")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--shapes", default=",".join(SHAPES))
    a = p.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "shapes": {}}
    best_all = {}
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        t0 = time.perf_counter()
        ws = [W(n, k, gen) for _ in range(COPIES)]
        nbytes = ws[0].packed.numel() + ws[0].so.numel() * 4
        x8 = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
        ref = x8.double() @ cuda_int4.unpack(ws[0].packed, ws[0].so).double().T
        row = {"bytes": nbytes}
        base = {}
        for label, fn in (("dense", lambda w: F.linear(x8, w.dense)),
                          ("tinygemm", (lambda w: w.tiny(x8)) if ws[0].tiny else None)):
            if fn is not None:
                base[label] = gpu_us(fn, ws)
        row["baselines_us_8rows"] = base
        sweep = {}
        first = [c for c in SKINNY_SWEEP if c.fits(k) and c.num_warps == 4 and c.num_stages == 3]

        def time_cfg(c: Skinny) -> None:
            try:
                y = skinny(x8, ws[0].packed, ws[0].so, c)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                us = gpu_us(lambda w: skinny(x8, w.packed, w.so, c), ws)
                sweep[c] = (us, err)
            except Exception as e:  # noqa: BLE001
                print(f"{name} {c}: {type(e).__name__}: {e}"[:300], flush=True)

        for c in first:
            time_cfg(c)
        top = sorted(sweep, key=lambda c: sweep[c][0])[:4]
        for c in top:
            for nw, ns in ((8, 3), (4, 4), (8, 4), (4, 2)):
                v = replace(c, num_warps=nw, num_stages=ns)
                if v not in sweep:
                    time_cfg(v)
        order = sorted(sweep, key=lambda c: sweep[c][0])
        best = order[0]
        best_all[name] = best
        row["sweep"] = [{**asdict(c), "us": round(sweep[c][0], 2), "TBps": round(nbytes / sweep[c][0] / 1e6, 3),
                         "rel_err": sweep[c][1]} for c in order]
        by_rows = {}
        for rows in (1, 2, 4, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            by_rows[rows] = {"skinny": gpu_us(lambda w: skinny(x, w.packed, w.so, best), ws),
                             "dense": gpu_us(lambda w: F.linear(x, w.dense), ws)}
            if ws[0].tiny:
                by_rows[rows]["tinygemm"] = gpu_us(lambda w: w.tiny(x), ws)
        row["best_by_rows_us"] = by_rows
        results["shapes"][name] = row
        print(f"{name} {n}x{k} ({time.perf_counter() - t0:.0f} s): baselines@8 "
              + ", ".join(f"{l} {u:.1f} µs" for l, u in base.items()), flush=True)
        for c in order[:8]:
            us, err = sweep[c]
            print(f"  {c}: {us:.1f} µs {nbytes / us / 1e6:.2f} TB/s err {err:.1e}", flush=True)
        print("  by rows (best):", json.dumps({r: {kk: round(v, 1) for kk, v in d.items()}
                                                for r, d in by_rows.items()}), flush=True)
        del ws
        torch.cuda.empty_cache()
    results["best"] = {k: asdict(v) for k, v in best_all.items()}
    print("BEST", json.dumps(results["best"]), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_skinny.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
