"""Decode speed of the MLX backend's runner (the real engine over MlxRunner) against mlx-lm's
own loop (its model with its contiguous KVCache, argmax each step) on the same MLX folder.

    .venv/bin/python bench/mlx_decode.py [MLX_FOLDER] [--tokens 48] [--repeats 2]

Default folder: the default SmolLM2 converted to bf16 (once, cached). Prints tok/s of both and
their ratio per repeat; run it on a quiet machine (the engine adds scheduling, the paged
gather and the torch sampler per token)."""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from pensieve.backends.mlx_backend import MLX_CACHE, load_mlx_model, mlx_engine
    from pensieve.backends.mlx_convert import cached_conversion
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.types import SamplingParams
    from pensieve.loaders.default_model import default_model_path

    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ns = ap.parse_args()
    folder = ns.folder or cached_conversion(default_model_path(), MLX_CACHE, q_bits=0, dtype="bfloat16")
    m = load_mlx_model(folder)
    ids = m.tokenizer.encode("Once upon a time, in a small village by the sea, there lived")
    n = ns.tokens
    for _ in range(ns.repeats):
        cache = make_prompt_cache(m.model)
        logits = m.model(mx.array([ids]), cache=cache)
        mx.eval(logits)
        started = time.perf_counter()
        for _ in range(n):
            logits = m.model(mx.argmax(logits[0, -1]).reshape(1, 1), cache=cache)
            mx.eval(logits)
        ref = n / (time.perf_counter() - started)
        engine = mlx_engine(m, EngineConfig(context_length=2048, max_num_seqs=4))
        engine.add_request("a", ids, SamplingParams(max_tokens=n + 1, temperature=0.0,
                                                    ignore_eos=True))
        engine.step()  # the prefill and first token
        started = time.perf_counter()
        while engine.has_work():
            engine.step()
        ours = n / (time.perf_counter() - started)
        print(f"mlx-lm loop {ref:.1f} tok/s; Pensieve engine on MlxRunner {ours:.1f} tok/s "
              f"({ours / ref:.2f}x)")


if __name__ == "__main__":
    main()
