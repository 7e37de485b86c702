"""The MLA head glue in one launch (``backends/cuda_hybrid_mla_rope``: the latent's norm, RoPE
on the rotary key and every head's rotary query, the cache write) with the sigmoid router's
kernel (``cuda_router.sigmoid_topk``): tiny GLM-4.7-Flash (adjacent-pair and rotate-half RoPE)
and DeepSeek-V3 (YaRN, no q LoRA, grouped top-k) models give transformers' logits over a paged
cache — whole prefill, chunks, one-token decodes — and the torch form's, in Triton's
interpreter; the cache holds what the torch form writes; compiled for sm_90 at GLM-4.7-Flash's
shape (20 heads, rank 512, rope 64); on a GPU in bfloat16."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def interpreter_check() -> None:
    import tempfile
    from pathlib import Path

    from pensieve.backends import cuda_hybrid_mla_rope, cuda_router
    from pensieve.backends.torch_backend import build_model
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.paged_run import paged_logits, prompt
    from tests.helpers.tiny_families import VOCAB, save_hf
    from tests.helpers.tiny_moe import moe_model
    from tests.unit.test_mla_families import CASES, CONTEXT, SEQ, config

    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            reference = moe_model(config(name))
            ckpt = load_checkpoint(save_hf(Path(tmp) / name, reference))
            model = build_model(ckpt, EngineConfig(context_length=CONTEXT))
            ids = prompt(SEQ, VOCAB, seed=3)
            with torch.no_grad():
                expected = reference(torch.tensor([ids])).logits[0].float()
            torch_form = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5])
            assert cuda_hybrid_mla_rope.install(model) == ckpt.args.num_layers
            assert cuda_router.install(model) >= 1
            kernels = paged_logits(model, ckpt.args, ids, [SEQ // 3, SEQ - 5])
            for got, want in zip(kernels, torch_form):
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
                torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    cache_check()


def cache_check() -> None:
    """The glue alone: the cache rows at the slots and nowhere else, the rotated query, against
    the torch form's ops (both RoPE layouts, a strided q_pe as the model's split gives it)."""
    from pensieve.backends.cuda_hybrid_mla_rope import rope_write
    from pensieve.models.deepseek_mla import rotate_pairs
    from pensieve.models.rope import apply_rope

    g = torch.Generator().manual_seed(0)
    t, heads, nope, rope, rank = 5, 3, 16, 8, 24
    q = torch.randn(t, heads, nope + rope, generator=g)
    kv = torch.randn(t, rank + rope, generator=g)
    w = torch.randn(rank, generator=g)
    ang = torch.randn(t, 1, rope // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    slots = torch.tensor([9, 2, 30, 4, 17])
    for interleave in (True, False):
        cache = torch.zeros(8, 4, 1, rank + rope)
        q_pe = q[..., nope:]
        got = rope_write(q_pe, kv, w, 1e-6, cos, sin, slots, cache, interleave)
        latent = torch.nn.functional.rms_norm(kv[:, :rank], (rank,), w, 1e-6)
        k_pe = kv[:, None, rank:]
        if interleave:
            want_q, want_k = rotate_pairs(q_pe, (cos, sin)), rotate_pairs(k_pe, (cos, sin))
        else:
            want_q, want_k = apply_rope(q_pe, k_pe, (cos, sin))
        torch.testing.assert_close(got, want_q, atol=1e-6, rtol=1e-6)
        rows = cache.view(-1, rank + rope)
        torch.testing.assert_close(rows[slots], torch.cat((latent, want_k[:, 0]), -1),
                                   atol=1e-6, rtol=1e-6)
        others = torch.ones(rows.shape[0], dtype=torch.bool)
        others[slots] = False
        assert not rows[others].any()


@pytest.mark.slow
def test_mla_glue_and_sigmoid_router_kernels_give_the_reference_logits_in_the_interpreter():
    pytest.importorskip("transformers")
    run_in_triton_interpreter("from tests.unit.test_cuda_hybrid_mla_rope import "
                              "interpreter_check as c; c(); print('ok')")


def test_mla_glue_compiles_for_the_h100():
    from tests.helpers.triton_compile import compile_for

    pytest.importorskip("triton")
    from pensieve.backends.cuda_hybrid_mla_rope import _kernel

    types = {"Q": "*bf16", "KV": "*bf16", "NW": "*bf16", "COS": "*bf16", "SIN": "*bf16",
             "SLOTS": "*i64", "CACHE": "*bf16", "QOUT": "*bf16", "s_qt": "i32", "s_qh": "i32",
             "s_kv": "i32", "s_cs": "i32", "eps": "fp32"}
    for interleave in (True, False):
        assert compile_for(_kernel(), types, {"H": 20, "H_PAD": 32, "RANK": 512,
                                              "RANK_PAD": 512, "HALF": 32,
                                              "INTERLEAVE": interleave}, 4, 1) is not None


@needs_cuda
def test_mla_glue_on_cuda_in_bfloat16():
    """GLM-4.7-Flash's head shapes in bfloat16: within a bfloat16 rounding of the torch form."""
    from pensieve.backends.cuda_hybrid_mla_rope import rope_write
    from pensieve.models.deepseek_mla import rotate_pairs

    dev, dt = "cuda", torch.bfloat16
    t, heads, nope, rope, rank = 8, 20, 192, 64, 512
    q = torch.randn(t, heads * (nope + rope), device=dev, dtype=dt).view(t, heads, -1)
    kv = torch.randn(t, rank + rope, device=dev, dtype=dt)
    w = torch.rand(rank, device=dev, dtype=dt)
    ang = torch.rand(t, 1, rope // 2, device=dev) * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    slots = torch.randperm(64, device=dev)[:t]
    cache = torch.zeros(16, 4, 1, rank + rope, device=dev, dtype=dt)
    q_pe = q[..., nope:]
    got = rope_write(q_pe, kv, w, 1e-6, cos, sin, slots, cache, True)
    want_q = rotate_pairs(q_pe, (cos, sin))
    want_k = rotate_pairs(kv[:, None, rank:], (cos, sin))[:, 0]
    latent = torch.nn.functional.rms_norm(kv[:, :rank], (rank,), w, 1e-6)
    torch.testing.assert_close(got, want_q, atol=3e-2, rtol=2e-2)
    rows = cache.view(-1, rank + rope)[slots]
    torch.testing.assert_close(rows, torch.cat((latent, want_k), -1), atol=3e-2, rtol=2e-2)


def test_tensors_the_kernel_declines_leave_the_torch_form():
    from pensieve.backends.cuda_hybrid_mla_rope import takes

    t, heads, rope, rank = 3, 2, 8, 16
    q_pe = torch.randn(t, heads, 24)[..., 16:]
    kv = torch.randn(t, rank + rope)
    cs = (torch.randn(t, 1, rope), torch.randn(t, 1, rope))
    cache = torch.zeros(4, 4, 1, rank + rope)
    assert takes(q_pe, kv, cs, cache)
    assert not takes(q_pe, kv, cs, torch.zeros(4, 4, 1, rank + rope + 1)[..., 1:])  # strided
    assert not takes(q_pe, kv, cs, cache.to(torch.int8))  # a quantised cache
    assert not takes(q_pe, kv, (cs[0][..., :4], cs[1][..., :4]), cache)  # a partial table
