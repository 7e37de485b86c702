"""Where a decoded token's time goes on the CPU one-call decoder (issue 9's decode target).

    .venv/bin/python -m bench.cpu_decode_profile \
        --gguf ~/.cache/pensieve/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf --threads 2

The model is built as ``serve --weights auto`` builds it on the CPU kernels (``keep_int4``,
the output layer as codes) and one engine decodes ``--tokens`` greedy tokens a round at a
fixed thread count (the decoder's load-following ``ThreadTuner`` pinned). Per token: the
engine step, the decoder call, ``pq_decode_layers`` and its parts (``pq_decode_profile``:
norms, each projection, RoPE + KV store, attention, SiLU, residual adds), the output layer,
and what is left (embedding, final norm, sampling, the engine's Python). Each projection's
weight bytes over its time gives GB/s, to hold against ``bench/decode_roofline.py``'s read
bandwidth. Then each projection kind alone over all layers (``pqx_linear``, one row, 1 and
``--threads`` threads, best of ``--repeats``): the GEMVs without the rest of the step.

``--baseline REV`` (a git revision) builds the kernel library from that revision's sources as
well and alternates rounds between the two libraries on the same engine and weights (the
decoder's and the output layer's calls pointed at one library or the other: the same structs,
the same ABI), so a busy machine slows both alike; the ratio of the medians is printed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PARTS = ("norms", "qkv", "rope+store", "attention", "o", "gate_up", "silu", "down", "adds")
# codes + scales/mins a block of 32, by C format: q4 float16 scale + min; q8 (a Q5_1/Q5_K min
# not counted); q8 per 16; Q6_K's 6-bit codes + 18 bytes a 256; Q4_K's nibbles + 16 bytes a 256
BYTES_PER_32 = {0: 16 + 4, 1: 32 + 2, 2: 32 + 4, 3: 24 + 18 / 8, 4: 16 + 16 / 8}


def proj_bytes(p) -> int:  # noqa: ANN001 - a codes_linear.Proj
    return int(sum(p.part[i].rows * (p.K // 32) * BYTES_PER_32[p.part[i].fmt] for i in range(p.n_parts)))


SOURCE_AT = """
import sys, types
root = sys.argv[1]
for name in ("pensieve", "pensieve.backends", "pensieve.backends.cpu_quant"):
    mod = types.ModuleType(name)
    mod.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = mod
from pensieve.backends.cpu_quant.source import KERNEL_SOURCE
sys.stdout.write(KERNEL_SOURCE)
"""


def library_at(rev: str, isa: str) -> ctypes.CDLL:
    """The kernel library built from git revision ``rev``'s C sources (the ``*_source.py`` files
    only are imported, with stub packages around them), with this tree's signatures."""
    from pensieve.backends.cpu_quant import build

    repo = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="pensieve-baseline-"))
    subprocess.run(f"git -C {repo} archive {rev} pensieve/backends/cpu_quant | tar -x -C {tmp}",
                   shell=True, check=True)
    src = subprocess.run([sys.executable, "-c", SOURCE_AT, str(tmp)], check=True,
                         capture_output=True, text=True).stdout
    (tmp / "k.cpp").write_text(src)
    subprocess.run(["g++", *build.FLAGS, str(tmp / "k.cpp"), "-o", str(tmp / "k.so")], check=True)
    lib = ctypes.CDLL(str(tmp / "k.so"))
    for name in ("pq_decode_layers", "pqx_linear", "pq_set_isa"):
        getattr(lib, name).argtypes = build.SIGNATURES[name]
    lib.pq_set_isa.restype = ctypes.c_int
    lib.pq_set_isa(build.ISAS.index(isa))
    return lib


def decode_rounds(args, engine, ckpt, kernels, libs, timing, head, hooks, nbytes) -> None:  # noqa: ANN001
    """The decode rounds (libraries alternated) and the per-token breakdown."""
    from pensieve.engine.types import SamplingParams

    parts = (ctypes.c_double * len(PARTS))()
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompt = ckpt.tokenizer.encode("Write a Python function that merges two sorted lists.")
    rows: dict[str, list[dict]] = {name: [] for name in libs}
    texts: dict[str, str] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in list(libs) if r % 2 else list(libs)[::-1]:
            hooks["layers"], head._fn = libs[name].pq_decode_layers, libs[name].pqx_linear
            engine.add_request(f"r{r}{name}", prompt, greedy)
            pieces = [d.text for d in engine.step()]  # the prefill
            for v in timing.values():
                v.clear()
            kernels.pq_decode_profile(1, parts)
            steps, t0 = [], time.perf_counter()
            while engine.has_work():
                s0 = time.perf_counter()
                pieces += [d.text for d in engine.step()]
                steps.append(time.perf_counter() - s0)
            wall = time.perf_counter() - t0
            kernels.pq_decode_profile(0, parts)
            texts[name] = "".join(pieces)
            n = len(steps)
            row = {"tok/s": n / wall, "step": sum(steps) / n, "layers": sum(timing["layers"]) / n,
                   "head": sum(timing["head"]) / n, **{p: parts[i] / n for i, p in enumerate(PARTS)}}
            if r:
                rows[name].append(row)
            print(f"round {r} {name}: {row['tok/s']:.2f} tok/s, step {row['step'] * 1e3:.1f} ms "
                  f"(layers {row['layers'] * 1e3:.1f}, head {row['head'] * 1e3:.1f}), load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
    hooks["layers"], head._fn = kernels.lib.pq_decode_layers, kernels.lib.pqx_linear
    if args.baseline:
        new, old = (statistics.median(x["tok/s"] for x in rows[k]) for k in libs)
        same = len(set(texts.values())) == 1
        print(f"\ndecode: this tree {new:.2f} tok/s, {args.baseline} {old:.2f} tok/s (medians of "
              f"{args.rounds}): {new / old:.3f}x; greedy text {'identical' if same else 'DIFFERS'}")
    rows = rows["this tree"]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\nper token (median of {len(rows)} rounds of {args.tokens}): {med['tok/s']:.2f} tok/s, "
          f"step {med['step'] * 1e3:.1f} ms")
    gbs = {"qkv": "qkv", "o": "o", "gate_up": "gate_up", "down": "down", "head": "head"}
    for name in (*PARTS, "head"):
        extra = f"  {nbytes[gbs[name]] / med[name] / 1e9:5.1f} GB/s" if name in gbs else ""
        print(f"  {name:<11} {med[name] * 1e3:7.2f} ms  {med[name] / med['step'] * 100:5.1f}%{extra}")
    inside = sum(med[p] for p in PARTS)
    print(f"  {'(layers, unattributed)':<11} {(med['layers'] - inside) * 1e3:7.2f} ms")
    print(f"  {'(rest: embed, final norm, sampling, engine)':<11} "
          f"{(med['step'] - med['layers'] - med['head']) * 1e3:7.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", help="a git revision whose kernels alternate with this tree's")
    args = ap.parse_args()

    from pensieve.backends.cpu_quant import load_kernels
    from pensieve.backends.cpu_quant.codes_linear import proj_of
    from pensieve.backends.torch_backend import build_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.registry import load_checkpoint

    torch.set_num_threads(args.threads)
    kernels = load_kernels()
    ckpt = load_checkpoint(os.path.expanduser(args.gguf), keep_int4=True)
    engine = build_engine(ckpt, EngineConfig(context_length=8192, int8_lm_head=True))
    dec = engine.runner.cpu_decoder
    if dec is None:
        raise SystemExit("this model does not run on the one-call decoder")
    dec.tuner.pick = lambda: args.threads  # pinned: the breakdown at one thread count
    layers = list(engine.runner.model.model.layers)
    head = engine.runner.model.lm_head
    kinds = {"qkv": lambda l: l.self_attn.qkv_proj, "o": lambda l: l.self_attn.o_proj,
             "gate_up": lambda l: l.mlp.gate_up_proj, "down": lambda l: l.mlp.down_proj}
    projs = {k: [proj_of(get(layer)) for layer in layers] for k, get in kinds.items()}
    nbytes = {k: sum(map(proj_bytes, ps)) for k, ps in projs.items()}
    nbytes["head"] = proj_bytes(proj_of(head)) if proj_of(head) is not None else 0
    print(f"isa {kernels.isa}, {len(layers)} layers, threads {args.threads}; weight MB a token: "
          + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in nbytes.items())
          + f"; total {sum(nbytes.values()) / 1e6:.1f}", flush=True)

    timing = {"layers": [], "head": []}
    hooks, head_forward = {"layers": dec._fn}, head.forward

    def layers_timed(*a):  # noqa: ANN002
        t0 = time.perf_counter()
        hooks["layers"](*a)
        timing["layers"].append(time.perf_counter() - t0)

    def head_timed(x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = head_forward(x)
        timing["head"].append(time.perf_counter() - t0)
        return y

    dec._fn, head.forward = layers_timed, head_timed
    libs = {"this tree": kernels.lib}
    if args.baseline:
        libs[args.baseline] = library_at(args.baseline, kernels.isa)
    if args.rounds:
        decode_rounds(args, engine, ckpt, kernels, libs, timing, head, hooks, nbytes)
    x = torch.randn(1, 8960)
    y = torch.empty(1, 151936 + 64)
    print(f"\neach projection alone over all layers (pqx_linear, 1 row; 1 thread: its CPU time, "
          f"median of {args.repeats}; {args.threads} threads: wall, best of {args.repeats}; "
          "libraries alternated):")
    head_projs = [proj_of(head)] if proj_of(head) is not None else []
    for name, ps in (*projs.items(), ("head", head_projs)):
        for threads in sorted({1, args.threads}):
            clock = time.thread_time if threads == 1 else time.perf_counter
            got: dict[str, list[float]] = {lib: [] for lib in libs}
            for r in range(args.repeats):
                for lib in list(libs) if r % 2 else list(libs)[::-1]:
                    fn = libs[lib].pqx_linear
                    t0 = clock()
                    for p in ps:
                        fn(x.data_ptr(), 1, ctypes.byref(p), y.data_ptr(), threads, 1)
                    got[lib].append(clock() - t0)
            pick = statistics.median if threads == 1 else min
            cells = [f"{lib} {pick(v) * 1e3:7.2f} ms {nbytes[name] / pick(v) / 1e9:5.1f} GB/s"
                     for lib, v in got.items()]
            if len(libs) > 1:
                a, b = (pick(v) for v in got.values())
                cells.append(f"{b / a:.2f}x")
            print(f"  {name:<8} threads {threads}: " + " | ".join(cells), flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
