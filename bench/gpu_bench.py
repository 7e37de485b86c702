"""GPU benchmark: a random-weight 8B Llama-shape GGUF served by Pensieve over /v1/messages.

Writes the GGUF (``bench/make_random_gguf.py``) unless it exists, starts
``pensieve serve --device cuda --dtype bfloat16``, and measures with ``bench/client.py``'s
scenarios, as a client sees them:

* decode b=1 tok/s (256 tokens after a short prompt);
* aggregate output tok/s of 8 and 32 parallel streams;
* cold prefill of a ~12k-token prompt (TTFT, tok/s);
* warm follow-up TTFT: the same ~12k-token system prompt, another question.
* ``cc`` (not in the defaults): Claude Code's ~20k-token first request cold vs its follow-up
  turn's TTFT (``bench/cc_ttft.py``).

Then, with ``--hf``, HF transformers (eager attention, bf16, the same shape with random
weights) at b=1 and b=16 in the same process run. Prints a markdown table and writes JSON
and the server log under ``--out``.

    python -m bench.gpu_bench --gguf /tmp/llama8b.gguf --tokenizer-from .gpu/tokenizer.gguf \\
        --out "$OUT" --hf

``--url`` drives a server that is already running (llama.cpp's ``llama-server``, which speaks
``/v1/messages`` too) with the same client and scenarios instead of starting Pensieve;
``--server-pid`` names its process for the client's CPU guard:

    python -m bench.gpu_bench --url http://127.0.0.1:8080 --server-pid $PID --out "$OUT/llama"
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.cc_ttft import scenario_cc
from bench.client import (
    DECODE_PROMPT,
    Client,
    Guard,
    Metric,
    filler_text,
    markdown_table,
    nonce,
    scenario_decode,
    scenario_followup,
    scenario_prefill,
    warmup,
)

WORDS_12K = 9500  # filler words ≈ 12k SmolLM2 tokens (1.26 tokens a word)
LLAMA_CPP = {"decode b=1": 162.0, "b=8 aggregate": 759.0, "cold 12k TTFT": 759.0,
             "warm TTFT": 73.5, "ceiling b=1": 203.0}


def make_gguf(a: argparse.Namespace) -> float:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "bench.make_random_gguf", a.gguf, "--dtype", a.gguf_dtype]
    if a.tokenizer_from:
        cmd += ["--tokenizer-from", a.tokenizer_from]
    subprocess.run(cmd, check=True)
    return time.perf_counter() - started


def start_server(a: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "pensieve.cli.main", "serve", "--model", a.gguf,
           "--device", "cuda", "--dtype", "bfloat16", "--port", str(a.port),
           *(["--max-num-seqs", str(a.max_num_seqs)] if a.max_num_seqs > 0 else []),
           *a.serve_args.split()]
    print("server:", " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{a.port}/health"
    while time.perf_counter() - started < a.ready_timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(1.0)
    proc.kill()
    raise SystemExit(f"server not ready in {a.ready_timeout} s; see {log_path}")


async def scenario_parallel(c: Client, repeat: int, n: int, max_tokens: int) -> list[Metric]:
    """n parallel streams with *different* prompts (identical ones would be served by one
    generation: the engine attaches identical in-flight requests to each other)."""
    agg = Metric(f"x{n} parallel streams: aggregate output", "tok/s")
    per = Metric(f"x{n} parallel streams: per-stream decode", "tok/s")
    ttft = Metric(f"x{n} parallel streams: TTFT (median)", "ms")
    for _ in range(repeat):
        tag = nonce()
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(c.stream(f"Stream {i} of {tag}. {DECODE_PROMPT}", max_tokens)
                                    for i in range(n)))
        wall = time.perf_counter() - t0
        bad = [r.error for r in rs if not r.ok]
        if bad:
            raise RuntimeError(f"parallel stream failed: {bad[0]}")
        agg.values.append(sum(r.output_tokens or 0 for r in rs) / wall)
        per.values.append(statistics.median(r.decode_tps or 0.0 for r in rs))
        ttft.values.append(statistics.median(r.ttft * 1e3 for r in rs))
    return [agg, per, ttft]


async def scenario_ttft(c: Client, repeat: int, words: int) -> list[Metric]:
    """Cold then warm TTFT with max_tokens=1: the one token is sent when it is sampled.

    With max_tokens > 1 a random-weight model's first token may be held back by the
    streaming segmenter (text that could open a tool call or thinking block, a partial
    UTF-8 character) until a later step, which adds decode steps to a "TTFT"."""
    cold = Metric("cold ~12k prompt, max_tokens=1: TTFT", "ms")
    rate = Metric("cold ~12k prompt, max_tokens=1: prefill", "tok/s")
    warm = Metric("warm follow-up on that prefix, max_tokens=1: TTFT", "ms")
    for i in range(repeat):
        tag = nonce()
        system = f"[{tag}] You are a careful assistant. Here are the notes:\n\n" + filler_text(words, tag)
        r1 = await c.stream(f"Question {i}: which object is mentioned first?", 1, system=system)
        r2 = await c.stream(f"Question {i}: name any colour in the notes.", 1, system=system)
        for r in (r1, r2):
            if not r.ok and r.error != "no content delta received":
                raise RuntimeError(f"ttft request failed: {r.error}")
        t1 = ((r1.t_first or r1.t_end) - r1.t_send)
        cold.values.append(t1 * 1e3)
        if r1.input_tokens:
            rate.values.append(r1.input_tokens / t1)
        warm.values.append(((r2.t_first or r2.t_end) - r2.t_send) * 1e3)
    return [cold, rate, warm]


async def pensieve_scenarios(a: argparse.Namespace, server_pid: int | None) -> list[Metric]:
    c = Client(a.url or f"http://127.0.0.1:{a.port}", temperature=0.0, timeout=900)
    g = Guard(server_pid=server_pid)
    out: list[Metric] = []
    try:
        await c.resolve_model()
        for _ in range(2):
            await warmup(c)
        await c.stream("warm the prefill kernels " * 700, 4)  # ~2 chunks of prefill shapes
        steps = [
            ("decode", lambda: scenario_decode(c, g, a.repeat, a.decode_tokens)),
            ("x8", lambda: scenario_parallel(c, a.repeat, 8, a.decode_tokens)),
            ("x32", lambda: scenario_parallel(c, a.repeat, 32, a.decode_tokens)),
            ("prefill", lambda: scenario_prefill(c, g, a.repeat, a.prefill_words)),
            ("followup", lambda: scenario_followup(c, g, a.repeat, a.prefill_words)),
            ("ttft1", lambda: scenario_ttft(c, max(a.repeat, 5), a.prefill_words)),
            ("cc", lambda: scenario_cc(c, a.repeat, tools=a.cc_tools)),  # Claude Code turns 1, 2
        ]
        for name, fn in steps:
            if name not in a.scenarios:
                continue
            t0 = time.perf_counter()
            try:
                got = await fn()
            except RuntimeError as exc:
                got = [Metric(f"{name} FAILED", "", note=str(exc)[:300])]
            out += got
            print(f"{name} ({time.perf_counter() - t0:.1f} s)\n{markdown_table(got)}", flush=True)
        used = gpu_memory_used()
        if used is not None:
            out.append(Metric("GPU memory used after the scenarios (nvidia-smi, whole card)",
                              "MiB", [used]))
    finally:
        await c.aclose()
    return out


def hf_baseline(a: argparse.Namespace) -> list[Metric]:
    """transformers LlamaForCausalLM, eager attention, bf16, random weights, greedy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=16384, rope_theta=500000.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    out = []
    n_new = a.hf_tokens
    for batch in (1, 16):
        ids = torch.randint(100, 40000, (batch, 32), device="cuda")
        kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        model.generate(ids, **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = model.generate(ids, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        made = (res.shape[1] - ids.shape[1]) * batch
        out.append(Metric(f"HF transformers eager b={batch}: aggregate output", "tok/s",
                          [made / dt], note=f"{made} tokens in {dt:.1f} s, incl. a 32-token prefill"))
    del model
    torch.cuda.empty_cache()
    return out


def gpu_memory_used() -> float | None:
    """MiB in use on GPU 0 (the server under test is the only program on it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default="/tmp/llama8b-random-f16.gguf")
    p.add_argument("--url", default=None,
                   help="drive this already-running server (e.g. llama-server) instead of "
                        "starting Pensieve; --gguf is then only recorded")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: its process id")
    p.add_argument("--tokenizer-from", default=None, help="for writing the GGUF (see make_random_gguf)")
    p.add_argument("--gguf-dtype", default="f16", help="for writing the GGUF: f16, q4_0, q4_k")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--port", type=int, default=7799)
    p.add_argument("--max-num-seqs", type=int, default=32,
                   help="pensieve serve --max-num-seqs (0: leave it out, the server's default)")
    p.add_argument("--serve-args", default="", help="extra flags for pensieve serve")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--prefill-words", type=int, default=WORDS_12K)
    p.add_argument("--scenarios", default="decode,x8,x32,prefill,followup,ttft1")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--cc-tools", type=int, default=None,
                   help="cc: keep the first N of the request's 24 tools (default all: ~20k tokens)")
    p.add_argument("--hf", action="store_true", help="also run the HF transformers baseline")
    p.add_argument("--hf-tokens", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"gpu": gpu_name(), "date": datetime.date.today().isoformat(),
                  "argv": sys.argv[1:]}
    if a.url:
        info["url"] = a.url
        if Path(a.gguf).exists():
            info["gguf_bytes"] = Path(a.gguf).stat().st_size
        metrics = asyncio.run(pensieve_scenarios(a, a.server_pid))
    else:
        if not Path(a.gguf).exists():
            info["gguf_write_s"] = make_gguf(a)
        info["gguf_bytes"] = Path(a.gguf).stat().st_size
        proc, info["server_ready_s"] = start_server(a, out / "server.log")
        print(f"server ready in {info['server_ready_s']:.1f} s", flush=True)
        try:
            metrics = asyncio.run(pensieve_scenarios(a, proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if a.hf:
        try:
            metrics += hf_baseline(a)
        except Exception as exc:  # the baseline is a bonus: keep Pensieve's numbers
            metrics.append(Metric("HF baseline FAILED", "", note=f"{type(exc).__name__}: {exc}"[:300]))
    table = markdown_table(metrics)
    (out / "gpu_bench.md").write_text(f"{info}\n\n{table}\n")
    (out / "gpu_bench.json").write_text(json.dumps(
        {"info": info, "metrics": [m.row() for m in metrics]}, indent=2))
    print(json.dumps(info))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
