"""fla-core's CUDA gated-delta-rule kernels against our torch forms (``models/gated_delta.py``),
with our conventions (grouped and tiled value heads, initial state in, final state out), and a
hybrid model's logits with fla on and off. Skips without CUDA or without ``fla-core``
(``pip install fla-core==0.6.0``, the ``pensieve[fla]`` extra); the GPU run script adds this file."""

from __future__ import annotations

import time

import pytest
import torch

from pensieve.models import gated_delta as gd

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not gd.fla_available(), reason="needs fla-core"),
]


def inputs(b: int, t: int, hk: int, hv: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda")

    q, k, v = randn(b, t, hk, d), randn(b, t, hk, d), randn(b, t, hv, d)
    decay = -0.3 * torch.rand(b, t, hv, generator=g, device="cuda")
    beta = torch.rand(b, t, hv, generator=g, device="cuda")
    state = 0.1 * randn(b, hv, d, d)
    return q.to(dtype), k.to(dtype), v.to(dtype), decay, beta.to(dtype), state


@pytest.mark.parametrize("order", ["grouped", "tiled"])
@pytest.mark.parametrize("t", [1, 100, 1000])
def test_fla_chunk_matches_torch(order, t):
    q, k, v, g, beta, s0 = inputs(1, t, 2, 4, 128, torch.float32)
    want, want_s = gd.chunk_gated_delta_rule(q, k, v, g, beta, s0, order=order)
    got, got_s = gd.gated_delta_rule(q, k, v, g, beta, s0, order=order, use_fla=True)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got_s, want_s, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("order", ["grouped", "tiled"])
def test_fla_recurrent_decode_matches_torch(order):
    q, k, v, g, beta, s0 = inputs(8, 1, 2, 4, 128, torch.float32, seed=1)
    want, want_s = gd.recurrent_gated_delta_rule(q, k, v, g, beta, s0, order=order)
    got, got_s = gd.gated_delta_rule(q, k, v, g, beta, s0, order=order, decode=True,
                                     use_fla=True)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got_s, want_s, atol=1e-3, rtol=1e-3)


def test_fla_bf16_close_to_torch_float32():
    q, k, v, g, beta, s0 = inputs(1, 512, 16, 32, 128, torch.bfloat16, seed=2)
    want, _ = gd.chunk_gated_delta_rule(q.float(), k.float(), v.float(), g, beta.float(), s0)
    got, _ = gd.gated_delta_rule(q, k, v, g, beta, s0, use_fla=True)
    err = (got.float() - want).abs().max().item()
    print(f"bf16 fla vs float32 torch: max abs error {err:.3e} (|out| ≤ {want.abs().max():.2f})")
    assert err < 5e-2 * want.abs().max().item()


def test_report_fla_vs_torch_prefill_time():
    """Not asserted: prints each path's time for a 4k-token prefill in Qwen3.5-9B's shape."""
    q, k, v, g, beta, s0 = inputs(1, 4096, 16, 32, 128, torch.bfloat16, seed=3)
    for label, fla in (("torch", False), ("fla", True)):
        gd.gated_delta_rule(q, k, v, g, beta, s0, use_fla=fla)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            gd.gated_delta_rule(q, k, v, g, beta, s0, use_fla=fla)
        torch.cuda.synchronize()
        print(f"{label}: {(time.perf_counter() - start) / 5 * 1e3:.2f} ms per 4096-token layer")
