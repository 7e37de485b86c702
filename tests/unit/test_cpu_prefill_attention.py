"""The compiled prefill attention (a chunk of new tokens over its paged cache, causal) gives
SDPA's numbers: GQA groups, float16 and float32 caches, a chunk after cached tokens, shuffled
block tables, partial blocks; shapes it does not take fall back to SDPA."""

from __future__ import annotations

import pytest
import torch

from pensieve.backends.cpu_quant import build, load_kernels
from pensieve.models.forward_context import SequenceSlice, attend_cached

KERNELS = load_kernels()
HAS_AVX512 = KERNELS is not None and KERNELS.isa == "avx512_vnni"
pytestmark = pytest.mark.skipif(not HAS_AVX512, reason="no AVX-512 VNNI kernels on this CPU")


def caches(slots: int, hk: int, d: int, dtype: torch.dtype, block: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(slots // block, block, hk, d, generator=gen) * 2).to(dtype)
    v = torch.randn(slots // block, block, hk, d, generator=gen).to(dtype)
    return k, v


@pytest.mark.parametrize("hq,hk,d", [(12, 2, 128), (4, 4, 64), (8, 1, 64), (16, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("cached,new", [(0, 37), (45, 70), (3, 1), (200, 9)])
def test_prefill_attention_matches_sdpa(hq, hk, d, dtype, cached, new):
    block, context = 16, cached + new
    blocks = -(-context // block)
    k_cache, v_cache = caches(64 * block, hk, d, dtype, block, seed=hq + d + new)
    table = torch.randperm(64, generator=torch.Generator().manual_seed(new))[:blocks].contiguous()
    gen = torch.Generator().manual_seed(cached)
    rows = 5 + new  # the chunk sits after 5 rows of another sequence in the step
    q = torch.randn(rows, hq + 2 * hk, d, generator=gen)[:, :hq]  # strided: a view of qkv
    seq = SequenceSlice(5, new, context, table)
    expected = torch.zeros(rows, hq, d)
    attend_cached(q, k_cache, v_cache, seq, expected)
    out = torch.zeros(rows, hq, d)
    rc = KERNELS.lib.pq_prefill_attention(
        q[5].data_ptr(), q.stride(0), new, context, table.data_ptr(), block, hq, hk, d,
        k_cache.data_ptr(), v_cache.data_ptr(), d ** -0.5, out[5].data_ptr(), hq * d, 2,
        int(dtype == torch.float16))
    assert rc == 0
    assert torch.equal(out[:5], torch.zeros(5, hq, d))  # other rows untouched
    err = (out[5:] - expected[5:]).abs().max().item()
    assert err < 2e-5, err


def test_shapes_it_does_not_take_are_refused():
    k_cache, v_cache = caches(64, 2, 32, torch.float32, 16, seed=0)
    q, out, table = torch.randn(4, 4, 32), torch.zeros(4, 4, 32), torch.arange(4)
    rc = KERNELS.lib.pq_prefill_attention(q.data_ptr(), 128, 4, 4, table.data_ptr(), 16, 4, 2, 32,
                                          k_cache.data_ptr(), v_cache.data_ptr(), 32 ** -0.5,
                                          out.data_ptr(), 128, 1, 0)
    assert rc == -1 and torch.equal(out, torch.zeros(4, 4, 32))  # head size 32: SDPA's


def test_the_avx2_fallback_leaves_it_to_sdpa():
    before = KERNELS.isa
    try:
        KERNELS.set_isa("avx2")
        k_cache, v_cache = caches(64, 2, 64, torch.float32, 16, seed=0)
        q, out, table = torch.randn(4, 4, 64), torch.zeros(4, 4, 64), torch.arange(4)
        assert KERNELS.lib.pq_prefill_attention(
            q.data_ptr(), 256, 4, 4, table.data_ptr(), 16, 4, 2, 64, k_cache.data_ptr(),
            v_cache.data_ptr(), 0.125, out.data_ptr(), 256, 1, 0) == -1
    finally:
        KERNELS.set_isa(before)
    assert build.default_isa() in ("avx2", "avx512_vnni")
