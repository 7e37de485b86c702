"""Q4_K and Q6_K kept with the file's own super-block scales (``F_Q4K``; ``F_Q6``'s float16 d
and int8 sub-scales): the file's bytes a 256, the file's weights bit for bit, every kernel
against the reference dequantisation, and the fallbacks where a part lacks those scales."""

from __future__ import annotations

import pytest
import torch

from pensieve.backends.cpu_quant.codes_linear import (
    F_Q4, F_Q4K, F_Q6, F_Q8G16, CodesEmbedding, CodesLinear,
)
from pensieve.loaders.int4_codes import Int8Groups, quant_groups
from pensieve.loaders.quants import reference_dequantize
from pensieve.models.quant_linear import Int4Groups
from tests.unit.test_cpu_quant_codes import KERNELS, Q, activations, random_tensor, rel_err, run

pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")

FILE_BYTES = {Q.Q4_K: 144, Q.Q6_K: 210}  # bytes a 256 in the GGUF


def held_bytes(layer: CodesLinear) -> int:
    return sum(t.numel() * t.element_size() for name, t in layer.named_buffers()
               if name[:-1] in ("codes", "scales", "mins"))


@pytest.fixture
def restore_isa():
    isa = KERNELS.lib.pq_set_isa(-1)
    yield
    KERNELS.lib.pq_set_isa(isa)


@pytest.mark.parametrize("qtype,fmt", [(Q.Q4_K, F_Q4K), (Q.Q6_K, F_Q6)])
def test_the_files_bytes_and_weights(qtype, fmt, restore_isa):
    n, k = 37, 768
    raw = random_tensor(qtype, n, k, seed=7)
    layer = CodesLinear(KERNELS, quant_groups(raw, qtype, (n, k)), bias=torch.randn(n), threads=2)
    assert layer.part_formats == [fmt]
    assert held_bytes(layer) == n * k // 256 * FILE_BYTES[qtype]
    ref = reference_dequantize(raw, qtype, (n, k))
    assert torch.equal(layer.dequantize(), ref)  # d·sc exact in float32: no rounded scales
    ids = torch.tensor([[0, 36], [5, 5]])
    assert torch.equal(CodesEmbedding(layer)(ids), ref[ids])
    for isa in (0, 1):
        if KERNELS.lib.pq_set_isa(isa) != isa:
            continue
        for m in (1, 2, 4, 7, 40):
            x = activations(m, k, seed=m)
            want = x @ ref.T + layer.bias
            assert rel_err(run(layer, x, 1), want) < 1e-4, (isa, m)
            assert rel_err(run(layer, x, 2), want) < 1e-4, (isa, m)


def test_a_fused_gate_up_of_super_scaled_halves_runs_the_fused_mlp():
    """Two Q4_K halves with their scales in one block: the swiglu GEMM splits it by row."""
    from pensieve.backends.cpu_quant.mlp import Q4MLP

    h, i = 256, 512
    raws = [random_tensor(Q.Q4_K, i, h, seed=s) for s in (1, 2)]
    gate_up = CodesLinear(KERNELS, [quant_groups(r, Q.Q4_K, (i, h)) for r in raws])
    down_raw = random_tensor(Q.Q6_K, h, i, seed=3)
    down = CodesLinear(KERNELS, quant_groups(down_raw, Q.Q6_K, (h, i)))
    assert gate_up.part_formats == [F_Q4K] and down.part_formats == [F_Q6]
    mlp = Q4MLP(gate_up, down)
    w = torch.cat([reference_dequantize(r, Q.Q4_K, (i, h)) for r in raws])
    wd = reference_dequantize(down_raw, Q.Q6_K, (h, i))
    for m in (1, 3, 40):  # row tiles; the fused SwiGLU panel GEMM (below the bf16 path)
        x = activations(m, h, seed=m)
        g, u = (x @ w.T).chunk(2, dim=-1)
        want = (torch.nn.functional.silu(g) * u) @ wd.T
        assert rel_err(mlp(x), want) < 1e-3, m


def test_parts_without_the_files_scales_keep_the_float16_layouts():
    k = 512
    raw4, raw6 = random_tensor(Q.Q4_K, 8, k, seed=1), random_tensor(Q.Q6_K, 8, k, seed=2)
    q4, q6 = quant_groups(raw4, Q.Q4_K, (8, k)), quant_groups(raw6, Q.Q6_K, (8, k))
    plain4 = Int4Groups.from_nibbles(*q4.nibbles)  # no k_scales
    mixed = CodesLinear(KERNELS, [q4, plain4])  # one run: all must bring them
    assert mixed.part_formats == [F_Q4] and mixed.formats == [F_Q4]
    plain6 = Int8Groups(q6.codes, q6.scales, None, 16, "Q6_K")
    layer = CodesLinear(KERNELS, plain6)
    assert layer.part_formats == [F_Q8G16]
    ref = torch.cat([reference_dequantize(raw4, Q.Q4_K, (8, k))] * 2)
    x = activations(3, k)
    assert rel_err(mixed(x), x @ ref.T) < 1e-3
    assert rel_err(layer(x), x @ reference_dequantize(raw6, Q.Q6_K, (8, k)).T) < 1e-3
