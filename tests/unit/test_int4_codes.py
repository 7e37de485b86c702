"""GGUF 4-bit blocks → exact int4 codes, and the int4/int8 linear layers built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from pensieve.loaders.int4_codes import int4_groups
from pensieve.loaders.quants import dequantize
from pensieve.models.quant_linear import Int4Linear, Int8Linear, int4_supported


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random bytes with sane float16 scales where the block keeps them."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scale_bytes = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2)}[qtype]
    for at in scale_bytes:
        raw[:, at:at + 2] = rng.uniform(0.001, 0.05, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(-1))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_codes_are_exactly_the_dequantised_weights(qtype):
    rows, cols = 8, 512
    raw = random_blocks(qtype, rows, cols)
    groups = int4_groups(raw, qtype, (rows, cols))
    expected = dequantize(raw, qtype, (rows, cols))
    assert groups is not None and int(groups.codes.max()) <= 15
    torch.testing.assert_close(groups.dequantize(), expected, atol=1e-6, rtol=1e-5)


def test_other_types_have_no_code_form():
    assert int4_groups(torch.zeros(84 * 4, dtype=torch.uint8), Q.Q2_K, (4, 256)) is None
    assert int4_groups(torch.zeros(34 * 4, dtype=torch.uint8), Q.Q8_0, (4, 8, 4)) is None


def test_8_bit_types_keep_int8_codes():
    """Q8_0 (and Q5_0, Q6_K... see test_cpu_quant_codes.py) come back as ``Int8Groups``."""
    from pensieve.loaders.int4_codes import Int8Groups

    raw = torch.zeros(34 * 4, dtype=torch.uint8)
    raw.view(4, 34)[:, 2:] = 3
    groups = int4_groups(raw, Q.Q8_0, (4, 32))
    assert isinstance(groups, Int8Groups) and groups.group_size == 32
    assert torch.equal(groups.dequantize(), torch.zeros(4, 32))


@pytest.mark.skipif(not int4_supported(32, 512), reason="no CPU int4 kernel in this torch")
def test_int4_linear_matches_float_matmul():
    raw = random_blocks(Q.Q4_1, 64, 512, seed=1)
    groups = int4_groups(raw, Q.Q4_1, (64, 512))
    layer = Int4Linear(groups)
    x = torch.randn(3, 512)
    torch.testing.assert_close(layer(x), x @ groups.dequantize().T, atol=1e-3, rtol=1e-4)


def test_int8_linear_is_close_to_float():
    w = torch.randn(96, 64)
    x = torch.randn(5, 64)
    ref = x @ w.T
    err = (Int8Linear(w)(x) - ref).abs().max() / ref.abs().max()
    assert err < 0.02


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_0_and_q4_1_stay_packed_and_unpack_to_the_same_codes(qtype):
    from pensieve.models.quant_linear import Int4Groups

    rows, cols = 8, 512
    raw = random_blocks(qtype, rows, cols, seed=3)
    groups = int4_groups(raw, qtype, (rows, cols))
    assert groups.nibbles is not None and groups.shape == (rows, cols)
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])[:, 2 if qtype is Q.Q4_0 else 4:]
    assert torch.equal(groups.codes, torch.cat((blocks & 15, blocks >> 4), 1).reshape(rows, cols))
    unpacked = Int4Groups(groups.codes, groups.scales, groups.offsets, 32)
    assert unpacked.nibbles is None and unpacked.shape == groups.shape
    assert torch.equal(unpacked.dequantize(), groups.dequantize())


def test_q4_k_super_words_are_the_files_bytes_and_rebuild_its_values():
    """``q4_k_super_words``: a 16-byte word quad a super-block — the block's first 16 bytes
    (float16 d, dmin, then the 12 scale bytes) verbatim, 144 bytes a 256 with the codes — and
    ``q4_k_word_factors`` (the kernels' decode: whole-word masks, then sub-block j's byte)
    gives the file's sc/m for all 8 sub-blocks (``loaders.quants.k_scale_codes``; every scale
    byte random: the top bit pairs that make sub-blocks 4-7's high bits set or not) and
    ``d·sc·q − dmin·m`` in float32 — the GGUF dequantisation bit for bit; kept too where the
    products overflow float16 (the unpacked form)."""
    from pensieve.loaders.int4_codes import q4_k_super_words, q4_k_word_factors
    from pensieve.loaders.quants import k_scale_codes

    rows, cols = 6, 512
    for big in (False, True):
        raw = random_blocks(Q.Q4_K, rows, cols, seed=4)
        blocks = raw.view(-1, 144)
        if big:  # d = 65504: d·sc past float16
            blocks[:, 0:2] = torch.tensor([0xFF, 0x7B], dtype=torch.uint8)
        blocks[0, 4:16] = 0xFF  # every bit of the scales set: sc = m = 63 in all 8
        blocks[1, 4:16] = torch.tensor([0xC0] * 8 + [0] * 4, dtype=torch.uint8)  # 48s / 0s
        groups = int4_groups(raw, Q.Q4_K, (rows, cols))
        assert (groups.nibbles is None) == big
        words = q4_k_super_words(groups)
        assert words.shape == (rows, cols // 256 * 4) and words.dtype == torch.int32
        assert torch.equal(words.contiguous().view(torch.uint8).view(-1, 16), blocks[:, :16])
        assert words.numel() * 4 + rows * cols // 2 == raw.numel()  # with the codes: 144 a 256
        d, dmin, sc, m = q4_k_word_factors(words)
        want_sc, want_m = k_scale_codes(blocks[:, 4:16])
        assert torch.equal(sc, want_sc.int().view(rows, -1))
        assert torch.equal(m, want_m.int().view(rows, -1))
        assert (sc[0, :8] == 63).all() and (m[0, :8] == 63).all()  # (row 0: blocks 0 and 1)
        assert sc[0, 8:].tolist() == [0] * 4 + [48] * 4 and m[0, 8:].tolist() == [0] * 4 + [48] * 4
        assert int((sc >= 16).sum()) > 0 and int((m >= 16).sum()) > 0  # high bits in play
        half = blocks[:, :4].contiguous().view(torch.float16).float()
        assert torch.equal(d, half[:, 0].view(rows, -1))
        assert torch.equal(dmin, half[:, 1].view(rows, -1))
        q = groups.codes.view(rows, cols // 32, 32).float()
        scale = d.repeat_interleave(8, 1) * sc.float()
        offset = dmin.repeat_interleave(8, 1) * m.float()
        w = (q * scale[..., None] - offset[..., None]).view(rows, cols)
        assert torch.equal(w, dequantize(raw, Q.Q4_K, (rows, cols)))
    q4_0 = int4_groups(random_blocks(Q.Q4_0, rows, cols), Q.Q4_0, (rows, cols))
    assert q4_k_super_words(q4_0) is None
