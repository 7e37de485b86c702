"""Q6_K ``Int8Groups`` hold only the file's bytes at load (``loaders/int4_codes.Q6KGroups``);
every accessor gives what the eager form gave, bit for bit, the float16 check decides as
materialising the steps did (``q6_k_fits_half``), and the layouts built from it — the CUDA
MoE experts' ``six`` stack, ``cuda_q6k``, the CPU ``F_Q6``/``F_Q8G16`` blocks — are the same
tensors as from the eager form."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from bench.q4k_groups_bytes import held_bytes
from bench.q6k_groups_bytes import eager_q6_k, random_q6_k
from gguf import GGMLQuantizationType as Q

from pensieve.backends import cuda_moe, cuda_q6k
from pensieve.backends.cuda_int8 import block_key, code_layout
from pensieve.loaders.int4_codes import ExpertCodes, Int8Groups, Q6KGroups, quant_groups
from pensieve.loaders.quants import reference_dequantize
from tests.helpers.bit_equal import bit_equal

ROWS, COLS = 6, 512  # 12 super-blocks, two a row


def _set_block(raw: torch.Tensor, block: int, *, d: float | None = None,
               sub: int | None = None) -> None:
    """Block ``block``'s float16 d, and all of its 16 int8 sub-scales to one value."""
    b = raw.view(-1, 210)[block]
    if d is not None:
        b[208:210] = torch.tensor([d], dtype=torch.float16).view(torch.uint8)
    if sub is not None:
        b[192:208] = torch.tensor([sub] * 16, dtype=torch.int8).view(torch.uint8)


CASES = {
    "random": {},
    "d_negative": {"d": -0.0078},
    "d_zero": {"d": 0.0},
    "d_subnormal": {"d": 2.0 ** -24},
    "d_overflows": {"d": 65504.0},
    "d_at_tie": {"d": 585.0, "sub": 112},  # 585·112 = 65520 rounds to inf
    "d_below_tie": {"d": 585.0, "sub": 111},  # 64935: finite
    "d_negative_at_tie": {"d": -585.0, "sub": 112},
    "sub_minus_128_over": {"d": 512.0, "sub": -128},  # −65536
    "sub_minus_128_below": {"d": 511.5, "sub": -128},  # −65472: finite
    "d_inf_sub_zero": {"d": float("inf"), "sub": 0},  # inf·0: NaN steps
    "d_nan": {"d": float("nan")},
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_accessor_matches_the_eager_form(case):
    raw = random_q6_k(ROWS, COLS, seed=7)
    _set_block(raw, 5, **CASES[case])
    ref = eager_q6_k(raw, ROWS, COLS)
    groups = quant_groups(raw, Q.Q6_K, (ROWS, COLS))
    assert (groups is None) == (ref is None)
    if ref is None:
        return
    assert isinstance(groups, Q6KGroups) and isinstance(groups, Int8Groups)
    assert groups.shape == ref.shape == (ROWS, COLS)
    assert (groups.group_size, groups.offsets, groups.ggml_type) == (16, None, "Q6_K")
    assert bit_equal(groups.codes, ref.codes) and bit_equal(groups.scales, ref.scales)
    assert all(bit_equal(a, b) for a, b in zip(groups.k_scales, ref.k_scales, strict=True))
    assert bit_equal(groups.dequantize(), ref.dequantize())


def test_rows_of_part_super_blocks_have_no_k_scales():
    """A [N, K] whose rows are not whole super-blocks (not in a GGUF; the form allows it)."""
    raw = random_q6_k(2, 384, seed=1)  # 3 blocks: 6 rows of 128
    ref, groups = eager_q6_k(raw, 6, 128), quant_groups(raw, Q.Q6_K, (6, 128))
    assert groups.k_scales is None and ref.k_scales is None
    assert bit_equal(groups.codes, ref.codes) and bit_equal(groups.scales, ref.scales)
    assert not cuda_q6k.takes(groups)  # the experts' int8 layout instead, as before
    assert cuda_moe.fmt(groups) == cuda_moe.fmt(ref) == ("int8", 16, False)
    got, want = cuda_moe.stack_tensors(groups), cuda_moe.stack_tensors(ref)
    assert all(bit_equal(a, b) for a, b in zip(got[:2], want[:2], strict=True))
    assert got[2] is want[2] is None


def test_a_fresh_object_holds_the_files_bytes_and_no_more_after_asking():
    rows, cols = 64, 1024
    raw = random_q6_k(rows, cols, seed=3)
    groups = quant_groups(raw, Q.Q6_K, (rows, cols))
    file_bytes = rows * cols // 256 * 210
    assert held_bytes(groups) == file_bytes
    held = {t.untyped_storage().data_ptr() for t in vars(groups).values()
            if isinstance(t, torch.Tensor)}
    assert raw.untyped_storage().data_ptr() not in held  # copies: not the reader's buffer
    groups.codes, groups.scales, groups.k_scales, groups.dequantize()  # noqa: B018
    assert held_bytes(groups) == file_bytes
    assert held_bytes(eager_q6_k(raw, rows, cols)) > file_bytes * 9 // 7  # was 9.56 bits


def test_identity_equality_repr_and_pickle():
    """The dataclass ones would derive every form (and compare tensors)."""
    raw = random_q6_k(ROWS, COLS, seed=4)
    a, b = (quant_groups(raw, Q.Q6_K, (ROWS, COLS)) for _ in range(2))
    assert a == a and a != b and len({a, b}) == 2
    assert "Q6KGroups" in repr(a)
    back = pickle.loads(pickle.dumps(a))
    assert isinstance(back, Q6KGroups) and bit_equal(back.codes, a.codes)


def test_replace_gives_the_plain_eager_form():
    """``dataclasses.replace(q6, k_scales=None)``: int8 codes without the file's factors."""
    raw = random_q6_k(ROWS, COLS, seed=4)
    groups = quant_groups(raw, Q.Q6_K, (ROWS, COLS))
    bare = dataclasses.replace(groups, k_scales=None)
    assert type(bare) is Int8Groups and bare.k_scales is None and not cuda_q6k.takes(bare)
    assert bit_equal(bare.codes, groups.codes) and bit_equal(bare.scales, groups.scales)
    assert (bare.group_size, bare.offsets, bare.ggml_type) == (16, None, "Q6_K")


def test_the_layouts_take_it_as_they_took_the_eager_form():
    raw = random_q6_k(ROWS, COLS, seed=5)
    groups, ref = quant_groups(raw, Q.Q6_K, (ROWS, COLS)), eager_q6_k(raw, ROWS, COLS)
    assert cuda_q6k.takes(groups) and code_layout(groups) == "q6k"
    assert block_key(groups) == block_key(ref) == (16, False)
    assert cuda_moe.fmt(groups) == cuda_moe.fmt(ref) == ("six", 16, False)
    want = reference_dequantize(raw, Q.Q6_K, (ROWS, COLS))  # (float16 d·sc: 2⁻¹¹ relative)
    assert torch.allclose(groups.dequantize(), want, rtol=2 ** -10, atol=0)


@pytest.mark.parametrize("shape,fill", [((6, 512), None), ((6, 128), None), ((2, 256), 0),
                                        ((2, 256), 0xFF), ((2, 256), 0xA5)])
def test_six_packed_is_pack_six_of_the_codes(shape, fill):
    """The file's bytes packed straight into ``pack_six``'s two buffers, bit for bit."""
    raw = random_q6_k(6, 512, seed=9)[: shape[0] * shape[1] // 256 * 210].clone()
    if fill is not None:
        raw.view(-1, 210)[:, :192] = fill
    groups = quant_groups(raw, Q.Q6_K, shape)
    got, want = groups.six_packed(), cuda_q6k.pack_six(eager_q6_k(raw, *shape).codes)
    assert all(bit_equal(a, b) and a.is_contiguous() for a, b in zip(got, want, strict=True))
    assert cuda_q6k.six_of(groups)[0] is not None


def _expert_pair(experts: int, rows: int, cols: int, seed: int
                 ) -> tuple[ExpertCodes, Int8Groups]:
    raw = random_q6_k(experts * rows, cols, seed=seed)
    stacked = quant_groups(raw, Q.Q6_K, (experts, rows, cols))
    return stacked, eager_q6_k(raw, experts * rows, cols)


def test_the_cuda_moe_six_stack_is_the_same_tensors():
    stacked, ref = _expert_pair(4, 32, 512, seed=6)
    assert isinstance(stacked, ExpertCodes) and isinstance(stacked.groups, Q6KGroups)
    got, want = cuda_moe.stack_tensors(stacked.groups), cuda_moe.stack_tensors(ref)
    assert all(bit_equal(a, b) for a, b in zip(got, want, strict=True))


def test_cuda_q6k_buffers_are_the_same_tensors():
    parts = [random_q6_k(r, 512, seed=r) for r in (16, 8)]
    lazy = cuda_q6k.CudaQ6KLinear([quant_groups(p, Q.Q6_K, (r, 512))
                                   for p, r in zip(parts, (16, 8))])
    eager = cuda_q6k.CudaQ6KLinear([eager_q6_k(p, r, 512) for p, r in zip(parts, (16, 8))])
    assert all(bit_equal(a, b) for a, b in zip(lazy.weight_buffers(), eager.weight_buffers()))


def test_the_cpu_blocks_are_the_same_tensors():
    from pensieve.backends.cpu_quant import load_kernels
    from pensieve.backends.cpu_quant.codes_linear import F_Q6, F_Q8G16, _pack_block

    kernels = load_kernels()
    if kernels is None:
        pytest.skip("CPU kernels cannot build here")
    raw = random_q6_k(8, 768, seed=8)
    groups, ref = quant_groups(raw, Q.Q6_K, (8, 768)), eager_q6_k(raw, 8, 768)
    got, want = _pack_block(kernels, [groups]), _pack_block(kernels, [ref])
    assert got[0] == want[0] == F_Q6
    assert all(bit_equal(a, b) for a, b in zip(got[1][:2], want[1][:2], strict=True))
    plain = Int8Groups(groups.codes, groups.scales, None, 16, "Q6_K")  # no factors: F_Q8G16
    got = _pack_block(kernels, [plain])
    want = _pack_block(kernels, [Int8Groups(ref.codes, ref.scales, None, 16, "Q6_K")])
    assert got[0] == want[0] == F_Q8G16
    assert all(bit_equal(a, b) for a, b in zip(got[1][:2], want[1][:2], strict=True))
