"""llama-cpp-python's side of the CPU follow-up measurement (BENCHMARKS.md, issue 15 item 6's CPU
version): bench/cc_ttft.py's Claude Code turn 1 (cold) and turn 2 on a GGUF, rendered to token
ids by Pensieve (the same ids Pensieve prefills) and fed to ``llama_cpp.Llama`` with
``max_tokens`` 1: its ``generate`` reuses the longest common prefix when the context's memory can
drop the tail (``kv_cache_seq_rm``) and re-evaluates the whole prompt when it cannot (recurrent
and hybrid models).

    .venv/bin/python -m bench.cpu_llamacpp_followup /tmp/hb_qwen35moe.gguf --tools 1
    # renders with Pensieve here, times with .bench-venv's llama_cpp in a subprocess
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PY = ROOT / ".bench-venv" / "bin" / "python"


def render(gguf: str, tools: int | None, rounds: int, side: bool = False
           ) -> list[list[list[int]]]:
    """Per round: [turn 1 ids, turn 2 ids] (a fresh nonce each round), plus the side request's
    ids with ``side``."""
    import random

    from bench.cc_ttft import first_request
    from bench.client import nonce
    from bench.replay import main_turn, side_request
    from pensieve.chat import PromptRenderer
    from pensieve.loaders.registry import load_checkpoint
    from pensieve.protocol import MessageCreateParams

    ckpt = load_checkpoint(gguf, tensors=False)
    renderer = PromptRenderer(ckpt.tokenizer, None)
    rng, out = random.Random(0), []
    for _ in range(rounds):
        first = first_request(nonce(), tools=tools)
        bodies = [main_turn(first, k, rng, 1) for k in (0, 1)]
        if side:
            bodies.append(side_request(first["model"], 0))
        out.append([renderer.render(MessageCreateParams.model_validate(b)).token_ids
                    for b in bodies])
    return out


def time_llama_cpp(gguf: str, rounds: list[list[list[int]]], threads: int) -> list[dict]:
    from llama_cpp import Llama

    n_ctx = max(len(ids) for r in rounds for ids in r) + 64
    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_threads=threads, verbose=False)

    def ttft(ids: list[int]) -> float:
        started = time.perf_counter()
        for _ in llm.generate(ids, temp=0.0, reset=True):
            break
        return time.perf_counter() - started

    results = []
    for one, two, *side in rounds:
        llm.reset()
        cold = ttft(one)
        for ids in side:  # one context: the side request replaces turn 1's state
            ttft(ids)
        follow = ttft(two)
        results.append({"turn1_tokens": len(one), "turn2_tokens": len(two),
                        "cold_ms": cold * 1e3, "follow_ms": follow * 1e3,
                        "ratio_pct": 100 * follow / cold})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--tools", type=int, default=None, help="keep the first N of the 24 tools")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", action="store_true",
                   help="a side request between the turns (Claude Code's title call)")
    p.add_argument("--ids", default=None, help="(internal) time these rendered ids")
    a = p.parse_args(argv)
    if a.ids:
        rounds = json.loads(Path(a.ids).read_text())
        print(json.dumps(time_llama_cpp(a.gguf, rounds, a.threads)))
        return 0
    ids = Path(f"/tmp/cc_ids_{Path(a.gguf).stem}{'_side' if a.side else ''}.json")
    ids.write_text(json.dumps(render(a.gguf, a.tools, a.rounds, a.side)))
    out = subprocess.run([str(BENCH_PY), "-m", "bench.cpu_llamacpp_followup", a.gguf,
                          "--ids", str(ids), "--threads", str(a.threads)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return out.returncode
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results:
        print(f"{Path(a.gguf).name}{' (side request between)' if a.side else ''}: turn 1 {r['turn1_tokens']} tokens cold {r['cold_ms']:.0f} ms, "
              f"turn 2 {r['turn2_tokens']} tokens {r['follow_ms']:.0f} ms = {r['ratio_pct']:.1f}% "
              f"of cold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
