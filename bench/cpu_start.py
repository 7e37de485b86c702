"""Where a `pensieve serve` start goes, phase by phase, in one process (no HTTP server bound).

    .venv/bin/python -m bench.cpu_start --gguf FILE [--repeat 3]

Each round is a fresh interpreter (``python -X importtime`` is not used: its own cost is part of
what it reports): the parent times the child's interpreter start, and the child reports its
imports (``pensieve.cli.main``; ``pensieve.cli.serve`` with torch, fastapi and the API's pydantic
models), then ``build_app``'s phases (weight kernels chosen, the packed copy read, its tokenizer
built, the GGUF's metadata read, the modules built, the engine, the app) and uvicorn's import.
The model is served as ``compare_cpu`` serves it (``--context-length 8192``); the packed-weights
copy must be warm (run one start first). Prints one row per round and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r'''
import gc, json, sys, time
t0 = time.perf_counter()
marks = {}
gc.disable()  # as pensieve.cli.main does for serve
import pensieve.cli.main as main
marks["import pensieve.cli.main"] = time.perf_counter() - t0
t = time.perf_counter()
import pensieve.cli.serve as serve
marks["import cli.serve (torch, fastapi, api models)"] = time.perf_counter() - t
import importlib
spent = {}
def wrap(modname, fn, label):
    mod = importlib.import_module(modname)
    orig = getattr(mod, fn)
    def timed(*a, **k):
        s = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - s
    setattr(mod, fn, timed)
t = time.perf_counter()
import pensieve.cli.served_model, pensieve.cli.serve_torch, pensieve.backends.packed_cache
import pensieve.backends.torch_backend, pensieve.loaders.registry
marks["import the torch backend's modules"] = time.perf_counter() - t
for modname, fn, label in [
        ("pensieve.cli.serve_torch", "choose_weights", "weight kernels chosen"),
        ("pensieve.backends.packed_cache", "_tokenizer", "tokenizer built (Tokenizer.from_str)"),
        ("pensieve.backends.packed_cache", "_parse", "packed copy mapped, header read"),
        ("pensieve.loaders.registry", "load_checkpoint", "GGUF metadata read"),
        ("pensieve.backends.torch_backend", "build_model", "modules built over the packed pages"),
        ("pensieve.backends.torch_backend", "torch_engine", "engine (KV pool, runner)"),
        ("pensieve.cli.served_model", "start_serving", "engine thread started"),
        ("pensieve.api.app", "create_app", "FastAPI app")]:
    wrap(modname, fn, label)
def fake_serve(app, client, *a, **k):
    marks["build_app (all of it)"] = time.perf_counter() - t_build
    t = time.perf_counter()
    import uvicorn
    from pensieve.cli.http_protocol import HeaderTimeoutProtocol
    marks["import uvicorn"] = time.perf_counter() - t
    import threading
    for th in threading.enumerate():  # a cold start writes the packed copy: let it finish
        if th.name == "pensieve-packed-cache":
            marks["converted (not a warm start)"] = 1.0
            th.join()
    client.shutdown()
    return 0
serve.serve_http = fake_serve
t_build = time.perf_counter()
main.main(["serve", "--model", sys.argv[1], "--context-length", "8192", "--port", "1",
           "--log-level", "warning"])
marks.update({"  " + k: v for k, v in spent.items()})
marks["total in the interpreter"] = time.perf_counter() - t0
print("PHASES " + json.dumps(marks), flush=True)
import os
os._exit(0)
'''


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    rounds = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", CHILD, os.path.expanduser(args.gguf)],
                             capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - started
        if run.returncode or "PHASES " not in run.stdout:
            raise SystemExit(f"the start failed:\n{run.stderr[-3000:]}")
        out = run.stdout
        if '"converted (not a warm start)"' in out:
            print("round: converted the GGUF (packed copy cold): not counted", file=sys.stderr)
            continue
        marks = json.loads(out.split("PHASES ", 1)[1].splitlines()[0])
        marks["interpreter start, exit (wall less the above)"] = wall - marks["total in the interpreter"]
        rounds.append(marks)
        print(f"round: total {marks['total in the interpreter']:.2f} s, wall {wall:.2f} s; load "
              + open("/proc/loadavg").read().split()[0], file=sys.stderr)
    if not rounds:
        raise SystemExit("no warm start")
    print("| phase | seconds (median of %d) |\n|---|---:|" % len(rounds))
    for key in rounds[0]:
        print(f"| {key} | {statistics.median(r[key] for r in rounds):.3f} |")


if __name__ == "__main__":
    main()
