"""In-process GPU timings of one MoE layer's routed experts at Qwen3-30B-A3B's shapes
(128 experts, top-8, hidden 2048, expert width 768): the fused kernels over GGUF codes
(``backends/cuda_moe.py``) against the dequantised bfloat16 baselines.

Per token count (1, 8, 32, 512, 2048 by default) and code mix (Q4_K gate/up with Q6_K or Q4_K
down; Q4_K in the kernels' ``q4k`` layout, the file's own factors, or with
``PENSIEVE_MOE_Q4K_SUPER=0`` in the int4 layout: the ``layout`` column says which), the median
GPU time of:

* ``codes graph`` — ``moe_experts`` replayed from a CUDA graph (as the decode graphs run it: no
  Python launch cost), and ``codes eager``;
* ``bf16 loop`` — ``models.moe.Experts``' loop over bf16 stacked weights (one matmul pair per
  expert, the counts read on the host: the float path today);
* ``bf16 grouped_mm`` — ``torch._grouped_mm`` over the same bf16 weights on the sorted rows
  (where this torch has it): a dense grouped GEMM baseline.

Also the weight bytes the codes path must read (the distinct experts hit × their code bytes)
and the bandwidth that time implies. Routing is random (uniform logits); up to 32 tokens each
timed call cycles through 8 routings (times are per routing), so that a call does not read the
experts the previous one left in L2 (a token's 8 experts fit in an H100's 50 MB). Up to 32
tokens the routes are also forced (pick GEMV vs sort + grouped GEMM, and at 2-16 tokens the
expert-major GEMVs: ``cuda_moe_expert``'s on the tensor cores, ``experts``, and
``cuda_moe_rows``' on the CUDA cores, ``rows`` — its constants, then each of
``cuda_moe_tune.ROWS_CANDIDATES`` as ``rows RxNxKwW``); ``--sweep`` times a few tile sets of
the route the default takes.

``--routes``: instead, the candidates ``cuda_moe_tune`` races at start, per decode bucket
(1-64 tokens), at gpt-oss-20b's (packed MXFP4, biases, clamped SwiGLU), GLM-4.7-Flash's and
Qwen3-30B-A3B's (Q4_K gate/up + Q6_K down) expert shapes: each candidate's µs a layer call
(``cuda_moe_tune.graph_us``: 8 uniform routings over ``--layers`` copies of the layer in one
CUDA graph), the one the start would choose and the constant rule's, in ``gpu_moe_routes.md``
/ ``.json``. (``--tiny --device cpu`` under ``TRITON_INTERPRET=1``: the same plumbing on tiny
shapes, wall-clock "times"; the tests run it.)

    python -m bench.gpu_moe_kernels --out "$OUT"   # prints a markdown table, writes JSON
    python -m bench.gpu_moe_kernels --routes --out "$OUT"   # the start's route race per bucket
    python -m bench.gpu_moe_kernels --experts 32 --hidden 2880 --inner 2880 --top-k 4 \
        --mixes mxfp4+mxfp4 --out "$OUT"   # gpt-oss-20b's experts (int8 codes; SiLU here)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from pensieve.backends import cuda_moe, cuda_moe_tune
from pensieve.backends.cuda_moe import CudaMoEExperts
from pensieve.loaders.int4_codes import quant_groups

SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.Q8_0: (0,), Q.Q4_0: (0,)}


def random_codes(qtype: Q, rows: int, cols: int, seed: int, experts: int = 1):
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    if qtype is Q.MXFP4:  # E8M0 exponents of |w| ~ 0.01-0.1; kept as 3-D experts only
        raw[:, 0] = rng.integers(118, 123, size=raw.shape[0])
        return quant_groups(torch.from_numpy(raw.reshape(-1)), qtype,
                            (experts, rows // experts, cols)).groups
    for at in SCALES[qtype]:
        raw[:, at:at + 2] = rng.uniform(1e-4, 5e-4, size=(raw.shape[0], 1)).astype(
            np.float16).view(np.uint8)
    return quant_groups(torch.from_numpy(raw.reshape(-1)), qtype, (rows, cols))


def gpu_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def float_loop(x, w, ids, gate_up, down):
    """models.moe.Experts' forward (its loop reads the counts on the host)."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    tokens = order // k
    rows = x[tokens]
    out = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=gate_up.shape[0]).tolist()):
        if n:
            g, u = F.linear(rows[start:start + n], gate_up[e]).chunk(2, dim=-1)
            out[start:start + n] = F.linear(F.silu(g) * u, down[e])
            start += n
    out = out * w.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tokens, out)


def grouped_mm(x, w, ids, gate_up_t, down_t):
    """torch._grouped_mm over sorted rows (offsets: each expert's end row)."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=gate_up_t.shape[0]).cumsum(0).to(torch.int32)
    rows = x[order // k]
    h = torch._grouped_mm(rows, gate_up_t, offs=offs)
    g, u = h.chunk(2, dim=-1)
    y = torch._grouped_mm((F.silu(g) * u).contiguous(), down_t, offs=offs)
    y = y * w.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, order // k, y)


# (outputs, step, warps), each with the fused gate/up loop (PAIR) and without
GEMV_SWEEP = [cuda_moe.Tiles(1, bn, bk, w, 2) for bn, bk, w in (
    (8, 256, 4), (4, 256, 2), (16, 256, 4), (8, 512, 4), (16, 128, 4), (32, 128, 4), (4, 512, 4),
    (4, 1024, 4), (8, 1024, 8), (2, 2048, 4))]
SMALL_SWEEP = [cuda_moe.Tiles(16, bn, bk, w, st) for bn, bk, w, st in (
    (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (32, 128, 4, 4), (128, 128, 8, 3))]
LARGE_SWEEP = [cuda_moe.Tiles(bm, bn, bk, w, st) for bm, bn, bk, w, st in (
    (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
    (64, 128, 128, 8, 3))]


def sweep(fn, picks: int, reps: int) -> tuple[float, str]:
    """The fastest tile set (graph replay) of the route ``picks`` takes; the defaults restored."""
    if picks <= cuda_moe.GEMV_MAX_PICKS:
        name, cands = ("GEMV_FEW" if picks <= 16 else "GEMV"), GEMV_SWEEP
    elif picks <= cuda_moe.GROUPED_SMALL_MAX_PICKS:
        name, cands = "GROUPED_SMALL", SMALL_SWEEP
    else:
        name, cands = "GROUPED", LARGE_SWEEP
    default = getattr(cuda_moe, name)
    best = (float("inf"), "")
    pairs = (True, False) if name.startswith("GEMV") else (False,)
    try:
        for t0 in cands:
            for pair in pairs:
                t = dataclasses.replace(t0, pair=pair)
                setattr(cuda_moe, name, t)
                try:
                    ms = gpu_ms(graphed(fn), reps)
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile: skip it
                    print(f"{name} {t}: {type(exc).__name__}", file=sys.stderr)
                    continue
                tag = (f"{name} {t.block_m}/{t.block_n}/{t.block_k} w{t.num_warps} "
                       f"s{t.num_stages}"
                       f"{' pair' if pair and name.startswith('GEMV') else ''}")
                print(f"  sweep {picks} picks: {tag} {ms * 1e3:.1f} µs (all routings)",
                      file=sys.stderr, flush=True)
                best = min(best, (ms, tag))
    finally:
        setattr(cuda_moe, name, default)
    return best


def run(a: argparse.Namespace) -> list[dict]:
    e, h, i, k = a.experts, a.hidden, a.inner, a.top_k
    results = []
    for mix in a.mixes.split(","):
        gu_t, dn_t = (Q[t.upper()] for t in mix.split("+"))
        layer = CudaMoEExperts(random_codes(gu_t, e * i, h, 1, e),
                               random_codes(gu_t, e * i, h, 2, e),
                               random_codes(dn_t, e * h, i, 3, e), e).cuda()
        code_bytes = sum(b.numel() * b.element_size() for b in layer.buffers()) / e
        gate_up, down = (t.cuda().to(torch.bfloat16) for t in layer.dequantize())
        has_gmm = hasattr(torch, "_grouped_mm")
        gu_t_, dn_t_ = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        for tokens in (int(t) for t in a.tokens.split(",")):
            # R routings cycled per timed call, so that the experts a call reads are not the
            # ones the previous call left in L2 (8 experts of a layer fit in an H100's 50 MB)
            r_sets = 8 if tokens <= 32 else 1
            g = torch.Generator(device="cuda").manual_seed(tokens)
            sets = []
            for _ in range(r_sets):
                x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, generator=g)
                logits = torch.randn(tokens, e, device="cuda", generator=g)
                w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
                sets.append((x, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16), ids))
            hit = sum(int(ids.unique().numel()) for _, _, ids in sets) / r_sets

            def each(fn, sets=sets):  # noqa: ANN001, ANN202
                return lambda: [fn(x, w, ids) for x, w, ids in sets]

            def per_set(ms: float, r_sets: int = r_sets) -> float:
                return ms / r_sets

            x, w, ids = sets[0]
            ours = each(layer)
            ref = float_loop(x, w, ids, gate_up, down)
            err = ((layer(x, w, ids).float() - ref.float()).norm() / ref.float().norm()).item()
            row = {"mix": mix, "layout": "+".join(f[0] for f in layer.formats),
                   "tokens": tokens, "experts_hit": hit, "rel_err": err,
                   "codes_eager_ms": per_set(gpu_ms(ours, a.reps)),
                   "codes_graph_ms": per_set(gpu_ms(graphed(ours), a.reps)),
                   "bf16_loop_ms": per_set(gpu_ms(each(
                       lambda x, w, ids: float_loop(x, w, ids, gate_up, down)), a.reps))}
            if has_gmm:
                try:
                    row["bf16_grouped_mm_ms"] = per_set(gpu_ms(each(
                        lambda x, w, ids: grouped_mm(x, w, ids, gu_t_, dn_t_)), a.reps))
                except RuntimeError as exc:  # noqa: PERF203
                    row["bf16_grouped_mm_ms"] = None
                    print(f"_grouped_mm: {exc}", file=sys.stderr)
            row["codes_GBps"] = hit * code_bytes / row["codes_graph_ms"] / 1e6
            if tokens * k <= cuda_moe.GEMV_MAX_PICKS:  # the routes forced
                few = 2 <= tokens <= 16
                for route in ("gemv", "grouped") + (("experts", "rows") if few else ()):
                    row[f"{route}_ms"] = per_set(gpu_ms(graphed(each(
                        lambda x, w, ids, r=route: cuda_moe.moe_experts(
                            x, w, ids, *layer.stacks(), e, route=r))), a.reps))
                for t in cuda_moe_tune.ROWS_CANDIDATES if few else ():  # its raced tiles
                    row[f"{cuda_moe_tune.describe(('rows', t))}_ms"] = per_set(gpu_ms(graphed(
                        each(lambda x, w, ids, t=t: cuda_moe.moe_experts(
                            x, w, ids, *layer.stacks(), e, route="rows", tiles=t))), a.reps))
            if a.sweep:
                best, tiles = sweep(ours, tokens * k, a.reps)
                row["best_ms"], row["best_tiles"] = per_set(best), tiles
            results.append(row)
            print(json.dumps(row), flush=True)
        del layer, gate_up, down, gu_t_, dn_t_
        torch.cuda.empty_cache()
    return results


def align_times(experts: int, k: int, reps: int) -> str:
    """The device sort alone (graph replay), one-program kernel vs torch ops, µs."""
    out = ["| picks | align kernel µs | torch ops µs |", "|---|---|---|"]
    for tokens in (4, 8, 32, 64):
        ids = torch.randint(0, experts, (tokens * k,), device="cuda")
        one = gpu_ms(graphed(lambda: cuda_moe.align(ids, experts, 16)), reps) * 1e3
        ops = gpu_ms(graphed(lambda: cuda_moe.align_torch(ids, experts, 16)), reps) * 1e3
        out.append(f"| {tokens * k} | {one:.1f} | {ops:.1f} |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    head = ("| mix | tokens | experts hit | codes graph ms | codes eager ms | bf16 loop ms | "
            "bf16 grouped_mm ms | codes GB/s | loop / codes | rel err | best tiles | routes ms |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        gmm = r.get("bf16_grouped_mm_ms")
        lines.append(
            f"| {r['mix']} ({r.get('layout', '?')}) | {r['tokens']} | {r['experts_hit']:.1f} | "
            f"{r['codes_graph_ms']:.3f} | {r['codes_eager_ms']:.3f} | {r['bf16_loop_ms']:.3f} | "
            f"{'-' if gmm is None else f'{gmm:.3f}'} | {r['codes_GBps']:.0f} | "
            f"{r['bf16_loop_ms'] / r['codes_graph_ms']:.2f}x | {r['rel_err']:.1e} | "
            + (f"{r['best_ms']:.3f} {r['best_tiles']} |" if "best_ms" in r else "- |")
            + (f" gemv {r['gemv_ms']:.3f} / grouped {r['grouped_ms']:.3f}" if "gemv_ms" in r
               else " -")
            + (f" / experts {r['experts_ms']:.3f}" if "experts_ms" in r else "")
            + "".join(f" / {key[:-3]} {ms:.3f}" for key, ms in r.items()
                      if key.startswith("rows") and key.endswith("_ms")) + " |")
    return "\n".join(lines)


# (experts, hidden, expert width, top-k, gate/up + down types, gpt-oss's biases and clamp)
PRESETS = {
    "gpt-oss-20b": (32, 2880, 2880, 4, "mxfp4+mxfp4", True),
    "glm-4.7-flash": (64, 2048, 1536, 4, "q4_k+q6_k", False),
    "qwen3-30b-a3b": (128, 2048, 768, 8, "q4_k+q6_k", False),
}


def preset_layer(name: str, tiny: bool = False) -> CudaMoEExperts:
    """A random layer of a preset's shape (``tiny``: 4 experts, hidden 64, width 32 or 64 —
    the same formats, for the interpreter)."""
    e, h, i, k, mix, oss = PRESETS[name]
    if tiny:
        e, h, i, k = 4, 64 if oss else 256, 32 if oss else 256, 2
    gu_t, dn_t = (Q[t.upper()] for t in mix.split("+"))
    extra = {}
    if oss:
        g = torch.Generator().manual_seed(7)
        extra = dict(gate_up_bias=torch.randn(e, 2 * i, generator=g) * 0.1,
                     down_bias=torch.randn(e, h, generator=g) * 0.1, glu=(1.702, 7.0))
    layer = CudaMoEExperts(random_codes(gu_t, e * i, h, 1, e), random_codes(gu_t, e * i, h, 2, e),
                           random_codes(dn_t, e * h, i, 3, e), e, **extra)
    layer.top_k = k
    return layer


def wall_us(run, cases, reps):  # noqa: ANN001, ANN201
    """The CPU plumbing's stand-in for ``graph_us``: wall µs a case (meaningless timings)."""
    start = time.perf_counter()
    for _ in range(reps):
        for c in cases:
            run(c)
    return (time.perf_counter() - start) / (reps * len(cases)) * 1e6


def routes(a: argparse.Namespace) -> tuple[list[dict], str]:
    """Per preset and bucket: every right candidate's µs, the choice and the constant rule."""
    import copy

    from pensieve.backends import cuda_moe_tune as tune

    buckets = tuple(int(b) for b in a.buckets.split(","))
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    timer = tune.graph_us if a.device == "cuda" else wall_us
    rows, lines = [], []
    for name in a.presets.split(","):
        layer = preset_layer(name, a.tiny).to(a.device).to(dtype)
        sample = [layer] + [copy.deepcopy(layer) for _ in range(a.layers - 1)]
        plan, times = tune.plan_layers(sample, dtype, a.reps, timer, buckets)
        cands = sorted({r for t in times.values() for r in t}, key=tune.describe)
        lines += [f"\n{name} ({layer.extra_repr()}, top-{layer.top_k}), µs a layer call:",
                  "| tokens | " + " | ".join(tune.describe(r) for r in cands)
                  + " | chosen | constant rule | gain |", "|---" * (len(cands) + 4) + "|"]
        for b in buckets:
            t, was = times.get(b, {}), tune.static_route(layer, b)
            best = plan.get(b)
            gain = (t[was] / t[best]) if best in t and was in t else None
            rows.append({"preset": name, "tokens": b, "chosen": tune.describe(best),
                         "static": tune.describe(was), "gain": gain,
                         "us": {tune.describe(r): us for r, us in t.items()}})
            lines.append(f"| {b} | " + " | ".join(
                f"{t[r]:.1f}" if r in t else "-" for r in cands)
                + f" | {tune.describe(best)} | {tune.describe(was)} | "
                + ("-" if gain is None else f"{gain:.2f}x") + " |")
            print(json.dumps(rows[-1]), flush=True)
        del layer, sample
        if a.device == "cuda":
            torch.cuda.empty_cache()
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_moe_kernels",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inner", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", default="1,4,8,32,512,2048")
    p.add_argument("--mixes", default="q4_k+q6_k,q4_k+q4_k")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="also time a few tile sets per route")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--routes", action="store_true",
                   help="the start's route race per decode bucket at the presets' shapes")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--buckets", default="1,2,4,8,16,32,48,64")
    p.add_argument("--layers", type=int, default=4, help="--routes: copies of the layer cycled")
    p.add_argument("--tiny", action="store_true", help="--routes: tiny shapes (plumbing)")
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    if a.routes:
        rows, md = routes(a)
        dev = torch.cuda.get_device_name() if a.device == "cuda" else a.device
        print(f"\n{dev}{md}")
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_moe_routes.json").write_text(json.dumps(rows, indent=1))
        (out / "gpu_moe_routes.md").write_text(f"{dev}{md}\n")
        return 0
    rows = run(a)
    md = table(rows) + "\n\n" + align_times(a.experts, a.top_k, a.reps)
    print(f"\n{torch.cuda.get_device_name()}\n{md}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_moe_kernels.json").write_text(json.dumps(rows, indent=1))
    (out / "gpu_moe_kernels.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
