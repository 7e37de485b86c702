"""Pick weight-only int4/int8 kernels only where they beat float on this machine.

PyTorch's CPU int4/int8 weight-only matmuls are fast with AVX-512 but can be ten times
slower than float32 on AVX2-only CPUs; a 1-row matmul timed at start-up decides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from pensieve.models.quant_linear import Int4Groups, Int4Linear, Int8Linear, int4_supported

log = logging.getLogger(__name__)


def _time(fn: Callable[[], torch.Tensor], reps: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def quantized_kernels_win(out_features: int = 1536, in_features: int = 576) -> tuple[bool, bool]:
    """(int4 wins, int8 wins) for a decode-sized matmul against float32."""
    if not int4_supported(32, in_features):
        return False, False
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=gen)
    groups = Int4Groups(
        codes,
        torch.rand(out_features, in_features // 32, generator=gen) * 0.01,
        torch.zeros(out_features, in_features // 32),
        32,
    )
    weight = groups.dequantize()
    int4, int8 = Int4Linear(groups), Int8Linear(weight)
    x = torch.randn(1, in_features, generator=gen)
    with torch.inference_mode():
        t_float = _time(lambda: x @ weight.T)
        t_int4, t_int8 = _time(lambda: int4(x)), _time(lambda: int8(x))
    log.info("1-row matmul %dx%d: float32 %.0f µs, int4 %.0f µs, int8 %.0f µs",
             out_features, in_features, t_float * 1e6, t_int4 * 1e6, t_int8 * 1e6)
    return t_int4 < 0.8 * t_float, t_int8 < 0.8 * t_float
