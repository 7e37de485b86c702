"""The fused SwiGLU prefill GEMM (``swiglu_gemm_source.py``): ``pqx_mlp`` with gate/up and SiLU
in one pass of the VNNI panel GEMM gives bitwise what the unfused steps give — the VNNI (or
the AVX2) GEMM into [gate | up], then ``silu_rows`` — on every tiling, code format and thread
count, and a gate/up in two formats (not fused) still runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from pensieve.backends.cpu_quant import build
from pensieve.backends.cpu_quant.codes_linear import CodesLinear
from pensieve.loaders.int4_codes import quant_groups
from tests.unit.test_cpu_quant_codes import KERNELS, activations, random_tensor, rel_err

pytestmark = [
    pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here"),
    pytest.mark.skipif(not all(f in build.cpu_features() for f in build.VNNI_FEATURES),
                       reason="no AVX-512 VNNI on this CPU (the fused GEMM is VNNI's)"),
]


@pytest.fixture
def restore_isa():
    before = KERNELS.isa
    yield
    KERNELS.set_isa(before)


def layer(qtypes: tuple[Q, ...], n: int, k: int, seed: int, bias: bool) -> CodesLinear:
    rows = n // len(qtypes)
    parts = [quant_groups(random_tensor(t, rows, k, seed=seed + i), t, (rows, k))
             for i, t in enumerate(qtypes)]
    return CodesLinear(KERNELS, parts, bias=torch.randn(n) if bias else None)


def mlp(gu: CodesLinear, down: CodesLinear, x: torch.Tensor, isa: str, threads: int,
        fuse: int = 1) -> torch.Tensor:
    assert KERNELS.set_isa(isa) == isa
    assert KERNELS.lib.pq_set_swiglu(fuse) == fuse
    y = torch.empty(x.shape[0], down.out_features)
    try:
        KERNELS.pqx_mlp(x.data_ptr(), x.shape[0], gu._address, down._address, y.data_ptr(), threads)
    finally:
        KERNELS.lib.pq_set_swiglu(1)
    return y


def reference(gu: CodesLinear, down: CodesLinear, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gu.dequantize().T + (gu.bias if gu.bias is not None else 0)).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.dequantize().T + (down.bias if down.bias is not None else 0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("gate_up,down_type,hidden,inner,bias", [
    ((Q.Q4_K,), Q.Q5_1, 256, 96, False),    # Q4_K_M's gate/up: q4 codes with mins, group 32
    ((Q.Q6_K,), Q.Q4_0, 256, 64, True),     # group-16 scales, no mins; a bias on gate and up
    ((Q.Q8_0,), Q.Q8_0, 64, 160, True),     # int8 codes
    ((Q.Q4_0,), Q.Q4_1, 64, 224, False),    # 14 panels of 16: thread shares of odd panel counts
])
def test_fused_mlp_is_bitwise_the_unfused_one(restore_isa, threads, gate_up, down_type, hidden,
                                             inner, bias):
    gu = layer(gate_up, 2 * inner, hidden, seed=inner, bias=bias)
    down = layer((down_type,), hidden, inner, seed=inner + 7, bias=bias)
    for m in (8, 13, 16, 31, 300, 513):  # 8-row tiles and every remainder below them
        x = activations(m, hidden, seed=m)
        fused = mlp(gu, down, x, "avx512_vnni", threads)
        # the VNNI GEMM into [gate | up], then silu_rows (pq_set_swiglu(0))
        assert torch.equal(fused, mlp(gu, down, x, "avx512_vnni", threads, fuse=0)), m
        # AVX2: never fused; its GEMM is bitwise the VNNI GEMM
        assert torch.equal(fused, mlp(gu, down, x, "avx2", threads)), m
        assert rel_err(fused, reference(gu, down, x)) < 1e-3, m  # two int16-quantised matmuls


def test_a_row_does_not_depend_on_the_rows_batched_with_it(restore_isa):
    gu = layer((Q.Q4_K,), 2 * 64, 256, seed=1, bias=False)
    down = layer((Q.Q4_K,), 256, 64, seed=2, bias=False)
    x = activations(300, 256, seed=3)
    full = mlp(gu, down, x, "avx512_vnni", 2)
    for m in (16, 41, 299):
        assert torch.equal(mlp(gu, down, x[:m].contiguous(), "avx512_vnni", 1), full[:m]), m


def test_gate_and_up_in_two_formats_run_unfused(restore_isa):
    hidden, inner, gate_up = 256, 64, (Q.Q4_K, Q.Q6_K)
    gu = layer(gate_up, 2 * inner, hidden, seed=4, bias=True)
    down = layer((Q.Q4_0,), hidden, inner, seed=5, bias=True)
    for m in (8, 300):
        x = activations(m, hidden, seed=m)
        got = mlp(gu, down, x, "avx512_vnni", 2)
        assert torch.equal(got, mlp(gu, down, x, "avx2", 2)), m
        assert rel_err(got, reference(gu, down, x)) < 1e-3, m
