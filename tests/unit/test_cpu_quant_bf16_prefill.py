"""The bf16 prefill path (``bf16_prefill.py``): the dequantise-to-bf16 kernel exact, the bf16
matmul within bf16 tolerance of dequantise + float32 matmul for every codes format, a mixed
3-block projection and the fused MLP, and the routing by row count."""

from __future__ import annotations

import sys

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends.cpu_quant import bf16_prefill, load_kernels
from pensieve.backends.cpu_quant.codes_linear import F_Q4, F_Q6, F_Q8, CodesLinear
from pensieve.backends.cpu_quant.linear import Q4Linear, Q8Linear, pack_q8
from pensieve.backends.cpu_quant.mlp import Q4MLP
from pensieve.loaders.int4_codes import quant_groups
from pensieve.loaders.quants import reference_dequantize
from tests.unit.test_cpu_quant_codes import BLOCK_32, BLOCK_256, activations, random_tensor

KERNELS = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")
ISAS = [0, 1] if KERNELS is not None and KERNELS.pqx_bf16_isa() == 1 else [0]


def out_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """The error relative to the output's scale (RMS over RMS); checks on the way that no
    single value is off by more than 10% of that scale (bf16 keeps 8 bits of each factor)."""
    scale = ref.pow(2).mean().sqrt()
    assert (y - ref).abs().max() < 0.1 * scale
    err = ((y - ref).pow(2).mean().sqrt() / scale).item()
    return err


def codes(qtype: Q, n: int, k: int, seed: int = 0):
    raw = random_tensor(qtype, n, k, seed=seed)
    return quant_groups(raw, qtype, (n, k)), reference_dequantize(raw, qtype, (n, k))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", [*BLOCK_32, *BLOCK_256])
def test_dequant_bf16_is_the_float_weights_rounded(qtype, isa):
    k = 1536 if qtype in BLOCK_256 else 896
    groups, _ = codes(qtype, 45, k, seed=7)
    layer = CodesLinear(KERNELS, groups, threads=2)
    got = bf16_prefill.dequant_bf16(KERNELS, layer._address, k, 0, 45, 2, isa=isa)
    assert torch.equal(got, layer.dequantize().bfloat16())
    if qtype in BLOCK_32:  # float16 scales in the file: the codes' own dequantisation, exactly
        assert torch.equal(got, groups.dequantize().bfloat16())
    part = bf16_prefill.dequant_bf16(KERNELS, layer._address, k, 13, 30, 2, isa=isa)
    assert torch.equal(part, got[13:30])


@pytest.mark.parametrize("qtype", [*BLOCK_32, *BLOCK_256])
def test_bf16_path_matches_float_matmul(qtype):
    k = 1536 if qtype in BLOCK_256 else 896
    groups, ref_w = codes(qtype, 45, k, seed=3)
    layer = CodesLinear(KERNELS, groups, bias=torch.randn(45), threads=2)
    layer.bf16_from = 64
    x = activations(70, k)
    y = layer(x)
    assert y.dtype is torch.float32 and y.shape == (70, 45)
    assert out_err(y, x @ ref_w.T + layer.bias) < 1e-2
    y3 = layer(x.view(7, 10, k))
    assert torch.equal(y3.view(70, 45), y)


def test_mixed_three_blocks_and_tiles(monkeypatch):
    """q/k Q4_K, v Q6_K, a Q5_0 tail: one bf16 projection; with a tiny scratch, in tiles that
    straddle the blocks."""
    k = 512
    types = [(Q.Q4_K, 64), (Q.Q4_K, 32), (Q.Q6_K, 32), (Q.Q5_0, 19)]
    made = [codes(t, n, k, seed=i) for i, (t, n) in enumerate(types)]
    layer = CodesLinear(KERNELS, [g for g, _ in made], bias=torch.randn(147), threads=2)
    assert layer.formats == [F_Q4, F_Q6, F_Q8]
    layer.bf16_from = 32
    ref_w = torch.cat([w for _, w in made])
    x = activations(70, k, seed=1)
    want = x @ ref_w.T + layer.bias
    whole = layer(x)
    assert out_err(whole, want) < 1e-2
    w16 = bf16_prefill.dequant_bf16(KERNELS, layer._address, k, 0, 147, 2)
    assert torch.equal(w16, layer.dequantize().bfloat16())
    monkeypatch.setattr(bf16_prefill, "TILE_ELEMS", 48 * k)  # tiles of 48 rows: 48, 96, 144
    monkeypatch.setattr(bf16_prefill, "WIDE_BELOW", 0)
    assert torch.equal(layer(x), whole)


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_q4_and_q8_linear(kind):
    n, k = 45, 896
    if kind == "q4":
        groups, ref_w = codes(Q.Q4_1, n, k, seed=5)
        layer = Q4Linear(KERNELS, groups, bias=torch.randn(n), threads=2)
    else:
        _, w = codes(Q.Q8_0, n, k, seed=5)
        layer = Q8Linear(KERNELS, *pack_q8(KERNELS, w), bias=torch.randn(n), threads=2)
        ref_w = layer.dequantize()
    layer.bf16_from = 64
    x = activations(70, k, seed=2)
    assert out_err(layer(x), x @ ref_w.T + layer.bias) < 1e-2


def test_mlp():
    h, i = 896, 320  # gate_up mixes Q4_K and Q6_K rows, down Q8_0
    gate, g_ref = codes(Q.Q4_K, i, h, seed=11)
    up, u_ref = codes(Q.Q6_K, i, h, seed=12)
    down, d_ref = codes(Q.Q8_0, h, i, seed=13)
    gu = CodesLinear(KERNELS, [gate, up], threads=2)
    dn = CodesLinear(KERNELS, down, threads=2)
    mlp = Q4MLP(gu, dn)
    x = activations(70, h, seed=4) * 0.05
    hid = x @ g_ref.T
    want = (torch.nn.functional.silu(hid) * (x @ u_ref.T)) @ d_ref.T
    gu.bf16_from = dn.bf16_from = sys.maxsize
    fused = mlp(x)  # the C MLP: bf16 off
    gu.bf16_from = dn.bf16_from = 64
    got = mlp(x)
    assert out_err(fused, want) < 1e-3
    assert out_err(got, want) < 1e-2
    assert not torch.equal(got, fused)
    assert torch.equal(mlp(x.view(2, 35, h)).view(70, h), got)


def test_rows_below_the_threshold_keep_the_integer_kernels(monkeypatch):
    groups, _ = codes(Q.Q4_K, 45, 1536, seed=9)
    layer = CodesLinear(KERNELS, groups, threads=2)
    gate, _ = codes(Q.Q4_K, 64, 1536, seed=1)
    down, _ = codes(Q.Q8_0, 1536, 32, seed=2)
    mlp = Q4MLP(CodesLinear(KERNELS, gate), CodesLinear(KERNELS, down))
    calls = []
    real = bf16_prefill._weights  # every bf16 product dequantises its weight through it
    monkeypatch.setattr(bf16_prefill, "_weights", lambda *a: calls.append(a[0]) or real(*a))
    for module in (layer, mlp.gate_up_proj, mlp.down_proj):
        module.bf16_from = 32
    layer(activations(31, 1536))
    mlp(activations(31, 1536))
    assert calls == []
    layer(activations(32, 1536))
    assert calls == [layer]
    mlp(activations(32, 1536))
    assert calls[1:] == [mlp.gate_up_proj, mlp.gate_up_proj, mlp.down_proj]


def test_the_switch_is_on_by_default_only_where_amx_runs_it(monkeypatch):
    monkeypatch.delenv("PENSIEVE_BF16_PREFILL", raising=False)
    want = bf16_prefill.BF16_FROM if bf16_prefill.amx_bf16() else sys.maxsize
    assert bf16_prefill.bf16_from() == want
    monkeypatch.setattr(bf16_prefill, "amx_bf16", lambda: False)
    assert bf16_prefill.bf16_from() == sys.maxsize  # AVX-512 BF16 without AMX lost: off
    monkeypatch.setattr(bf16_prefill, "amx_bf16", lambda: True)
    assert bf16_prefill.bf16_from() == bf16_prefill.BF16_FROM
    monkeypatch.setenv("PENSIEVE_BF16_PREFILL", "0")
    assert bf16_prefill.bf16_from() == sys.maxsize
    monkeypatch.setenv("PENSIEVE_BF16_PREFILL", "1")
    assert bf16_prefill.bf16_from() == bf16_prefill.BF16_FROM
    assert CodesLinear(KERNELS, codes(Q.Q8_0, 4, 64)[0]).bf16_from == bf16_prefill.BF16_FROM


def test_a_prefill_allocates_no_large_temporaries_and_release_hands_the_scratch_back():
    """The MLP at 512 rows writes gate, up, SiLU·up and the dequantised weights into the path's
    persistent scratch (a fresh mmap each call under ``bound_heap`` was 1.4× slower served);
    ``release`` (the runner's, after a prefill) drops every buffer — under ``bound_heap`` large
    blocks are their own mappings, so that is memory back to the system (``test_cpu_memory``)
    — and the next call gives the same."""
    import weakref

    bf16_prefill.release()
    h, i = 1536, 2048
    gate, _ = codes(Q.Q4_K, 2 * i, h, seed=21)
    down, _ = codes(Q.Q6_K, h, i, seed=22)
    gu, dn = CodesLinear(KERNELS, gate, threads=2), CodesLinear(KERNELS, down, threads=2)
    mlp = Q4MLP(gu, dn)
    gu.bf16_from = dn.bf16_from = 64
    x = activations(512, h, seed=5) * 0.05
    first = mlp(x)
    held = dict(bf16_prefill._scratch)
    assert set(held) == {"w", "x", "gate", "up"}
    assert held["gate"].numel() >= 512 * i and held["up"].numel() >= 512 * i
    again = mlp(x)
    assert torch.equal(again, first)
    assert all(bf16_prefill._scratch[k] is held[k] for k in held)  # reused, not reallocated
    alive = [weakref.ref(t) for t in held.values()]
    del held
    bf16_prefill.release()
    assert bf16_prefill._scratch == {} and all(r() is None for r in alive)  # nothing else holds them
    assert torch.equal(mlp(x), first)


def test_the_mlp_takes_up_in_tiles_through_a_tile_sized_scratch(monkeypatch):
    """Tiled, each product lands in its columns in place (no temporaries) and up needs a
    scratch only as wide as a tile, multiplied into SiLU(gate) as it lands: the same result
    as one tile within bf16 rounding."""
    h, i, m = 512, 256, 96
    gate, _ = codes(Q.Q4_K, 2 * i, h, seed=31)
    down, _ = codes(Q.Q6_K, h, i, seed=32)
    mlp = Q4MLP(CodesLinear(KERNELS, gate, threads=2), CodesLinear(KERNELS, down, threads=2))
    mlp.gate_up_proj.bf16_from = mlp.down_proj.bf16_from = 64
    x = activations(m, h, seed=6) * 0.05
    bf16_prefill.release()
    whole = mlp(x)
    assert bf16_prefill._scratch["up"].numel() == m * i
    bf16_prefill.release()
    monkeypatch.setattr(bf16_prefill, "TILE_ELEMS", 64 * h)  # gate/up in 4 tiles, down in 4
    monkeypatch.setattr(bf16_prefill, "WIDE_BELOW", 0)
    tiled = mlp(x)
    assert out_err(tiled, whole) < 1e-2
    assert bf16_prefill._scratch["up"].numel() == m * 64
    assert bf16_prefill._scratch["w"].numel() == 64 * h
    bf16_prefill.release()
