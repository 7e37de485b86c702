"""Attention sinks: both routes of ``attend_with_sinks`` against transformers' eager gpt-oss
formula (a sink column joined to the logits, softmax, column dropped), with GQA, causal and
window masks; ``paged_attention`` with sinks over a paged cache, bypassing a kernel backend."""

from __future__ import annotations

import pytest
import torch

from pensieve.models.forward_context import ForwardContext, SequenceSlice, paged_attention
from pensieve.models.sink_attention import attend_with_sinks


def reference(q, k, v, sinks, mask):  # noqa: ANN001, ANN201
    """transformers' ``eager_attention_forward`` for gpt-oss, on [n, H, D] / [ctx, Hk, D]."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    keys = k.repeat_interleave(group, dim=1).transpose(0, 1)
    values = v.repeat_interleave(group, dim=1).transpose(0, 1)
    logits = q.transpose(0, 1) @ keys.transpose(1, 2) * d ** -0.5
    if mask is not None:
        logits = logits + mask
    combined = torch.cat([logits, sinks.view(hq, 1, 1).expand(hq, n, 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return (probs @ values).transpose(0, 1)


def causal(n: int, ctx: int, window: int | None = None) -> torch.Tensor:
    rows = torch.arange(n).unsqueeze(1) + ctx - n
    cols = torch.arange(ctx).unsqueeze(0)
    hidden = cols > rows
    if window is not None:
        hidden |= cols <= rows - window
    return torch.zeros(n, ctx).masked_fill(hidden, float("-inf"))


@pytest.mark.parametrize("n, ctx, window", [(1, 40, None), (1, 40, 8), (7, 7, None),
                                            (5, 30, None), (12, 30, 6)])
def test_both_routes_equal_the_reference(n, ctx, window):
    g = torch.Generator().manual_seed(n * 100 + ctx)
    q, k, v = (torch.randn(n, 8, 16, generator=g), torch.randn(ctx, 2, 16, generator=g),
               torch.randn(ctx, 2, 16, generator=g))
    sinks = 2 * torch.randn(8, generator=g)
    mask = causal(n, ctx, window) if n > 1 or window else None
    got = attend_with_sinks(q, k, v, sinks, mask)
    torch.testing.assert_close(got, reference(q, k, v, sinks, mask), atol=2e-6, rtol=0)


def test_a_large_sink_silences_a_head():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g), torch.randn(
        3, 4, 8, generator=g)
    sinks = torch.tensor([40.0, 0.0, 0.0, -40.0])
    out = attend_with_sinks(q, k, v, sinks, causal(3, 3))
    assert out[:, 0].abs().max() < 1e-12  # the sink took all the weight
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out[:, 3], plain[:, 3], atol=1e-6, rtol=0)  # a -40 sink: nothing


def test_paged_attention_with_sinks_bypasses_a_kernel_backend():
    """A backend computes no sinks: the per-sequence loop runs (and writes the cache)."""
    g = torch.Generator().manual_seed(2)
    block, ctx_len = 4, 10
    k_cache, v_cache = torch.zeros(8, block, 2, 16), torch.zeros(8, block, 2, 16)
    table = torch.tensor([5, 1, 6])
    q, k, v = (torch.randn(ctx_len, 8, 16, generator=g), torch.randn(ctx_len, 2, 16, generator=g),
               torch.randn(ctx_len, 2, 16, generator=g))
    slots = torch.tensor([int(table[p // block]) * block + p % block for p in range(ctx_len)])

    def backend(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a kernel backend was asked to attend with sinks")

    ctx = ForwardContext([k_cache], [v_cache], slots, [SequenceSlice(0, ctx_len, ctx_len, table)],
                         torch.arange(ctx_len), attention=backend)
    sinks = torch.randn(8, generator=g)
    out = paged_attention(0, q, k, v, ctx, window=4, sinks=sinks)
    torch.testing.assert_close(out, reference(q, k, v, sinks, causal(ctx_len, ctx_len, 4)),
                               atol=2e-6, rtol=0)
    assert torch.equal(k_cache.view(-1, 2, 16)[slots], k)
