"""gpt-oss-20b's routed experts on ``pick_gemv``: MXFP4 as int8 codes against packed.

Int8 codes (``PENSIEVE_MXFP4_INT8=1``, 1.06 bytes a weight) against packed (``fp4``: the file's
two E2M1 codes a byte + an E8M0 byte per 32, 0.53 bytes a weight), GPU time and the bandwidth it
implies.

Shapes: hidden 2880, expert width 2880, 32 experts, top-4 (``--experts`` etc. change them), the
same random MXFP4 blocks (E8M0 exponents 118-122, |w| ~ 0.01-0.1) in both layouts, gpt-oss's
biases and clamped SwiGLU in the epilogues. Per token count (1 and 8 by default) and layout, the
median time of one call, replayed from a CUDA graph that runs 8 routings in turn (so that a call
does not find the experts the previous one left in L2), for:

* ``gate_up`` — ``pick_gemv`` fused (gate and up rows, bias, clamped SwiGLU): [P, 2880] out;
* ``down`` — ``pick_gemv`` routed (bias, routing weight): [P, 2880] out;
* ``moe`` — ``cuda_moe.moe_experts`` on the GEMV route (both launches and the sum of picks).

GB/s: the bytes of the distinct experts the routing hits (codes + scales; the least a call must
read from memory) over the time; ``pick GB/s`` counts each pick's expert again (what the GEMV
asks of L2/memory: a pick reads its expert whatever the others read). The two layouts' outputs
are compared (relative error; the run fails past 2e-2 in bfloat16). ``--sweep`` also times a
few ``pick_gemv`` tile sets per layout (the defaults were tuned on int8 codes).

    python -m bench.gpu_moe_mxfp4 --out "$OUT"     # markdown table on stdout, JSON in $OUT

(``--device cpu`` with ``TRITON_INTERPRET=1`` and tiny shapes runs the same plumbing untimed:
``tests/unit/test_cuda_moe_mxfp4.py`` checks the bench that way.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends import cuda_moe
from pensieve.backends.cuda_moe import CudaMoEExperts, Tiles
from pensieve.loaders.int4_codes import quant_groups

GLU = (1.702, 7.0)  # gpt-oss's (alpha, limit)
SETS = 8  # routings a timed call cycles through
SWEEP = [Tiles(1, bn, bk, w, st) for bn, bk, w, st in (
    (8, 512, 4, 2), (16, 256, 4, 2), (16, 512, 4, 2), (32, 256, 4, 2), (8, 1024, 4, 2),
    (32, 512, 8, 2), (4, 512, 2, 2), (16, 256, 4, 3))]


def mxfp4_codes(experts: int, rows: int, cols: int, seed: int, device: str):  # noqa: ANN201
    """[E·rows, cols] MXFP4 expert codes (the loader's int8 form, converted on ``device``)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(experts * rows * cols // 32, 17), dtype=np.uint8)
    raw[:, 0] = rng.integers(118, 123, size=raw.shape[0])
    return quant_groups(torch.from_numpy(raw.reshape(-1)).to(device), Q.MXFP4,
                        (experts, rows, cols)).groups


def layer(shapes: tuple, experts: int, biases: tuple, packed: bool, device: str
          ) -> CudaMoEExperts:
    """The experts in one layout: the loader's form and the module's under the env switch."""
    old = os.environ.get(cuda_moe.MXFP4_INT8_ENV)
    os.environ[cuda_moe.MXFP4_INT8_ENV] = "0" if packed else "1"
    try:
        codes = [mxfp4_codes(experts, rows, cols, seed, device)
                 for seed, (rows, cols) in enumerate(shapes, 1)]
        m = CudaMoEExperts(*codes, experts, gate_up_bias=biases[0], down_bias=biases[1],
                           glu=GLU).to(device)
    finally:
        if old is None:
            os.environ.pop(cuda_moe.MXFP4_INT8_ENV)
        else:
            os.environ[cuda_moe.MXFP4_INT8_ENV] = old
    want = "fp4" if packed else "int8"
    assert m.formats == ((want, 32, False),) * 2, m.formats
    return m


def timed_us(fn, reps: int, device: str) -> float:  # noqa: ANN001
    """The median µs of ``fn`` replayed from a CUDA graph; off CUDA one untimed-grade call."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return gpu_us(graphed(fn), reps)


def gpu_us(fn, reps: int) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graphed(fn):  # noqa: ANN001, ANN201
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def stack_bytes(st: cuda_moe.Stack, experts: int) -> float:
    """Bytes of one expert's slice of a stack (codes + scales)."""
    return (st.w.nbytes + st.s.nbytes + (0 if st.mn is None else st.mn.nbytes)) / experts


def calls(m: CudaMoEExperts, sets: list, tiles: Tiles | None):  # noqa: ANN201
    """{part: a function running it over every routing set} for one layer."""
    gu, dn = m.stacks()
    e = m.num_experts
    bufs = []
    for x, w, ids in sets:
        t, k = ids.shape
        h = torch.empty(t * k, gu.n // 2, device=x.device, dtype=x.dtype)
        y = torch.empty(t * k, dn.n, device=x.device, dtype=x.dtype)
        bufs.append((x, w.reshape(-1).contiguous(), ids.reshape(-1).contiguous(), k, h, y))

    def gate_up() -> None:
        for x, rw, flat, k, h, _ in bufs:
            cuda_moe.pick_gemv(x, flat, rw, gu, h, topk=k, gather=True, fuse=True, routed=False,
                               t=tiles or cuda_moe.gemv_tiles(flat.numel(), gu.fp4), glu=m.glu)

    def down() -> None:
        for _, rw, flat, k, h, y in bufs:
            cuda_moe.pick_gemv(h, flat, rw, dn, y, topk=k, gather=False, fuse=False, routed=True,
                               t=tiles or cuda_moe.gemv_tiles(flat.numel(), dn.fp4))

    def moe() -> None:
        for x, w, ids in sets:
            cuda_moe.moe_experts(x, w, ids, gu, dn, e, route="gemv", glu=m.glu)

    return {"gate_up": gate_up, "down": down, "moe": moe}


def run(a: argparse.Namespace) -> list[dict]:
    e, hd, inner, k, dev = a.experts, a.hidden, a.inner, a.top_k, a.device
    shapes = ((inner, hd), (inner, hd), (hd, inner))  # gate, up, down: the same blocks twice
    g = torch.Generator().manual_seed(0)
    biases = (torch.randn(e, 2 * inner, generator=g) * 0.1, torch.randn(e, hd, generator=g) * 0.1)
    layers = {"int8": layer(shapes, e, biases, False, dev),
              "fp4": layer(shapes, e, biases, True, dev)}
    gu8, dn8 = (t.float() for t in layers["int8"].dequantize())
    gu4, dn4 = (t.float() for t in layers["fp4"].dequantize())
    assert torch.equal(gu8, gu4) and torch.equal(dn8, dn4), "the layouts hold different values"
    del gu8, dn8, gu4, dn4
    results = []
    for tokens in (int(t) for t in a.tokens.split(",")):
        gen = torch.Generator(device=dev).manual_seed(tokens)
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # (the interpreter: float32)
        sets = []
        for _ in range(SETS if dev == "cuda" else 2):
            x = torch.randn(tokens, hd, device=dev, generator=gen).to(dtype)
            logits = torch.randn(tokens, e, device=dev, generator=gen)
            w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
            sets.append((x, (w / w.sum(-1, keepdim=True)).to(dtype), ids))
        hit = sum(int(ids.unique().numel()) for _, _, ids in sets) / len(sets)
        picks = tokens * k
        x, w, ids = sets[0]
        outs = {n: cuda_moe.moe_experts(x, w, ids, *m.stacks(), e, route="gemv", glu=GLU).float()
                for n, m in layers.items()}
        err = ((outs["fp4"] - outs["int8"]).norm() / outs["int8"].norm()).item()
        for name, m in layers.items():
            gu, dn = m.stacks()
            part_bytes = {"gate_up": stack_bytes(gu, e), "down": stack_bytes(dn, e)}
            part_bytes["moe"] = part_bytes["gate_up"] + part_bytes["down"]
            for part, fn in calls(m, sets, None).items():
                us = timed_us(fn, a.reps, dev) / len(sets)
                row = {"layout": name, "tokens": tokens, "part": part, "us": us,
                       "experts_hit": hit, "expert_bytes": part_bytes[part],
                       "gb_s": hit * part_bytes[part] / us / 1e3,
                       "pick_gb_s": picks * part_bytes[part] / us / 1e3, "rel_err_vs_int8": err}
                if a.sweep and part != "moe":
                    best = (float("inf"), None)
                    for t in SWEEP:
                        try:
                            t_us = timed_us(calls(m, sets, t)[part], a.reps, dev) / len(sets)
                        except Exception as exc:  # noqa: BLE001 - a tile that does not build
                            print(f"{name} {part} {t}: {type(exc).__name__}", file=sys.stderr)
                            continue
                        best = min(best, (t_us, t), key=lambda b: b[0])
                    if best[1] is not None:
                        t = best[1]
                        row["sweep_best_us"] = best[0]
                        row["sweep_best_tiles"] = (f"{t.block_n}/{t.block_k} w{t.num_warps} "
                                                   f"s{t.num_stages}")
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
    return results


def table(rows: list[dict]) -> str:
    out = ["| tokens | part | layout | µs | GB/s (distinct experts) | pick GB/s | sweep best |",
           "|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        sweep = (f"{r['sweep_best_us']:.1f} µs ({r['sweep_best_tiles']})"
                 if "sweep_best_us" in r else "")
        out.append(f"| {r['tokens']} | {r['part']} | {r['layout']} | {r['us']:.1f} | "
                   f"{r['gb_s']:.0f} | {r['pick_gb_s']:.0f} | {sweep} |")
    speed = []
    for tokens in sorted({r["tokens"] for r in rows}):
        for part in ("gate_up", "down", "moe"):
            t = {r["layout"]: r["us"] for r in rows if r["tokens"] == tokens and r["part"] == part}
            if len(t) == 2:
                speed.append(f"{tokens} tok {part}: int8 {t['int8']:.1f} µs → fp4 "
                             f"{t['fp4']:.1f} µs ({t['int8'] / t['fp4']:.2f}×)")
    errs = {r["tokens"]: r["rel_err_vs_int8"] for r in rows}
    return "\n".join(out + [""] + speed + [f"fp4 vs int8 output rel err: {errs}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--inner", type=int, default=2880)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--out", default=None, help="a folder for gpu_moe_mxfp4.json")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the plumbing "
                   "(TRITON_INTERPRET=1, tiny shapes: times meaningless)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = run(a)
    name = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    print(f"{name}; experts {a.experts}, hidden {a.hidden}, "
          f"inner {a.inner}, top-{a.top_k}; bf16 activations")
    print(table(rows))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu_moe_mxfp4.json").write_text(json.dumps(
            {"device": name, "args": vars(a), "rows": rows}, indent=1))
    bad = [r for r in rows if r["rel_err_vs_int8"] > 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
