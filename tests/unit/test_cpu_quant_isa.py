"""The kernels' two instruction sets — AVX2 (the fallback every x86-64 CPU with AVX2 runs) and
AVX-512 VNNI (chosen where the CPU has it) — give the same results on every code format, and
the choice follows the CPU features and ``PENSIEVE_CPU_ISA``."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends.cpu_quant import build
from pensieve.backends.cpu_quant.codes_linear import CodesLinear
from pensieve.loaders.int4_codes import quant_groups
from tests.unit.test_cpu_quant_codes import (
    BLOCK_32, BLOCK_256, KERNELS, activations, random_tensor, rel_err,
)

pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")
HAS_VNNI = all(f in build.cpu_features() for f in build.VNNI_FEATURES)
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this CPU")


@pytest.fixture
def restore_isa():
    before = KERNELS.isa
    yield
    KERNELS.set_isa(before)


def run(layer: CodesLinear, x: torch.Tensor, isa: str, kind: int = 1) -> torch.Tensor:
    """y = x @ W.T (+ b) on ``isa``; kind 1: the row tiles, 2: the panel GEMM."""
    assert KERNELS.set_isa(isa) == isa
    y = torch.empty(x.shape[0], layer.out_features)
    KERNELS.pqx_linear(x.data_ptr(), x.shape[0], layer._address, y.data_ptr(), 2, kind)
    return y


@needs_vnni
@pytest.mark.parametrize("qtype,k,n", [
    *[(t, 896, 37) for t in BLOCK_32], *[(t, 1536, 45) for t in BLOCK_256],
    (Q.Q4_0, 96, 7), (Q.Q4_1, 32, 40), (Q.Q6_K, 256, 16)])  # odd block counts, one block
def test_vnni_row_tiles_match_avx2_and_float(restore_isa, qtype, k, n):
    raw = random_tensor(qtype, n, k, seed=k + n)
    layer = CodesLinear(KERNELS, quant_groups(raw, qtype, (n, k)), bias=torch.randn(n))
    exact = layer.dequantize()
    for m in (1, 2, 3, 4, 5, 7):  # every row tiling of the row-tile kernel
        x = activations(m, k, seed=m)
        vnni, avx2 = run(layer, x, "avx512_vnni"), run(layer, x, "avx2")
        # the same int16 activations and exact int32 block sums: only float rounding differs
        assert rel_err(vnni, avx2) < 1e-6, m
        # int16 activation blocks: ~1e-5 of float, ≤ 3e-4 where K is 3 blocks and one of
        # them holds the outlier channel
        assert rel_err(vnni, x @ exact.T + layer.bias) < 3e-4, m


@pytest.mark.parametrize("isa", ["avx2", pytest.param("avx512_vnni", marks=needs_vnni)])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q5_1])
def test_a_row_does_not_depend_on_the_rows_batched_with_it(restore_isa, isa, qtype):
    k, n = 768, 70
    raw = random_tensor(qtype, n, k, seed=5)
    layer = CodesLinear(KERNELS, quant_groups(raw, qtype, (n, k)), bias=torch.randn(n))
    x = activations(7, k, seed=11)
    full = run(layer, x, isa)
    for m in (1, 2, 3, 4, 5, 6):  # other tilings: 4 weight rows × 1, 2 × 2, 1 × 3, 1 × 4 ...
        assert torch.equal(run(layer, x[:m].contiguous(), isa), full[:m]), m
    for i in (0, 4, 6):
        assert torch.equal(run(layer, x[i:i + 1].contiguous(), isa)[0], full[i]), i


def test_the_default_follows_the_cpu_features_and_the_env(monkeypatch):
    monkeypatch.delenv("PENSIEVE_CPU_ISA", raising=False)
    monkeypatch.setattr(build, "cpu_features", lambda: ("avx2", "fma", "f16c", *build.VNNI_FEATURES))
    assert build.default_isa() == "avx512_vnni"
    monkeypatch.setenv("PENSIEVE_CPU_ISA", "avx2")
    assert build.default_isa() == "avx2"  # the forced fallback
    monkeypatch.setenv("PENSIEVE_CPU_ISA", "avx512_vnni")
    monkeypatch.setattr(build, "cpu_features", lambda: ("avx2", "fma", "f16c", "avx512f"))
    assert build.default_isa() == "avx2"  # asked for, but not on this CPU


def test_the_library_refuses_what_the_cpu_lacks(restore_isa):
    assert KERNELS.set_isa("avx2") == "avx2" and KERNELS.isa == "avx2"
    # the C side checks the CPU itself: VNNI only where __builtin_cpu_supports says so
    assert KERNELS.set_isa("avx512_vnni") == ("avx512_vnni" if HAS_VNNI else "avx2")


@needs_vnni
@pytest.mark.parametrize("qtype,k,n", [
    (Q.Q4_K, 1536, 45), (Q.Q4_0, 96, 7), (Q.Q4_1, 32, 40), (Q.Q6_K, 256, 16), (Q.Q8_0, 896, 37),
    (Q.Q5_1, 896, 77), (Q.Q5_K, 512, 200)])  # partial 32-wide panels, one block, odd blocks
def test_vnni_gemm_is_bitwise_the_avx2_gemm(restore_isa, qtype, k, n):
    raw = random_tensor(qtype, n, k, seed=k + n)
    layer = CodesLinear(KERNELS, quant_groups(raw, qtype, (n, k)), bias=torch.randn(n))
    exact = layer.dequantize()
    for m in (1, 6, 16, 49, 300):
        x = activations(m, k, seed=m)
        vnni = run(layer, x, "avx512_vnni", kind=2)
        # the same exact int32 block sums, scaled and summed by the same float operations
        assert torch.equal(vnni, run(layer, x, "avx2", kind=2)), m
        assert rel_err(vnni, x @ exact.T + layer.bias) < 3e-4, m


@needs_vnni
def test_vnni_gemm_rows_do_not_depend_on_the_batch(restore_isa):
    k, n = 512, 100
    raw = random_tensor(Q.Q4_K, n, k, seed=2)
    layer = CodesLinear(KERNELS, quant_groups(raw, Q.Q4_K, (n, k)), bias=torch.randn(n))
    x = activations(301, k, seed=4)
    full = run(layer, x, "avx512_vnni", kind=2)
    for m in (300, 49, 6):
        assert torch.equal(run(layer, x[:m].contiguous(), "avx512_vnni", kind=2), full[:m]), m
    for i in (0, 3, 4, 298):
        assert torch.equal(run(layer, x[i:i + 1].contiguous(), "avx512_vnni", kind=2)[0], full[i])
