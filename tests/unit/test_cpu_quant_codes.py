"""Every GGUF type the CPU kernels keep as codes, against gguf's reference dequantisation + a
float matmul: decode rows (row-tile kernel) and prefill rows (panel GEMM), odd shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from pensieve.backends.cpu_quant import load_kernels
from pensieve.backends.cpu_quant.codes_linear import F_Q4, F_Q6, F_Q8, CodesLinear, blocks_fit
from pensieve.loaders.int4_codes import Int8Groups, quant_groups
from pensieve.loaders.quants import dequantize, reference_dequantize
from pensieve.models.quant_linear import Int4Groups
from tests.helpers.integer_gemm import integer_gemm  # noqa: F401  (autouse)

KERNELS = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")


# byte offsets of each type's float16 scales (kept in a sane range in the random blocks)
SCALE_BYTES = {Q.Q8_0: (0,), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
               Q.IQ4_NL: (0,), Q.IQ4_XS: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2)}
BLOCK_32 = (Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.Q4_0, Q.Q4_1)
BLOCK_256 = (Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.Q4_K)


def random_tensor(qtype: Q, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in SCALE_BYTES[qtype]:
        raw[:, at:at + 2] = rng.uniform(0.001, 0.05, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(-1))


def activations(m: int, k: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 40  # an outlier channel, as RMSNorm outputs have
    return x


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def assert_rounded_scales(got: torch.Tensor, groups: Int4Groups | Int8Groups, ref: torch.Tensor,
                          exact: bool) -> None:
    """got == ref, up to the float16 rounding of each scale and offset where the file stores
    them as products (d·sc): |error| ≤ 2^-11 · (|scale·code| + |offset|) per value."""
    if exact:
        assert torch.equal(got, ref)
        return
    n, k = ref.shape
    g = groups.group_size
    step = (groups.codes.view(n, k // g, g).float() * groups.scales.float()[..., None]).abs()
    bound = step.view(n, k)
    if groups.offsets is not None:
        bound = bound + groups.offsets.float().abs().repeat_interleave(32, dim=1)
    assert ((got - ref).abs() <= bound * 2 ** -11 * 1.001 + 1e-9).all()


def run(layer: CodesLinear, x: torch.Tensor, kind: int, threads: int = 2) -> torch.Tensor:
    """kind 1: the row-tile kernel, 2: the panel GEMM, 0: as the module picks."""
    y = torch.empty(x.shape[0], layer.out_features)
    KERNELS.pqx_linear(x.data_ptr(), x.shape[0], layer._address, y.data_ptr(), threads, kind)
    return y


@pytest.mark.parametrize("qtype", [*BLOCK_32, *BLOCK_256])
def test_codes_are_the_reference_weights(qtype):
    k = 256 if qtype in BLOCK_256 else 96
    raw = random_tensor(qtype, 5, k)
    groups = quant_groups(raw, qtype, (5, k))
    assert isinstance(groups, Int4Groups if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else Int8Groups)
    ref = reference_dequantize(raw, qtype, (5, k))
    assert torch.equal(dequantize(raw, qtype, (5, k)), ref)
    products = qtype in (Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.Q4_K)
    assert_rounded_scales(groups.dequantize(), groups, ref, exact=not products)


@pytest.mark.parametrize("qtype,k,n", [
    *[(t, 896, 37) for t in BLOCK_32], *[(t, 4864, 21) for t in (Q.Q5_0, Q.Q8_0)],
    *[(t, 1536, 45) for t in BLOCK_256], (Q.Q6_K, 256, 16)])
def test_kernels_match_reference_dequantise_and_float_matmul(qtype, k, n):
    raw = random_tensor(qtype, n, k, seed=k + n)
    groups = quant_groups(raw, qtype, (n, k))
    layer = CodesLinear(KERNELS, groups, bias=torch.randn(n), threads=2)
    ref_w = reference_dequantize(raw, qtype, (n, k))
    exact = layer.dequantize()
    assert_rounded_scales(exact, groups, ref_w, exact=qtype in BLOCK_32)
    for m in (1, 2, 3, 5, 16, 49, 300):
        x = activations(m, k, seed=m)
        want = x @ ref_w.T + layer.bias
        tiles, gemm = run(layer, x, 1), run(layer, x, 2)
        # int16 activations: ~1e-5 of float; the scales' float16 rounding adds ≤ 2^-11
        assert rel_err(tiles, x @ exact.T + layer.bias) < 1e-4, m
        assert rel_err(gemm, tiles) < 1e-5, m
        assert rel_err(layer(x), want) < 1e-3, m


def test_a_fused_projection_mixes_formats_in_one_call():
    """q and k as Q4_K, v as Q6_K (as llama.cpp's Q4_K_M writes them), a Q5_0 tail block."""
    k = 512
    types = [(Q.Q4_K, 64), (Q.Q4_K, 32), (Q.Q6_K, 32), (Q.Q5_0, 19)]
    raws = [random_tensor(t, n, k, seed=i) for i, (t, n) in enumerate(types)]
    parts = [quant_groups(r, t, (n, k)) for r, (t, n) in zip(raws, types)]
    assert blocks_fit(parts)
    layer = CodesLinear(KERNELS, parts, bias=torch.randn(147))
    assert layer.formats == [F_Q4, F_Q6, F_Q8] and layer.block_rows == [96, 32, 19]
    ref_w = torch.cat([reference_dequantize(r, t, (n, k)) for r, (t, n) in zip(raws, types)])
    for m in (1, 4, 64):
        x = activations(m, k, seed=m)
        assert rel_err(layer(x), x @ ref_w.T + layer.bias) < 1e-3
        assert rel_err(run(layer, x, 2), run(layer, x, 1)) < 1e-5
    for (start, n), g, r, (t, _) in zip(((0, 64), (64, 32), (96, 32), (128, 19)), parts, raws, types):
        got = layer.dequantize()[start:start + n]
        assert_rounded_scales(got, g, reference_dequantize(r, t, (n, k)), exact=t is Q.Q5_0)


def test_parts_no_kernel_takes_are_refused():
    raw = random_tensor(Q.Q8_0, 4, 96)
    g = quant_groups(raw, Q.Q8_0, (4, 96))
    odd = Int8Groups(g.codes[:, :80].contiguous(), g.scales[:, :2].contiguous().repeat(1, 5)[:, :5],
                     None, 16)
    assert not blocks_fit([odd])
    four = [quant_groups(random_tensor(t, 4, 256), t, (4, 256))
            for t in (Q.Q4_K, Q.Q6_K, Q.Q4_K, Q.Q6_K)]
    assert not blocks_fit(four)
    with pytest.raises(ValueError):
        CodesLinear(KERNELS, four)
