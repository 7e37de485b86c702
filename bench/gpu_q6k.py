"""Q6_K kernels on CUDA at Qwen3-8B's Q6_K shapes and a Qwen vocabulary head, in process
(``backends/cuda_q6k.py``).

Per shape: the plan ``cuda_q6k_tune`` makes at start (one choice per row bucket) and the
``dequant`` kernel alone (the weight to bf16, what the dequant route pays before cuBLAS). Per row
count: the planned route's GPU µs (medians, launches queued behind a sleep as in a CUDA graph:
``cuda_int4_tune.gpu_us``) and the bandwidth the Q6_K bytes make of it, then each route on its
own — ``gemv`` (≤ 4 rows), ``split`` (≤ 16, the split-K FMA GEMV), ``rows`` (≤ 16, swap-AB
tensor cores on the code words, ``cuda_q6k_rows``), ``skinny2`` (≤ 16, the codes made
mma.sync operands, ``cuda_q6k_skinny2``), ``skinny`` (≤ 32, the plan's tiles), the
dequantising ``gemm``,
``dequant`` + cuBLAS — against the int8 layout Q6_K had before (``cuda_int8``, 1.4× the bytes)
and cuBLAS on a dense bf16 copy (3.1× the bytes; what no default path keeps). At each row count
up to 16 every candidate the tuner races there — ``gemv`` (1-2 rows), ``split`` (that bucket's
tiles), ``rows`` (1-16), every 16-row ``skinny`` (2-16) — each in µs, GB/s of the Q6_K bytes and
% of a device copy of the same bytes (read + write), then each family's best and rows' best
against skinny's. ``--sweep``: every tuner candidate of the routes that apply, per row count,
the fastest five.

    python -m bench.gpu_q6k                 # the table at 1, 2, 4, 8, 16 rows
    python -m bench.gpu_q6k --rows 4,8,16   # the 4-16 row race (rows vs skinny vs split)
    python -m bench.gpu_q6k --rows 1,2,4,8,16,32,256,2048
    python -m bench.gpu_q6k --sweep --reps 20 --shapes ffn_down
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

SHAPES = {"attn_v": (1024, 4096), "ffn_down": (4096, 12288), "output": (151936, 4096)}
ROWS = (1, 2, 4, 8, 16)


def q6k_groups(n: int, k: int, seed: int):
    from gguf import GGMLQuantizationType as Q

    from bench.make_random_gguf import random_q6_k_blocks
    from pensieve.loaders.int4_codes import quant_groups

    gen = torch.Generator().manual_seed(seed)
    raw = torch.from_numpy(random_q6_k_blocks((n, k), gen, "cpu", []).reshape(-1))
    return quant_groups(raw, Q.Q6_K, (n, k))


def routes(rows: int, plan: dict) -> dict[str, tuple]:
    """Each route that applies at ``rows`` rows, with the plan's tiles where it has them."""
    from pensieve.backends import cuda_q6k as q
    from pensieve.backends.cuda_q6k_tune import ROWS_CANDIDATES, SPLIT_CANDIDATES

    def planned(name: str, b: int, default):
        return plan[b][1] if plan[b][0] == name else default
    out = {}
    if rows <= 4:
        out["gemv"] = ("gemv", planned("gemv", 1, q.GEMV))
    if rows <= 16:
        b = q.bucket(rows)
        out["split"] = ("split", planned("split", b, SPLIT_CANDIDATES[b][0]))
        out["rows"] = ("rows", planned("rows", b, ROWS_CANDIDATES[0]))
        from pensieve.backends.cuda_q6k_skinny2 import CANDIDATES as SKINNY2

        out["skinny2"] = ("skinny2", planned("skinny2", b, SKINNY2[0]))
        out["skinny"] = ("skinny", planned("skinny", b, q.SKINNY16))
    elif rows <= 32:
        out["skinny"] = ("skinny", planned("skinny", 32, q.SKINNY32))
    out["gemm"] = ("gemm", q.GEMM16 if rows <= 16 else q.GEMM_SMALL if rows <= 256 else q.GEMM)
    out["dequant"] = ("dequant", planned("dequant", 2048, q.DEQUANT))
    return out


def sweep(rows: int, n: int) -> list[tuple]:
    from pensieve.backends import cuda_q6k_skinny2
    from pensieve.backends import cuda_q6k_tune as tune
    from pensieve.backends.cuda_q6k import skinny_fits

    out = [("dequant", t) for t in tune.DEQUANT_CANDIDATES]
    if rows <= 2:
        out += [("gemv", t) for t in tune.GEMV_CANDIDATES]
    if rows <= 16:
        out += [("split", t) for t in tune.SPLIT_CANDIDATES[next(b for b in tune.SPLIT_CANDIDATES
                                                                   if rows <= b)]]
    out += [("rows", t) for t in tune.ROWS_CANDIDATES if t.block_m >= rows]
    if rows <= 16:  # skinny2: the codes made mma.sync operands (cuda_q6k_skinny2)
        out += [("skinny2", t) for t in cuda_q6k_skinny2.CANDIDATES]
    if rows <= 32:
        out += [("skinny", t) for bm, ts in tune.SKINNY_CANDIDATES.items() for t in ts
                if rows <= bm and skinny_fits(t, n)]
    bucket = next((b for b in tune.GEMM_CANDIDATES if rows <= b), 2048)
    return out + [("gemm", t) for t in tune.GEMM_CANDIDATES[bucket]]


def each_tile(rows: int, n: int, x, w, layers, reps: int, nbytes: int,  # noqa: ANN001
              roof: float, ref) -> None:
    """Every candidate the tuner races at ``rows`` (≤ 16) — µs, GB/s, % of a copy, each
    checked against ``ref`` (the float32 product) — then each family's best."""
    from pensieve.backends import cuda_q6k_skinny2
    from pensieve.backends import cuda_q6k_tune as tune
    from pensieve.backends.cuda_int4_tune import gpu_us
    from pensieve.backends.cuda_q6k import launch, skinny_fits
    from pensieve.backends.cuda_q6k_tune import describe

    from pensieve.backends.cuda_q6k import bucket

    cands = [("gemv", t) for t in tune.GEMV_CANDIDATES] if rows <= 2 else []
    cands += [("split", t) for t in tune.SPLIT_CANDIDATES[bucket(rows)]]
    cands += [("rows", t) for t in tune.ROWS_CANDIDATES if t.block_m >= rows]
    cands += [("skinny2", t) for t in cuda_q6k_skinny2.CANDIDATES]  # raced at 4-16 rows
    if rows >= 2:
        cands += [("skinny", t) for t in tune.SKINNY_CANDIDATES[16] if skinny_fits(t, n)]
    best: dict[str, tuple[float, str]] = {}
    for c in cands:
        try:
            us = gpu_us(lambda m, c=c: launch(c, x, w), layers, reps)
            y = launch(c, x, w).float()
            err = ((y - ref).norm() / ref.norm()).item()
        except Exception as e:  # a tile Triton cannot build here
            print(f"    {describe(c)}: failed ({str(e).splitlines()[0][:60] if str(e) else e!r})")
            continue
        gbs = nbytes / us / 1e3
        wrong = "" if err < 2e-2 else f"  WRONG (rel err {err:.1e}: the tuner leaves it out)"
        print(f"    ×{rows} {us:8.1f} µs {gbs:6.0f} GB/s ({gbs / roof:4.0%} of copy)  "
              f"{describe(c)} {c[1]}{wrong}", flush=True)
        if not wrong and us < best.get(c[0], (float("inf"), ""))[0]:
            best[c[0]] = (us, describe(c))
    line = ", ".join(f"{name} {us:.1f} µs ({nbytes / us / 1e3:.0f} GB/s, {d})"
                     for name, (us, d) in best.items())
    for other in ("skinny", "split", "gemv"):
        if "rows" in best and other in best:
            line += f"; rows/{other} speed-up {best[other][0] / best['rows'][0]:.2f}×"
    if "skinny2" in best and "rows" in best:
        line += f"; skinny2/rows speed-up {best['rows'][0] / best['skinny2'][0]:.2f}×"
    print(f"    ×{rows} best: {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_q6k", description=__doc__)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--shapes", default=",".join(SHAPES))
    a = p.parse_args(argv)
    from pensieve.backends import cuda_q6k
    from pensieve.backends.cuda_int4_tune import gpu_us
    from pensieve.backends.cuda_int8 import CudaInt8Linear
    from pensieve.backends.cuda_q6k import CudaQ6KLinear, launch
    from pensieve.backends.cuda_q6k_rows import rows_workspace
    from pensieve.backends.cuda_q6k_split import split_workspace
    from pensieve.backends.cuda_q6k_tune import describe, plan_shape

    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(dev), "torch", torch.__version__)
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        g = q6k_groups(n, k, seed=n)
        layers = [CudaQ6KLinear(g).to(dev, dt)]
        cuda_q6k.skinny_workspace(dev, n)
        split_workspace(dev, n)
        rows_workspace(dev, n)
        plan = plan_shape(layers, dt, a.reps, gpu_us)  # what a start would choose
        layers[0].plan = plan
        print(name, "plan:", ", ".join(f"{b}: {describe(c)}" for b, c in plan.items()))
        w = layers[0].weight_buffers()
        dq = routes(2048, plan)["dequant"][1]
        t_dq = gpu_us(lambda m: cuda_q6k.dequant_weight(w, dt, dq), layers, a.reps)
        print(f"  dequant to bf16 alone: {t_dq:.1f} µs ({n * k * 2 / t_dq / 1e3:.0f} GB/s "
              f"written; {describe(('dequant', dq))})")
        old = [CudaInt8Linear(g).to(dev, dt)]
        dense = layers[0].dequantize().to(dt)
        q6_bytes = cuda_q6k.layout_bytes(n, k)
        src = torch.empty(q6_bytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_us = gpu_us(lambda m: dst.copy_(src), layers, a.reps)
        roof = 2 * q6_bytes / copy_us / 1e3
        print(f"  copy of the {q6_bytes / 1e6:.1f} MB: {copy_us:.1f} µs "
              f"({roof:.0f} GB/s read+write)")
        for rows in map(int, a.rows.split(",")):
            x = torch.randn(rows, k, device=dev, dtype=dt)
            ref = F.linear(x.float(), dense.float())
            err = ((layers[0](x).float() - ref).norm() / ref.norm()).item()
            t_new = gpu_us(lambda m: m(x), layers, a.reps)
            each = []
            for route, choice in routes(rows, plan).items():
                try:
                    us = gpu_us(lambda m, c=choice: launch(c, x, w), layers, a.reps)
                    each.append(f"{route} {us:.1f}")
                except Exception as e:  # a tile Triton cannot build here
                    why = str(e).splitlines()[0][:60] if str(e) else repr(e)
                    each.append(f"{route} failed ({why})")
            t_old = gpu_us(lambda m: m(x), old, a.reps)
            t_dense = gpu_us(lambda m: F.linear(x, dense), layers, a.reps)
            print(f"{name:8} {n:6}x{k:<5} rows {rows:4}: q6k {t_new:8.1f} µs "
                  f"({q6_bytes / t_new / 1e3:6.0f} GB/s, {describe(plan[cuda_q6k.bucket(rows)])}, "
                  f"err {err:.1e})  int8 {t_old:8.1f}  bf16 cuBLAS {t_dense:8.1f}  | "
                  + ", ".join(each))
            if rows <= 16 and not a.sweep:
                each_tile(rows, n, x, w, layers, a.reps, q6_bytes, roof, ref)
            if not a.sweep:
                continue
            times = []
            for c in sweep(rows, n):
                try:
                    times.append((gpu_us(lambda m, c=c: launch(c, x, w), layers, a.reps), c))
                except Exception as e:  # a tile Triton cannot build here
                    print(f"    {describe(c)}: {str(e).splitlines()[0] if str(e) else e!r}")
            for us, c in sorted(times, key=lambda r: r[0])[:5]:
                print(f"    {us:8.1f} µs  {describe(c)}  {c[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
