"""Where a CPU server's resident memory goes: ``/proc/PID/smaps`` by mapping kind, at ready and
after each of a few prompts, with the peak (VmHWM).

Kinds: the packed weights (the mapped ``*.pack`` copy or the GGUF), shared libraries, other
files, malloc's ``[heap]`` (main arena), other anonymous mappings (the KV pool, torch tensors
≥ malloc's mmap threshold, glibc's thread arenas, Python's object arenas), stacks. The KV pool
is one anonymous mapping merged with its neighbours, so its resident part is estimated: every
token a request wrote, rounded up to whole blocks, times ``--kv-bytes-per-token`` (the pool
hands out never-used blocks first, so no block is written twice before the pool wraps). The
runtime's own memory — what issue 9's bar allows 300 MB for — is everything but the weights'
pages and the KV cache.

    python -m bench.cpu_rss --gguf ~/.cache/pensieve/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf \
        --prompts 1000 4000
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$")


def mappings(pid: int) -> list[tuple[str, int, int]]:
    """(name, size kB, Rss kB) of every mapping of ``pid``."""
    out: list[tuple[str, int, int]] = []
    name, size = "", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = HEAD.match(line)
        if m:
            name, size = m.group(3).strip(), (int(m.group(2), 16) - int(m.group(1), 16)) // 1024
        elif line.startswith("Rss:"):
            out.append((name, size, int(line.split()[1])))
    return out


def anatomy(pid: int, kv_mib: float) -> dict[str, float]:
    """MiB resident per kind (see the module doc); ``kv_mib``: the KV pages written."""
    maps = mappings(pid)
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, size, rss in maps:
        name = name.removesuffix(" (deleted)")  # a file replaced on disk while mapped
        if name.endswith((".pack", ".gguf")):
            kind = "weights (mapped file)"
        elif ".so" in name:
            kind = "shared libraries"
        elif name.startswith("/"):
            kind = "other files"
        elif name == "[heap]":
            kind = "anon: [heap] (main arena)"
        elif name.startswith("[stack") or name in ("[vvar]", "[vdso]", "[vsyscall]"):
            kind = "anon: stacks, vdso"
        elif not name and size >= 1024:
            kind = "anon: mappings >= 1 MiB"
        else:
            kind = "anon: mappings < 1 MiB"
        kinds[kind] += rss / 1024
    status = Path(f"/proc/{pid}/status").read_text()
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        kinds[key] = int(re.search(rf"^{key}:\s+(\d+)", status, re.M).group(1)) / 1024
    kinds["KV cache (estimated)"] = kv_mib
    kinds["runtime (all but weights and KV)"] = (
        kinds["VmRSS"] - kinds["weights (mapped file)"] - kv_mib)
    return dict(kinds)


def ask(url: str, prompt: str, max_tokens: int = 1) -> tuple[int, float]:
    """(input + output tokens, seconds) of one streamed request."""
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key="x", timeout=3600)
    model = client.models.list().data[0].id
    started = time.perf_counter()
    with client.messages.stream(model=model, max_tokens=max_tokens,
                                messages=[{"role": "user", "content": prompt}]) as s:
        used = 0
        for event in s:
            if event.type == "message_start":
                used += event.message.usage.input_tokens
            elif event.type == "message_delta":
                used += event.usage.output_tokens
    return used, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    from bench.client import filler_text

    p = argparse.ArgumentParser(prog="python -m bench.cpu_rss", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--port", type=int, default=18492)
    p.add_argument("--prompts", type=int, nargs="*", default=[1000, 4000],
                   help="approximate prompt sizes in tokens, sent in order (cold, 1 token out)")
    p.add_argument("--kv-bytes-per-token", type=int, default=28672,
                   help="default: Qwen2.5-1.5B's float16 K/V (28 layers × 2 × 2 heads × 128)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--args", default="--context-length 8192", help="extra serve arguments")
    p.add_argument("--entry", default=None,
                   help="a script run instead of `-m pensieve.cli.main` (a variant under study)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after ready before sampling")
    args = p.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}"
    entry = ["-m", "pensieve.cli.main"] if args.entry is None else [args.entry]
    cmd = [sys.executable, *entry, "serve", "--model", args.gguf, "--host", "127.0.0.1",
           "--port", str(args.port), *args.args.split()]
    log = open(f"/tmp/cpu_rss-{args.port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        import urllib.request

        started = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: see /tmp/cpu_rss-{args.port}.log")
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        print(f"ready in {time.perf_counter() - started:.2f} s", file=sys.stderr)
        time.sleep(args.settle)
        blocks = 0
        kv = lambda: blocks * args.block_size * args.kv_bytes_per_token / 2**20  # noqa: E731
        rows.append(("ready", anatomy(proc.pid, kv())))
        n, _ = ask(url, "Say hello.", 8)
        blocks += -(-n // args.block_size)
        rows.append((f"short request ({n} tok)", anatomy(proc.pid, kv())))
        for i, tokens in enumerate(args.prompts):
            words = int(tokens * 0.74)
            prompt = (f"[{i}] Read the notes and answer with one word.\n\n"
                      + filler_text(words, f"rss{i}-{time.time()}") + "\n\nWhich object comes first?")
            n, secs = ask(url, prompt)
            blocks += -(-n // args.block_size)
            print(f"{n}-token prompt: {secs:.1f} s ({n / secs:.1f} tok/s)", file=sys.stderr)
            rows.append((f"after a {n}-token prompt", anatomy(proc.pid, kv())))
    finally:
        proc.terminate()
        proc.wait(30)
    keys = [k for k in rows[-1][1]]
    print("| MiB | " + " | ".join(r[0] for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[1].get(k, 0.0):.1f}" for r in rows) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
