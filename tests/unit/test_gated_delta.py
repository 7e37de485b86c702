"""The gated delta rule and its causal conv (``models/gated_delta.py``) against transformers'
reference functions (Qwen3-Next's torch fallbacks) and against themselves: the chunked form
equals the recurrent one, a sequence split anywhere with its state carried equals it whole, a
tiled head order equals the grouped one on permuted heads, and the conv's rolling state."""

from __future__ import annotations

import pytest
import torch

from pensieve.models import gated_delta as gd

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_next import modeling_qwen3_next as ref  # noqa: E402


def inputs(b: int, t: int, hk: int = 2, hv: int = 4, dk: int = 16, dv: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, hk, dk, generator=g), torch.randn(b, t, hk, dk, generator=g)
    v = torch.randn(b, t, hv, dv, generator=g)
    decay = -0.3 * torch.rand(b, t, hv, generator=g)
    beta = torch.rand(b, t, hv, generator=g)
    state = torch.randn(b, hv, dk, dv, generator=g)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("t", [1, 5, 64, 150])
def test_chunked_and_recurrent_equal_the_reference(t):
    q, k, v, g, beta, s0 = inputs(2, t)
    want, want_s = ref.torch_chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    got, got_s = gd.chunk_gated_delta_rule(q, k, v, g, beta, s0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_s, want_s, atol=1e-6, rtol=0)
    want, want_s = ref.torch_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    got_r, got_rs = gd.recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    torch.testing.assert_close(got_r, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_rs, want_s, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, got_r, atol=1e-4, rtol=0)  # the two forms agree
    torch.testing.assert_close(got_s, got_rs, atol=1e-4, rtol=0)


def test_no_initial_state_is_zeros():
    q, k, v, g, beta, s0 = inputs(1, 30)
    a, sa = gd.chunk_gated_delta_rule(q, k, v, g, beta, None)
    b, sb = gd.chunk_gated_delta_rule(q, k, v, g, beta, torch.zeros_like(s0))
    assert torch.equal(a, b) and torch.equal(sa, sb)


@pytest.mark.parametrize("split", [1, 40, 64, 100])
def test_split_with_state_carried_equals_whole(split):
    q, k, v, g, beta, s0 = inputs(1, 130, seed=1)
    whole, s_whole = gd.chunk_gated_delta_rule(q, k, v, g, beta, s0)
    first, s1 = gd.chunk_gated_delta_rule(q[:, :split], k[:, :split], v[:, :split],
                                          g[:, :split], beta[:, :split], s0)
    second, s2 = gd.chunk_gated_delta_rule(q[:, split:], k[:, split:], v[:, split:],
                                           g[:, split:], beta[:, split:], s1)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(s2, s_whole, atol=1e-5, rtol=0)


def test_tiled_value_heads_equal_grouped_on_permuted_heads():
    """llama.cpp's qwen35 files order value heads tiled (head h reads key head h % Hk)."""
    q, k, v, g, beta, s0 = inputs(1, 70, hk=2, hv=6, seed=2)
    grouped, s_grouped = gd.chunk_gated_delta_rule(q, k, v, g, beta, s0)
    perm = torch.arange(6).view(2, 3).t().reshape(-1)  # tiled position → grouped head
    tiled, s_tiled = gd.chunk_gated_delta_rule(q, k, v[:, :, perm], g[:, :, perm],
                                               beta[:, :, perm], s0[:, perm], order="tiled")
    torch.testing.assert_close(tiled, grouped[:, :, perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(s_tiled, s_grouped[:, perm], atol=1e-6, rtol=0)
    step, _ = gd.recurrent_gated_delta_rule(q[:, :1], k[:, :1], v[:, :1, perm], g[:, :1, perm],
                                            beta[:, :1, perm], s0[:, perm], order="tiled")
    torch.testing.assert_close(step, tiled[:, :1], atol=1e-5, rtol=0)


def test_causal_conv_matches_the_reference_and_rolls_its_state():
    gen = torch.Generator().manual_seed(3)
    c, kernel, t = 12, 4, 9
    x, w = torch.randn(t, c, generator=gen), torch.randn(c, kernel, generator=gen)
    conv = torch.nn.Conv1d(c, c, kernel, groups=c, padding=kernel - 1, bias=False)
    conv.weight.data = w.unsqueeze(1)
    want = torch.nn.functional.silu(conv(x.t().unsqueeze(0))[..., :t])[0].t()
    got, state = gd.causal_conv1d(x, w, None)
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(state, x[-(kernel - 1):].t(), atol=0, rtol=0)
    # in pieces (one shorter than the kernel), then token by token, batched over two sequences
    a, s = gd.causal_conv1d(x[:2], w, None)
    b, s = gd.causal_conv1d(x[2:6], w, s)
    outs = [a, b]
    batch = torch.stack([s, torch.zeros_like(s)])
    for i in range(6, t):
        y, batch = gd.causal_conv1d_step(torch.stack([x[i], x[i]]), w, batch)
        outs.append(y[:1])
    torch.testing.assert_close(torch.cat(outs), want.detach(), atol=1e-6, rtol=0)
    alone, _ = gd.causal_conv1d(x[6:7], w, None)  # the zero-state row: a fresh sequence
    first = gd.causal_conv1d_step(x[6:7], w, torch.zeros(1, c, kernel - 1))[0]
    torch.testing.assert_close(first, alone, atol=1e-6, rtol=0)


def test_dispatch_uses_torch_without_fla_on_cpu():
    q, k, v, g, beta, s0 = inputs(1, 10)
    out, _ = gd.gated_delta_rule(q, k, v, g, beta, s0)
    want, _ = gd.chunk_gated_delta_rule(q, k, v, g, beta, s0)
    assert torch.equal(out, want)
    if not gd.fla_available():
        with pytest.raises(RuntimeError, match="fla-core"):
            gd.gated_delta_rule(q, k, v, g, beta, s0, use_fla=True)
