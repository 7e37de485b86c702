"""The many-row integer GEMM (``gemm_source.py``) against the row-tile kernel and float matmuls."""

from __future__ import annotations

import pytest
import torch

from pensieve.backends.cpu_quant import Q4Linear, Q8Linear, load_kernels, pack_q8
from pensieve.backends.cpu_quant.mlp import Q4MLP
from tests.unit.test_cpu_quant import groups, rel_err
from tests.helpers.integer_gemm import integer_gemm  # noqa: F401  (autouse)

KERNELS = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")

ROWS = (1, 7, 47, 48, 49, 300, 513)  # every remainder of the 4-row tile, and chunk sizes


def activations(m: int, k: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 40  # an outlier channel, as RMSNorm outputs have
    return x


def run(fn_name: str, layer: Q4Linear | Q8Linear, x: torch.Tensor, threads: int) -> torch.Tensor:
    """y = x @ W.T (+ b) by one of the C entry points (pq4_gemm, pq4_small, pq8_gemm...)."""
    y = torch.empty(x.shape[0], layer.out_features)
    getattr(KERNELS.lib, fn_name)(x.data_ptr(), x.shape[0], layer.in_features, *layer._args,
                                  y.data_ptr(), threads)
    return y


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (576, 3072), (96, 7), (32, 40)])
def test_q4_gemm_matches_the_row_tile_kernel_and_float(k, n, threads):
    g = groups(n, k, seed=k + n)
    layer = Q4Linear(KERNELS, g, bias=torch.randn(n), threads=threads)
    weight = g.dequantize()
    for m in ROWS:
        x = activations(m, k, seed=m)
        got = run("pq4_gemm", layer, x, threads)
        # same int16 activations and int32 block sums; only the float summation order differs
        assert rel_err(got, run("pq4_small", layer, x, threads)) < 1e-6, m
        assert rel_err(got, x @ weight.T + layer.bias) < 1e-4, m


@pytest.mark.parametrize("k,n", [(576, 576), (64, 40)])
def test_q8_gemm_matches_the_row_tile_kernel_and_float(k, n):
    weight = torch.randn(n, k) * 0.05
    codes, scales = pack_q8(KERNELS, weight)
    layer = Q8Linear(KERNELS, codes, scales, bias=torch.randn(n), threads=2)
    exact = layer.dequantize()
    for m in (1, 5, 48, 301):
        x = activations(m, k, seed=m)
        got = run("pq8_gemm", layer, x, 2)
        assert rel_err(got, run("pq8_small", layer, x, 2)) < 1e-6, m
        assert rel_err(got, x @ exact.T + layer.bias) < 1e-4, m


@pytest.mark.parametrize("fn", ["pq4_gemm", "pq8_gemm"])
def test_a_row_does_not_depend_on_the_rows_batched_with_it(fn):
    k, n = 576, 200  # 200: a partial last panel
    if fn == "pq4_gemm":
        layer = Q4Linear(KERNELS, groups(n, k, seed=3), bias=torch.randn(n))
    else:
        layer = Q8Linear(KERNELS, *pack_q8(KERNELS, torch.randn(n, k) * 0.05), bias=torch.randn(n))
    x = activations(513, k, seed=9)
    full = run(fn, layer, x, 2)
    for m in (300, 49, 6):  # other batch sizes: rows fall in other tiles and tile remainders
        assert torch.equal(run(fn, layer, x[:m].contiguous(), 1), full[:m]), m
    for i in (0, 3, 4, 298, 512):
        assert torch.equal(run(fn, layer, x[i:i + 1].contiguous(), 2)[0], full[i]), i


def test_modules_take_the_gemm_from_a_few_rows():
    """Q4Linear and the fused MLP run the integer kernels at every row count (no float path
    by default), the GEMM from a few rows on: bitwise what pq4_gemm gives."""
    gate_up = Q4Linear(KERNELS, groups(2 * 96, 64, seed=1))
    down = Q4Linear(KERNELS, groups(64, 96, seed=2), bias=torch.randn(64))
    mlp = Q4MLP(gate_up, down)
    for m in (1, 3, 8, 60, 513):
        x = activations(m, 64, seed=m)
        y = gate_up(x)
        if m >= 8:
            assert torch.equal(y, run("pq4_gemm", gate_up, x, gate_up.threads)), m
        gate, up = y.chunk(2, dim=-1)
        expected = down(torch.nn.functional.silu(gate) * up)
        assert rel_err(mlp(x), expected) < 1e-6, m
        ref_g, ref_u = (x @ gate_up.dequantize().T).chunk(2, dim=-1)
        ref = (torch.nn.functional.silu(ref_g) * ref_u) @ down.dequantize().T + down.bias
        assert rel_err(mlp(x), ref) < 3e-4, m  # two int16-quantised matmuls in a row


def test_a_long_k_keeps_the_row_tiles_below_16_rows():
    """down_proj's K = 1536: the row-tile kernel is faster there up to 15 rows."""
    down = Q4Linear(KERNELS, groups(64, 1536, seed=3))
    for m, kernel in ((8, "pq4_small"), (15, "pq4_small"), (16, "pq4_gemm")):
        x = activations(m, 1536, seed=m)
        assert torch.equal(down(x), run(kernel, down, x, down.threads)), m
