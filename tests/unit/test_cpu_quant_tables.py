"""A GGUF's token embedding and output layer kept as their own codes on the CPU kernels
(``CodesEmbedding``, ``CodesLinear``) instead of float32 tables, and Q4_K loaded straight into
the kernels' nibble layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pensieve.backends.cpu_quant import load_kernels
from pensieve.backends.cpu_quant.codes_linear import CodesEmbedding, CodesLinear
from pensieve.loaders.int4_codes import quant_groups
from pensieve.loaders.quants import dequantize
from tests.unit.test_cpu_quant_codes import Q, random_tensor

KERNELS = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")


def test_q4_k_loads_as_nibbles_with_the_byte_codes_and_exact_scales():
    rows, cols = 6, 512
    raw = random_tensor(Q.Q4_K, rows, cols, seed=3)
    groups = quant_groups(raw, Q.Q4_K, (rows, cols))
    assert groups.nibbles is not None
    blocks = raw.reshape(-1, 144)[:, 16:].reshape(-1, 4, 1, 32)
    codes = torch.cat((blocks & 15, blocks >> 4), dim=2).reshape(rows, cols)
    assert torch.equal(groups.codes, codes)
    torch.testing.assert_close(groups.dequantize(), dequantize(raw, Q.Q4_K, (rows, cols)),
                               atol=1e-6, rtol=1e-5)
    nib, scales, offsets = groups.nibbles
    assert torch.equal(scales, groups.scales.half()) and torch.equal(offsets, groups.offsets.half())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q5_0])
def test_codes_embedding_rows_are_the_tables_rows(qtype):
    rows, cols = 40, 256
    groups = quant_groups(random_tensor(qtype, rows, cols, seed=1), qtype, (rows, cols))
    table = CodesLinear(KERNELS, groups)
    embed = CodesEmbedding(table)
    ids = torch.tensor([[0, 39, 7], [7, 12, 3]])
    dense = table.dequantize()
    torch.testing.assert_close(embed(ids), dense[ids], atol=0, rtol=0)
    with pytest.raises(IndexError):
        embed(torch.tensor([1, 40]))
    assert embed.to(torch.bfloat16)(ids).dtype == torch.bfloat16


def test_plan_tables_keeps_codes_only_where_the_head_is_kept():
    from pensieve.backends.quantize import plan_tables, swap_in_tables

    embed = quant_groups(random_tensor(Q.Q4_K, 32, 256, seed=2), Q.Q4_K, (32, 256))
    head = quant_groups(random_tensor(Q.Q6_K, 32, 256, seed=4), Q.Q6_K, (32, 256))
    int4 = {"model.embed_tokens.weight": embed, "lm_head.weight": head, "x.q_proj.weight": embed}
    keep, floats = plan_tables(int4, tied=False, head_codes=True)
    assert set(keep) == {"model.embed_tokens.weight", "lm_head.weight"} and not floats
    assert set(int4) == {"x.q_proj.weight"}
    keep, floats = plan_tables({"model.embed_tokens.weight": embed, "lm_head.weight": head},
                               tied=False, head_codes=False)
    assert set(keep) == {"model.embed_tokens.weight"} and set(floats) == {"lm_head.weight"}
    torch.testing.assert_close(floats["lm_head.weight"], head.dequantize())
    # tied: one table for both, or both float
    keep, floats = plan_tables({"model.embed_tokens.weight": embed}, tied=True, head_codes=False)
    assert not keep and set(floats) == {"model.embed_tokens.weight"}
    keep, _ = plan_tables({"model.embed_tokens.weight": embed}, tied=True, head_codes=True)
    model = nn.Module()
    model.model = nn.Module()
    swap_in_tables(model, keep, tied=True)
    assert isinstance(model.model.embed_tokens, CodesEmbedding)
    assert model.lm_head is model.model.embed_tokens.table
    x = torch.randn(3, 256)
    torch.testing.assert_close(model.lm_head(x), x @ embed.dequantize().T, atol=5e-2, rtol=2e-2)
