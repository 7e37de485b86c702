"""The torch dequantisers equal gguf's reference implementation, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from pensieve.loaders.checkpoint import CheckpointError
from pensieve.loaders.quants import SUPPORTED_TYPES, dequantize, reference_dequantize
from tests.unit.loader_fixtures import Q, random_block_bytes

QUANTISABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1]  # gguf.quants can produce these from floats
FAST = QUANTISABLE + [Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", FAST, ids=lambda q: q.name)
def test_fast_path_equals_gguf_on_random_blocks(qtype):
    rows, cols = 48, 512
    block, _ = GGML_QUANT_SIZES[qtype]
    data = random_block_bytes(qtype, rows * cols // block, seed=7)
    got = dequantize(torch.from_numpy(data.copy()), qtype, (rows, cols))
    ref = gguf_dequantize(data.reshape(rows, -1), qtype)
    assert got.shape == (rows, cols) and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(ref))


@pytest.mark.parametrize("qtype", QUANTISABLE, ids=lambda q: q.name)
def test_fast_path_on_quantised_floats(qtype):
    src = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    raw = torch.from_numpy(quantize(src, qtype).reshape(-1).copy())
    got = dequantize(raw, qtype, (16, 64))
    assert torch.equal(got, reference_dequantize(raw, qtype, (16, 64)))
    assert (got - torch.from_numpy(src)).abs().max() < 0.35  # one 4-bit step of N(0,1) blocks


def test_target_dtype_and_3d_shape():
    data = random_block_bytes(Q.Q4_1, 2 * 3 * 64 // 32)
    got = dequantize(torch.from_numpy(data), Q.Q4_1, (2, 3, 64), torch.bfloat16)
    ref = gguf_dequantize(data.reshape(6, -1), Q.Q4_1).reshape(2, 3, 64)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 64)
    assert torch.equal(got, torch.from_numpy(ref).to(torch.bfloat16))


def test_float_types_copy_out_of_the_buffer():
    src = torch.randn(4, 8)
    raw = src.view(torch.uint8).reshape(-1).clone()
    got = dequantize(raw, Q.F32, (4, 8))
    raw.zero_()
    assert torch.equal(got, src)
    half = dequantize(src.half().view(torch.uint8).reshape(-1), Q.F16, (4, 8), torch.float16)
    assert torch.equal(half, src.half())


def test_size_mismatch_and_unsupported_type():
    with pytest.raises(CheckpointError, match="do not hold"):
        dequantize(torch.zeros(35, dtype=torch.uint8), Q.Q8_0, (32,))
    with pytest.raises(CheckpointError, match="unsupported GGUF tensor type TQ1_0"):
        dequantize(torch.zeros(GGML_QUANT_SIZES[Q.TQ1_0][1], dtype=torch.uint8), Q.TQ1_0, (256,))


def test_supported_set_covers_the_brief():
    wanted = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    assert wanted <= SUPPORTED_TYPES
