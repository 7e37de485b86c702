"""The CPU attention path over the paged cache: a prefill stores its K/V in scattered pages
(in the cache's dtype) and attends as a later read of those pages does, and a prefill split in
chunks (the cached offset causal mask) matches the same prefill in one piece."""

from __future__ import annotations

import pytest
import torch

from pensieve.models.forward_context import ForwardContext, SequenceSlice, attend_cached, paged_attention

HQ, HK, D, BLOCK = 6, 2, 16, 4


def context(n_tokens: int, query_start_pos: int, dtype: torch.dtype, caches=None) -> ForwardContext:
    blocks = torch.tensor([3, 0, 5, 1, 4, 2])  # scattered pages
    if caches is None:
        caches = ([torch.zeros(6, BLOCK, HK, D, dtype=dtype)], [torch.zeros(6, BLOCK, HK, D, dtype=dtype)])
    positions = torch.arange(query_start_pos, query_start_pos + n_tokens)
    slots = blocks[positions // BLOCK] * BLOCK + positions % BLOCK
    seq = SequenceSlice(0, n_tokens, query_start_pos + n_tokens, blocks)
    return ForwardContext(caches[0], caches[1], slots, [seq], torch.tensor([n_tokens - 1]))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_prefill_attends_as_a_later_cache_read_would(cache_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(10, HQ, D), torch.randn(10, HK, D), torch.randn(10, HK, D)
    ctx = context(10, 0, cache_dtype)
    fresh = paged_attention(0, q, k, v, ctx)
    gathered = torch.empty_like(q)
    attend_cached(q, ctx.k_caches[0], ctx.v_caches[0], ctx.sequences[0], gathered)
    torch.testing.assert_close(fresh, gathered, rtol=0, atol=1e-6)


def test_chunked_prefill_matches_one_piece() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(20, HQ, D), torch.randn(20, HK, D), torch.randn(20, HK, D)
    whole = paged_attention(0, q, k, v, context(20, 0, torch.float32))
    first = context(12, 0, torch.float32)
    head = paged_attention(0, q[:12], k[:12], v[:12], first)
    second = context(8, 12, torch.float32, caches=(first.k_caches, first.v_caches))
    tail = paged_attention(0, q[12:], k[12:], v[12:], second)
    torch.testing.assert_close(torch.cat([head, tail]), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("cached, new", [(40, 5), (40, 1), (9, 4), (3, 2)])
def test_a_windowed_chunk_reads_only_the_blocks_its_window_reaches(cached, new, with_sinks):
    """A windowed layer's chunk over a long cached context (gpt-oss's sliding layers in a
    follow-up turn) skips every block wholly before its first row's window: those pages hold
    NaN here (a read would make the rows NaN), and the rows equal SDPA over the whole context
    with the window mask written out."""
    window, blocks = 6, 12
    torch.manual_seed(cached + new)
    end = cached + new
    table = torch.randperm(blocks)[: -(-end // BLOCK)]
    k_cache, v_cache = torch.randn(blocks, BLOCK, HK, D), torch.randn(blocks, BLOCK, HK, D)
    keys = k_cache[table].reshape(-1, HK, D)[:end]
    values = v_cache[table].reshape(-1, HK, D)[:end]
    first_seen = cached + 1 - window
    for b in range(len(table)):
        if (b + 1) * BLOCK <= first_seen:
            k_cache[table[b]] = v_cache[table[b]] = float("nan")
    q = torch.randn(new, HQ, D)
    sinks = torch.randn(HQ) if with_sinks else None
    out = torch.empty_like(q)
    attend_cached(q, k_cache, v_cache, SequenceSlice(0, new, end, table), out, window, sinks)
    pos = torch.arange(cached, end)[:, None]
    cols = torch.arange(end)[None, :]
    visible = (cols <= pos) & (cols > pos - window)
    kf = keys.repeat_interleave(HQ // HK, dim=1).transpose(0, 1)  # [HQ, end, D]
    vf = values.repeat_interleave(HQ // HK, dim=1).transpose(0, 1)
    scores = (q.transpose(0, 1) @ kf.transpose(1, 2)) * D ** -0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat((scores, sinks.view(HQ, 1, 1).expand(HQ, new, 1)), dim=-1)
        vf = torch.cat((vf, vf.new_zeros(HQ, 1, D)), dim=1)
    want = (torch.softmax(scores, dim=-1) @ vf).transpose(0, 1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
