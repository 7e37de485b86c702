"""`pensieve convert SRC OUT`: an MLX model folder (for ``--backend mlx``) from a HF folder or a
GGUF file — ``default`` names the default SmolLM2 model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pensieve.backends.mlx_convert import DTYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="make an MLX model folder (for --backend mlx) from a "
                       "Hugging Face folder or a GGUF file")
    p.add_argument("src", help="GGUF file or HF safetensors folder; 'default': the default "
                   "SmolLM2-135M model")
    p.add_argument("out", help="the MLX folder to write (must not exist)")
    p.add_argument("--q-bits", type=int, default=4,
                   help="quantise linear weights to this many bits (default 4; 0: keep --dtype)")
    p.add_argument("--q-group-size", type=int, default=64, help="weights per quantisation group")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="float type of the weights not quantised (default bfloat16)")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from pensieve.backends.mlx_backend import mlx_available
    from pensieve.backends.mlx_convert import convert
    from pensieve.loaders.default_model import default_model_path

    if not mlx_available():
        raise ValueError('pensieve convert needs mlx and mlx-lm: pip install "pensieve[mlx]"')
    src = default_model_path() if ns.src == "default" else Path(ns.src).expanduser()
    started = time.perf_counter()
    out = convert(src, ns.out, q_bits=ns.q_bits, q_group_size=ns.q_group_size, dtype=ns.dtype)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s; "
          f"serve it with: pensieve serve --backend mlx --model {out}")
    return 0
