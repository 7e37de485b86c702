"""MXFP4 dequantisation: GGML's block type against a block computed by hand and against gguf-py's
reference, the test quantiser against gguf-py's, and the HF blocks/scales layout against
transformers' own conversion; gpt-oss's HF expert layout → the stacked module names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from pensieve.loaders import hf_experts, mxfp4
from pensieve.loaders.quants import dequantize
from tests.helpers.tiny_gpt_oss import ggml_mxfp4_bytes, hf_mxfp4_blocks, mxfp4_codes

Q = GGMLQuantizationType
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_a_block_by_hand():
    """e = 129 → scale 2^(129 − 127) = 4; byte j holds code j (low) and 15 − j (high)."""
    qs = [j | ((15 - j) << 4) for j in range(16)]
    raw = torch.tensor([129, *qs], dtype=torch.uint8)
    got = dequantize(raw, Q.MXFP4, (32,))
    expected = [4 * FP4[j] for j in range(16)] + [4 * FP4[15 - j] for j in range(16)]
    assert got.tolist() == expected
    assert got[:8].tolist() == [0, 2, 4, 6, 8, 12, 16, 24]


def test_tiny_scales_are_exact_denormals():
    """e = 0 and 1 (ggml's special-cased denormal halves): 2^-127 and 2^-126 times the code."""
    raw = torch.tensor([[0, 0x71] + [0] * 15, [1, 0x07] + [0] * 15], dtype=torch.uint8)
    got = dequantize(raw.reshape(-1), Q.MXFP4, (2, 32))
    assert got[0, 0].item() == 0.5 * 2.0 ** -127 and got[0, 16].item() == 6.0 * 2.0 ** -127
    assert got[1, 0].item() == 6.0 * 2.0 ** -126


def test_equals_gguf_reference_on_random_bytes():
    data = np.random.default_rng(5).integers(0, 256, size=(3 * 8 * 4, 17), dtype=np.uint8)
    got = dequantize(torch.from_numpy(data.reshape(-1).copy()), Q.MXFP4, (3, 8, 128))
    ref = torch.from_numpy(gguf_dequantize(data, Q.MXFP4)).reshape(3, 8, 128)
    assert torch.equal(got, ref)  # inf at e = 255 on both sides included


def test_test_quantiser_writes_what_gguf_quantises():
    w = np.random.default_rng(2).standard_normal((4, 6, 96)).astype(np.float32) * 3
    w[0, 0, :32] = 0.0  # an all-zero block
    codes, exps = mxfp4_codes(w)
    ours = ggml_mxfp4_bytes(codes, exps)
    assert np.array_equal(ours, gguf_quantize(w, Q.MXFP4))
    back = dequantize(torch.from_numpy(ours.reshape(-1).copy()), Q.MXFP4, w.shape)
    assert (back - torch.from_numpy(w)).abs().max() <= torch.from_numpy(w).abs().max() / 4


def test_hf_layout_equals_transformers_conversion():
    """``*_blocks``/``*_scales`` as transformers dequantises them (it returns [E, in, out])."""
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    rng = np.random.default_rng(3)
    blocks = torch.from_numpy(rng.integers(0, 256, size=(2, 6, 3, 16), dtype=np.uint8))
    scales = torch.from_numpy(rng.integers(110, 140, size=(2, 6, 3), dtype=np.uint8))
    ref = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(mxfp4.hf_blocks(blocks, scales).transpose(1, 2), ref)


def test_chunked_decoding_equals_one_piece():
    rng = np.random.default_rng(6)
    ggml = torch.from_numpy(rng.integers(0, 256, size=(50, 17), dtype=np.uint8))
    assert torch.equal(mxfp4.ggml_blocks(ggml, chunk=7), mxfp4.ggml_blocks(ggml))
    blocks = torch.from_numpy(rng.integers(0, 256, size=(3, 5, 2, 16), dtype=np.uint8))
    scales = torch.from_numpy(rng.integers(100, 150, size=(3, 5, 2), dtype=np.uint8))
    assert torch.equal(mxfp4.hf_blocks(blocks, scales, chunk=4), mxfp4.hf_blocks(blocks, scales))


def test_hf_and_ggml_layouts_hold_the_same_numbers():
    w = np.random.default_rng(4).standard_normal((2, 4, 64)).astype(np.float32)
    codes, exps = mxfp4_codes(w)
    hf = mxfp4.hf_blocks(torch.from_numpy(hf_mxfp4_blocks(codes)), torch.from_numpy(exps))
    raw = torch.from_numpy(ggml_mxfp4_bytes(codes, exps).reshape(-1).copy())
    assert torch.equal(hf, dequantize(raw, Q.MXFP4, w.shape))


def test_gpt_oss_hf_experts_become_stacked_names():
    """Float [E, H, 2I] with interleaved gate/up columns, biases, and MXFP4 blocks."""
    e, h, inner = 3, 64, 32
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(e, h, 2 * inner, generator=g), torch.randn(e, inner, h, generator=g)
    gu_bias, down_bias = torch.randn(e, 2 * inner, generator=g), torch.randn(e, h, generator=g)
    codes, exps = mxfp4_codes(gate_up.transpose(1, 2).contiguous().numpy())
    p = "model.layers.0.mlp.experts."
    tensors = {p + "gate_up_proj": gate_up, p + "down_proj": down,
               p + "gate_up_proj_bias": gu_bias, p + "down_proj_bias": down_bias}
    sources, shapes = hf_experts.plan({n: tuple(t.shape) for n, t in tensors.items()}, {},
                                      "gpt_oss")
    out = hf_experts.assemble(tensors, sources)
    assert {n: tuple(t.shape) for n, t in out.items()} == shapes
    assert torch.equal(out[p + "gate_proj.weight"], gate_up[:, :, ::2].transpose(1, 2))
    assert torch.equal(out[p + "up_proj.weight"], gate_up[:, :, 1::2].transpose(1, 2))
    assert torch.equal(out[p + "down_proj.weight"], down.transpose(1, 2))
    assert torch.equal(out[p + "up_proj.bias"], gu_bias[:, 1::2])
    assert torch.equal(out[p + "down_proj.bias"], down_bias)
    quantised = {p + "gate_up_proj_blocks": torch.from_numpy(hf_mxfp4_blocks(codes)),
                 p + "gate_up_proj_scales": torch.from_numpy(exps)}
    sources, shapes = hf_experts.plan({n: tuple(t.shape) for n, t in quantised.items()}, {},
                                      "gpt_oss")
    assert shapes == {p + "gate_proj.weight": (e, inner, h), p + "up_proj.weight": (e, inner, h)}
    out = hf_experts.assemble(quantised, sources)
    rows = mxfp4.hf_blocks(*quantised.values())
    assert torch.equal(out[p + "gate_proj.weight"], rows[:, ::2])
    assert torch.equal(out[p + "up_proj.weight"], rows[:, 1::2])
