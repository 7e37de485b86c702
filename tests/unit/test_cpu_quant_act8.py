"""The AVX-512 VNNI panel GEMM on int8 activations (``vnni8_gemm_source.py``, opt-in): every
code format against the dequantised weights' float matmul and against the int16 GEMM, with the
error stated; a row's result does not depend on the rows batched with it; the switch takes
effect only where the VNNI kernels run."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends.cpu_quant import load_kernels
from pensieve.backends.cpu_quant.codes_linear import CodesLinear
from pensieve.loaders.int4_codes import quant_groups
from tests.unit.test_cpu_quant_codes import activations, random_tensor, rel_err, run

KERNELS = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None or KERNELS.set_isa("avx512_vnni") != "avx512_vnni",
                                reason="no AVX-512 VNNI kernels here")

CASES = [(Q.Q4_0, 896, 37), (Q.Q4_1, 896, 40), (Q.Q8_0, 896, 45), (Q.Q5_0, 896, 33),
         (Q.Q5_1, 896, 32), (Q.IQ4_NL, 896, 35), (Q.Q4_K, 1536, 45), (Q.Q5_K, 1536, 40),
         (Q.Q6_K, 1536, 45), (Q.IQ4_XS, 512, 70)]


@pytest.fixture
def act8():
    """int8 activations on for the test, the process's setting back after."""
    before = KERNELS.act8
    assert KERNELS.set_act8(True)
    yield
    KERNELS.set_act8(before)


def gemm(layer: CodesLinear, x: torch.Tensor, int8: bool) -> torch.Tensor:
    KERNELS.set_act8(int8)
    return run(layer, x, 2)


@pytest.mark.parametrize("qtype,k,n", CASES)
def test_int8_activations_against_float_and_int16(qtype, k, n, act8):
    """int8 activations round each value to max|x|/254 of its block (int16: /65534): 2.5-5.5e-3
    relative on Gaussian activations, 0.6-1.1e-2 with an outlier channel 40× the rest (it
    sets its blocks' scale), against 2-8e-5 for the int16 GEMM."""
    raw = random_tensor(qtype, n, k, seed=k + n)
    layer = CodesLinear(KERNELS, quant_groups(raw, qtype, (n, k)), bias=torch.randn(n), threads=2)
    w = layer.dequantize()
    for m, outlier in ((9, False), (64, False), (300, True)):
        x = activations(m, k, seed=m) if outlier else torch.randn(
            m, k, generator=torch.Generator().manual_seed(m))
        want = x @ w.T + layer.bias
        int16, int8 = gemm(layer, x, False), gemm(layer, x, True)
        assert rel_err(int16, want) < 1e-4, m
        bound = 2e-2 if outlier else 8e-3
        assert rel_err(int8, want) < bound, (m, rel_err(int8, want))
        assert rel_err(int8, int16) < bound, m
        assert rel_err(int8, want) > 10 * rel_err(int16, want)  # the int8 path did run


def test_a_row_does_not_depend_on_the_rows_batched_with_it(act8):
    raw = random_tensor(Q.Q4_K, 70, 1536, seed=3)
    layer = CodesLinear(KERNELS, quant_groups(raw, Q.Q4_K, (70, 1536)))
    x = torch.randn(37, 1536, generator=torch.Generator().manual_seed(0))
    whole = gemm(layer, x, True)
    assert torch.equal(whole[5:14], gemm(layer, x[5:14].contiguous(), True))


def test_the_switch_is_vnni_only(act8):
    raw = random_tensor(Q.Q8_0, 40, 896)
    layer = CodesLinear(KERNELS, quant_groups(raw, Q.Q8_0, (40, 896)))
    x = torch.randn(32, 896, generator=torch.Generator().manual_seed(1))
    try:
        assert KERNELS.set_isa("avx2") == "avx2"
        assert not KERNELS.act8  # asked for, but AVX2 has no int8 GEMM: the int16 one runs
        KERNELS.set_act8(True)
        on = run(layer, x, 2)
        KERNELS.set_act8(False)
        assert torch.equal(on, run(layer, x, 2))
    finally:
        KERNELS.set_isa("avx512_vnni")
    assert KERNELS.set_act8(True) and not torch.equal(run(layer, x, 2), on)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0])
def test_a_massive_row_is_computed_on_int16(qtype, act8):
    """A row one value of which holds most of its energy (a first token's massive activations
    after RMSNorm) loses the rest of its int8 block: such rows run on int16 (the row tiles),
    as close as the int16 GEMM; the other rows stay int8; past K = 4096 (the MLP's down input,
    peaked in ordinary rows too) nothing falls back."""
    k, n = 1536, 40
    layer = CodesLinear(KERNELS, quant_groups(random_tensor(qtype, n, k, seed=7), qtype, (n, k)),
                        bias=torch.randn(n), threads=2)
    want_of = lambda x: x @ layer.dequantize().T + layer.bias  # noqa: E731
    x = torch.randn(12, k, generator=torch.Generator().manual_seed(3))
    x[4, 5] = 60.0  # 60² = 3600 > 0.6 · (3600 + ~1535): massive
    x[7, 9] = 30.0  # 900 < 0.6 · (900 + ~1535): an ordinary outlier, stays int8
    got, int16, want = gemm(layer, x, True), gemm(layer, x, False), want_of(x)
    assert rel_err(got[4], want[4]) < 1e-4 and rel_err(int16[4], want[4]) < 1e-4
    assert rel_err(got[7], want[7]) > 10 * rel_err(int16[7], want[7])  # int8 ran there
    # that row in a batch of one (the row tiles: int16 anyway) matches the batched result
    assert torch.allclose(gemm(layer, x[4:5].contiguous(), True)[0], got[4], rtol=1e-5, atol=1e-4)
    if qtype == Q.Q4_K:  # K > 4096: no fallback, the row stays int8
        k2 = 4608
        wide = CodesLinear(KERNELS, quant_groups(random_tensor(qtype, n, k2, seed=8), qtype, (n, k2)),
                           threads=2)
        xw = torch.randn(9, k2, generator=torch.Generator().manual_seed(4))
        xw[2, 5] = 200.0
        ref = xw @ wide.dequantize().T
        assert rel_err(gemm(wide, xw, True)[2], ref[2]) > 10 * rel_err(gemm(wide, xw, False)[2], ref[2])
