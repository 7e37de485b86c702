"""Q4_K ``Int4Groups`` hold only the file's nibbles and factors at load; every accessor gives
the values the eager per-32 products gave, bit for bit, and the float16 check decides the form
as materialising the products did (``loaders/int4_codes.Q4KGroups``, ``q4_k_fits_half``)."""

from __future__ import annotations

import pytest
import torch
from bench.q4k_groups_bytes import held_bytes, random_q4_k
from gguf import GGMLQuantizationType as Q

from pensieve.loaders.int4_codes import Q4KGroups, int4_groups, q4_k_super_words
from pensieve.loaders.quants import _k_scales, _scale, dequantize
from pensieve.models.quant_linear import Int4Groups
from tests.helpers.bit_equal import bit_equal

ROWS, COLS = 6, 512  # 12 super-blocks, two a row


def eager(raw: torch.Tensor, rows: int, cols: int) -> dict[str, torch.Tensor | None]:
    """What the loader built before deriving lazily: the float32 products, their float16
    roundings (None where one overflows: the unpacked form), codes and the file's factors."""
    blocks = raw.reshape(-1, 144)
    sc, mins = _k_scales(blocks[:, 4:16])
    scales = (_scale(blocks, 0) * sc).reshape(rows, cols // 32)
    offsets = (-(_scale(blocks, 2) * mins)).reshape(rows, cols // 32)
    halves = scales.half(), offsets.half()
    fits = bool(torch.isfinite(halves[0]).all() and torch.isfinite(halves[1]).all())
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    codes = torch.cat((qs & 15, qs >> 4), dim=2).reshape(rows, cols)
    out = {"scales": scales, "offsets": offsets, "codes": codes,
           "half_scales": halves[0] if fits else None, "half_offsets": halves[1] if fits else None}
    if cols % 256 == 0:
        out["six"] = blocks[:, 4:16].reshape(rows, -1)
        out["dd"] = blocks[:, :4].contiguous().view(torch.float16).reshape(rows, -1)
    return out


def _set_block(raw: torch.Tensor, block: int, *, d: float | None = None,
               dmin: float | None = None, factors: int | None = None) -> None:
    """Block ``block``'s float16 d/dmin, and all of its 6-bit scale and min bytes to one value."""
    b = raw.view(-1, 144)[block]
    if d is not None:
        b[0:2] = torch.tensor([d], dtype=torch.float16).view(torch.uint8)
    if dmin is not None:
        b[2:4] = torch.tensor([dmin], dtype=torch.float16).view(torch.uint8)
    if factors is not None:
        b[4:16] = factors


CASES = {
    "random": {},
    "d_overflows": {"d": 65504.0},  # d·sc past float16: the unpacked form
    "d_at_tie": {"d": 1040.0, "factors": 0xFF},  # 1040·63 = 65520 rounds to inf
    "d_below_tie": {"d": 1039.0, "factors": 0xFF},  # 65457: finite
    "dmin_at_tie": {"dmin": 1040.0, "factors": 0xFF},
    "dmin_negative_below": {"dmin": -1039.0, "factors": 0xFF},
    "d_negative_at_tie": {"d": -1040.0, "factors": 0xFF},
    "d_inf_factors_zero": {"d": float("inf"), "factors": 0},  # inf·0: NaN products
    "d_nan": {"d": float("nan")},
    "d_subnormal": {"d": 2.0 ** -20, "dmin": 2.0 ** -24},
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_accessor_matches_the_eager_products(case):
    raw = random_q4_k(ROWS, COLS, seed=7)
    _set_block(raw, 5, **CASES[case])
    ref = eager(raw, ROWS, COLS)
    groups = int4_groups(raw, Q.Q4_K, (ROWS, COLS))
    fits = ref["half_scales"] is not None
    assert isinstance(groups, Int4Groups) and isinstance(groups, Q4KGroups) == fits
    assert groups.shape == (ROWS, COLS)
    same = bit_equal
    assert same(groups.scales, ref["scales"]) and same(groups.offsets, ref["offsets"])
    assert same(groups.codes, ref["codes"])
    assert same(groups.k_scales[0], ref["six"]) and same(groups.k_scales[1], ref["dd"])
    if fits:
        nib, hs, ho = groups.nibbles
        assert same(hs, ref["half_scales"]) and same(ho, ref["half_offsets"])
        assert all(same(a, b) for a, b in zip(groups.half_params(), (hs, ho)))
        assert same(nib, groups.packed_codes)
        lo, hi = ref["codes"].view(ROWS, -1, 2, 16).unbind(2)  # value i and i+16 of each 32
        assert same(nib, (lo | (hi << 4)).reshape(ROWS, COLS // 2))
    else:
        assert groups.nibbles is None and groups.packed_codes is None
    w = groups.dequantize()
    eager_w = (ref["codes"].view(ROWS, -1, 32).float() * ref["scales"][..., None]
               + ref["offsets"][..., None]).view(ROWS, COLS)
    assert same(w, eager_w)
    if case == "random":
        assert torch.equal(w, dequantize(raw, Q.Q4_K, (ROWS, COLS)))
    words = q4_k_super_words(groups)
    assert words.shape == (ROWS, COLS // 256 * 4) and words.dtype == torch.int32


def test_a_fresh_q4_k_weight_holds_only_the_files_bytes():
    """4.5 bits a weight: the nibbles, the 6-bit factor bytes and float16 (d, dmin) — no
    float32 or float16 per-32 product — before and after every accessor is asked."""
    raw = random_q4_k(ROWS, COLS, seed=8)
    groups = int4_groups(raw, Q.Q4_K, (ROWS, COLS))
    assert isinstance(groups, Q4KGroups)

    def tensors() -> list[torch.Tensor]:
        found = []
        for value in vars(groups).values():
            items = value if isinstance(value, tuple) else (value,)
            found += [t for t in items if isinstance(t, torch.Tensor)]
        return found

    def check() -> None:
        assert held_bytes(groups) == raw.numel()  # 144 bytes a 256
        assert {t.dtype for t in tensors()} == {torch.uint8, torch.float16}
        assert all(t.numel() == 2 * ROWS * COLS // 256 for t in tensors()
                   if t.dtype == torch.float16)  # (d, dmin) a super-block only

    check()
    groups.nibbles, groups.scales, groups.offsets, groups.half_params()  # noqa: B018
    check()
    groups.codes  # noqa: B018  (the unpacked codes are kept, as for every Int4Groups)
    assert held_bytes(groups) == raw.numel() + ROWS * COLS


def test_the_moe_q4k_layout_reads_no_products(monkeypatch):
    """``cuda_moe.stack_tensors``' default Q4_K layout takes the nibbles and the factors only."""
    from pensieve.backends import cuda_moe

    raw = random_q4_k(ROWS, COLS, seed=9)
    groups = int4_groups(raw, Q.Q4_K, (ROWS, COLS))

    def refuse(self):
        raise AssertionError("a per-32 product was derived")

    for name in ("scales", "offsets"):
        monkeypatch.setattr(Q4KGroups, name, property(refuse))
    monkeypatch.setattr(Q4KGroups, "half_params", refuse)
    w, words, mn, dd = cuda_moe.stack_tensors(groups, ("q4k", 32, False))
    assert torch.equal(w, groups.packed_codes) and mn is None and dd is None
    assert torch.equal(words, q4_k_super_words(groups))
    assert w.nbytes + words.nbytes == raw.numel()  # the file's 144 bytes a 256


def test_part_super_blocks_rows_keep_the_products_and_no_factors():
    """Rows of 128 weights (half a super-block each: not a file's layout, but the form keeps
    the values): the per-32 products as before, no per-row factors."""
    rows, cols = 4, 128
    raw = random_q4_k(rows, cols, seed=10)
    ref = eager(raw, rows, cols)
    groups = int4_groups(raw, Q.Q4_K, (rows, cols))
    assert groups.k_scales is None and q4_k_super_words(groups) is None
    assert torch.equal(groups.scales, ref["scales"]) and torch.equal(groups.offsets, ref["offsets"])
    assert torch.equal(groups.nibbles[1], ref["half_scales"])
    assert torch.equal(groups.nibbles[2], ref["half_offsets"])
    assert torch.equal(groups.codes, ref["codes"])
    assert torch.equal(groups.dequantize(), dequantize(raw, Q.Q4_K, (rows, cols)))
