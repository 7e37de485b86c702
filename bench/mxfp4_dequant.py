"""MXFP4 dequantisation speed: a gpt-oss-20b expert tensor's shape ([E, 2880, 2880], ``--experts``
of its 32) from random GGML blocks through ``loaders/quants.dequantize`` and HF blocks/scales
through ``loaders/mxfp4.hf_blocks``, against gguf-py's reference (checked equal); and the same
GGML blocks kept as int8 codes + float16 scales (``mxfp4.ggml_int8``, the CUDA experts' form,
checked equal to the floats; exponents 104-143, where float16 holds the scale).

    .venv/bin/python -m bench.mxfp4_dequant --experts 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from pensieve.loaders import mxfp4
from pensieve.loaders.quants import dequantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", type=int, default=8)
    experts = parser.parse_args().experts
    shape = (experts, 2880, 2880)
    blocks = experts * 2880 * 90
    raw = np.random.default_rng(0).integers(0, 256, size=(blocks, 17), dtype=np.uint8)
    raw[:, 0] = np.random.default_rng(1).integers(104, 140, size=blocks, dtype=np.uint8)
    start = time.perf_counter()
    ours = dequantize(torch.from_numpy(raw.reshape(-1)), GGMLQuantizationType.MXFP4, shape)
    t_ours = time.perf_counter() - start
    hf_codes = torch.from_numpy(raw[:, 1:].copy()).reshape(experts, 2880, 90, 16)
    hf_scales = torch.from_numpy(raw[:, 0].copy()).reshape(experts, 2880, 90)
    start = time.perf_counter()
    mxfp4.hf_blocks(hf_codes, hf_scales)
    t_hf = time.perf_counter() - start
    start = time.perf_counter()
    ref = gguf_dequantize(raw, GGMLQuantizationType.MXFP4)
    t_ref = time.perf_counter() - start
    assert torch.equal(ours, torch.from_numpy(ref).reshape(shape))
    start = time.perf_counter()
    codes, scales = mxfp4.ggml_int8(torch.from_numpy(raw.reshape(-1)), experts * 2880, 2880)
    t_int8 = time.perf_counter() - start
    back = (codes.view(-1, 32).float() * scales.view(-1, 1).float()).view(shape)
    assert torch.equal(back, ours)
    n = ours.numel() / 1e6
    print(f"{n:.0f}M weights, {torch.get_num_threads()} threads: GGML blocks {t_ours:.2f} s, "
          f"HF blocks {t_hf:.2f} s, gguf-py {t_ref:.2f} s ({t_ref / t_ours:.1f}x), "
          f"GGML blocks -> int8 codes {t_int8:.2f} s")


if __name__ == "__main__":
    main()
