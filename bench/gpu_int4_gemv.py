"""The int4 GEMV candidates for 1-16 rows, per weight shape: µs and GB/s of each against a
pure-bandwidth roofline (a torch copy of the same bytes), GPU time only (8 layers of a shape
back to back, launches queued behind a sleep as in ``cuda_int4_tune``).

Shapes: the random Llama-3-8B Q4_0 body (float16 scales alone) and Qwen3-8B's in Q4_K's form
(scale and offset pairs), N × K of the fused projections; ``qwen3_30b``: Qwen3-30B-A3B's
attention projections (Q4_K's form).
Kernels: ``gemv_split``'s start-time candidates (``--sweep``: its larger sweep; up to 8 rows),
the ``gemv_words`` tiles, the wide-x-load ``gemv_wide`` candidates and the older ``gemv`` (1-2
rows: they read the weight once a row), and from 2 rows the ``skinny`` candidates and the
``gemv_rows`` candidates of the rows' bucket (``cuda_int4_rows``; ``--sweep``: its 8-row sweep
too) and the ``skinny2`` candidates (``cuda_int4_skinny2``; ``--sweep``: its sweep); at the
gate/up shapes, 1 row with SiLU·up (the wide tiles' one-launch SwiGLU form against the GEMVs
+ ``silu_mul``). Defaults: rows 1 and 8, every candidate printed (µs, GB/s, % of the copy); in
gpu_session give it KERNEL_TIMEOUT=240. ``--kernels`` keeps some families (the first
word of a line: split, words, wide, gemv, rows, skinny, skinny2; swiglu for the SiLU·up table).

    python -m bench.gpu_int4_gemv --out "$OUT"            # table + gpu_int4_gemv.json
    python -m bench.gpu_int4_gemv --rows 2,4,8 --kernels rows,skinny,split --out "$OUT"
    python -m bench.gpu_int4_gemv --rows 4,8,16 --kernels skinny2,skinny,rows --out "$OUT"
    python -m bench.gpu_int4_gemv --sweep --rows 1 --shapes llama8b
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

SHAPES = {
    "llama8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "qwen3_8b": [(5120, 4096), (4096, 4096), (24576, 4096), (4096, 12288)],
    "qwen3_30b": [(5120, 2048), (2048, 4096)],  # Qwen3-30B-A3B's attention qkv and o
}


AFFINE = {"qwen3_8b", "qwen3_30b"}  # Q4_K's form: a float16 (scale, offset) pair a group


def layers_of(n: int, k: int, count: int, gen: torch.Generator, affine: bool = False) -> list:
    from pensieve.backends.cuda_int4 import CudaInt4Linear
    from pensieve.models.quant_linear import Int4Groups

    out = []
    for _ in range(count):  # Q4_0: float16 scales alone; affine: Q4_K's pairs
        scales = torch.rand(n, k // 32, device="cuda", generator=gen) * 0.004 + 0.001
        offsets = -8 * scales
        if affine:
            offsets = offsets + torch.randn(n, k // 32, device="cuda", generator=gen) * 1e-3
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda", generator=gen)
        out.append(CudaInt4Linear([Int4Groups(codes, scales, offsets, 32)]).cuda())
    return out


GATE_UP = (28672, 24576)  # the fused gate/up shapes: their SiLU·up form is timed too


def swiglu_table(layers: list, k: int, reps: int, nbytes: int, roof: float) -> dict:
    """1 row of a gate/up weight: each wide tile's one-launch SiLU·up form against the same
    tile and ``gemv_words`` / ``gemv`` followed by ``silu_mul`` (what the decode MLP runs)."""
    from pensieve.backends import cuda_int4, cuda_int4_gemv_wide
    from pensieve.backends.cuda_int4_tune import gpu_us
    from pensieve.backends.cuda_layers import silu_mul

    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    first = layers[0]
    runs = {"gemv + silu_mul": lambda m: silu_mul(cuda_int4.gemv(x, m.packed, m.scale_offset)),
            "words + silu_mul": lambda m: silu_mul(cuda_int4.gemv_words(x, m.packed,
                                                                        m.scale_offset))}
    for c in cuda_int4_gemv_wide.CANDIDATES:
        runs[f"wide {c} + silu_mul"] = (lambda m, c=c: silu_mul(cuda_int4_gemv_wide.gemv_wide(
            x, m.packed, m.scale_offset, c)))
        runs[f"swiglu {c}"] = (lambda m, c=c: cuda_int4_gemv_wide.gemv_wide(
            x, m.packed, m.scale_offset, c, swiglu=True))
    ref = runs["gemv + silu_mul"](first).float()
    times = {}
    for name, run in runs.items():
        try:
            err = ((run(first).float() - ref).norm() / ref.norm()).item()
        except Exception as e:  # a tile Triton cannot build here
            print(f"    {name}: failed ({str(e).splitlines()[0][:60] if str(e) else e!r})")
            continue
        if err < 2e-2:
            times[name] = gpu_us(run, layers, reps)
        else:
            print(f"    {name}: relative error {err:.3g}")
    print("  ×1 gate/up with SiLU·up:", flush=True)
    for name, t in sorted(times.items(), key=lambda kv: kv[1])[:10]:
        print(f"    {t:7.1f} µs {nbytes / t / 1e3:6.0f} GB/s "
              f"({nbytes / t / 1e3 / roof:4.0%} of copy)  {name}", flush=True)
    return {name: {"us": t} for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    from pensieve.backends import (
        cuda_int4, cuda_int4_gemv, cuda_int4_gemv_wide, cuda_int4_rows, cuda_int4_skinny2,
    )
    from pensieve.backends.cuda_int4_tune import _checked, gpu_us

    p = argparse.ArgumentParser(prog="python -m bench.gpu_int4_gemv")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="1,8")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--kernels", default="",
                   help="only these kernel families, e.g. rows,skinny (default: all)")
    p.add_argument("--sweep", action="store_true",
                   help="gemv_split's sweep (and gemv_rows' at 8 rows), not the start-time ones")
    a = p.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cands = cuda_int4_gemv.SWEEP if a.sweep else cuda_int4_gemv.CANDIDATES
    result = {"gpu": torch.cuda.get_device_name(0), "rows": {}, "shapes": {}}
    seen = set()
    for model in a.shapes.split(","):
        for n, k in SHAPES[model]:
            if (n, k) in seen:
                continue
            seen.add((n, k))
            layers = layers_of(n, k, a.layers, gen, affine=model in AFFINE)
            nbytes = layers[0].packed.nbytes + layers[0].scale_offset.nbytes
            src = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in layers]
            dst = [torch.empty_like(s) for s in src]
            pairs = dict(zip(map(id, layers), zip(src, dst)))
            copy_us = gpu_us(lambda m: pairs[id(m)][1].copy_(pairs[id(m)][0]), layers, a.reps)
            roof = 2 * nbytes / copy_us / 1e3  # GB/s: a copy reads and writes the bytes
            key = f"{n}x{k}"
            entry = {"mb": nbytes / 1e6, "copy_us": copy_us, "copy_gbs": roof, "rows": {}}
            print(f"{model} {key} ({'Q4_K pairs' if model in AFFINE else 'Q4_0'}): "
                  f"{nbytes / 1e6:.1f} MB a layer; copy {copy_us:.1f} µs "
                  f"({roof:.0f} GB/s read+write)", flush=True)
            for rows in map(int, a.rows.split(",")):
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                ref = torch.nn.functional.linear(
                    x.float(), cuda_int4.dequantize(layers[0].packed, layers[0].scale_offset,
                                                    torch.float32))
                runs = {}
                if rows <= cuda_int4_gemv.MAX_ROWS:
                    for c in cands:
                        runs[f"split {c}"] = (lambda m, c=c, x=x: cuda_int4_gemv.gemv_split(
                            x, m.packed, m.scale_offset, c))
                if rows <= 2:  # the 1-row kernels read the weight once a row
                    for c in cuda_int4.WORDS_CANDIDATES:
                        runs[f"words {c}"] = (lambda m, c=c, x=x: cuda_int4.gemv_words(
                            x, m.packed, m.scale_offset, c))
                    if cuda_int4_gemv_wide.fits(x, k):
                        for c in cuda_int4_gemv_wide.CANDIDATES:
                            runs[f"wide {c}"] = (lambda m, c=c, x=x: cuda_int4_gemv_wide.gemv_wide(
                                x, m.packed, m.scale_offset, c))
                    runs["gemv"] = lambda m, x=x: cuda_int4.gemv(x, m.packed, m.scale_offset)
                    runs["gemv prefetch"] = lambda m, x=x: cuda_int4.gemv(
                        x, m.packed, m.scale_offset, prefetch=True)
                if 1 < rows <= cuda_int4_rows.MAX_ROWS:
                    bucket = next(b for b in sorted(cuda_int4_rows.CANDIDATES) if rows <= b)
                    rcands = list(cuda_int4_rows.CANDIDATES[bucket])
                    if a.sweep and rows == 8:
                        rcands += [c for c in cuda_int4_rows.SWEEP if c not in rcands]
                    for c in rcands:
                        if cuda_int4_rows.fits(c, rows, n, k):
                            runs[f"rows {c}"] = (lambda m, c=c, x=x: cuda_int4_rows.gemv_rows(
                                x, m.packed, m.scale_offset, c))
                if 1 < rows <= cuda_int4_skinny2.MAX_ROWS:
                    s2 = cuda_int4_skinny2.SWEEP if a.sweep else cuda_int4_skinny2.CANDIDATES
                    for c in s2:
                        if cuda_int4_skinny2.fits(c, rows, k):
                            runs[f"skinny2 {c}"] = (lambda m, c=c, x=x: cuda_int4_skinny2.skinny2(
                                x, m.packed, m.scale_offset, c))
                if rows > 1:
                    for c in cuda_int4.SKINNY_CANDIDATES:
                        if c.fits(k):
                            runs[f"skinny {c}"] = (lambda m, c=c, x=x: cuda_int4.skinny(
                                x, m.packed, m.scale_offset, c))
                if a.kernels:
                    keep = tuple(a.kernels.split(","))
                    runs = {name: run for name, run in runs.items()
                            if name.split(" ")[0] in keep}
                times = {}
                for name, run in runs.items():
                    if _checked(run, layers[0], ref, name):
                        times[name] = gpu_us(run, layers, a.reps)
                best = sorted(times.items(), key=lambda kv: kv[1])
                entry["rows"][rows] = {name: {"us": t, "gbs": nbytes / t / 1e3}
                                       for name, t in best}
                print(f"  ×{rows}:", flush=True)
                for name, t in best:
                    print(f"    {t:7.1f} µs {nbytes / t / 1e3:6.0f} GB/s "
                          f"({nbytes / t / 1e3 / roof:4.0%} of copy)  {name}", flush=True)
            if n in GATE_UP and (not a.kernels or "swiglu" in a.kernels.split(",")):
                entry["swiglu"] = swiglu_table(layers, k, a.reps, nbytes, roof)
            result["shapes"][key] = entry
            del layers, src, dst, pairs
            torch.cuda.empty_cache()
    Path(a.out, "gpu_int4_gemv.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
