"""The wide-x-load int4 GEMV (``backends/cuda_int4_gemv_wide.py``) for 1-2 bfloat16 rows, and
the older ``gemv`` prefetching its next step (route ``gemv_pf``).

On CPU: every start-time candidate in Triton's interpreter (a fresh process) against the
dequantised weight's float64 product — N = 45 (no tile divides it), K of 14 groups (masked
steps) and 8 (even), Q4_0's scales alone and affine pairs, 1 and 2 rows — and each candidate
compiled for sm_90 by Triton's own ptxas; the tuner's bf16-only guard. With a GPU: the
candidates at a model shape against float64, and under a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from pensieve.backends import cuda_int4
from pensieve.backends.cuda_int4_gemv_wide import CANDIDATES, Wide, fits, gemv_wide
from tests.helpers.cuda_graph_check import assert_replays_as_eager
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.unit.test_cuda_int4_gemv import rel, weight

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def interpreter_check() -> None:
    for k, sym in ((448, True), (448, False), (256, True), (2240, False)):
        packed, so, w = weight(45, k, sym, seed=k)
        # 70 groups: several steps, the last masked (the prefetching tiles' edge)
        cands = CANDIDATES if k != 2240 else [c for c in CANDIDATES if c.prefetch][::2]
        for i, cfg in enumerate(cands):
            for rows in (1, 2) if (i + k // 32) % 2 else (1,):  # 2 rows on every other
                x = torch.randn(rows, k).to(torch.bfloat16)
                ref = x.double() @ w.T
                y = gemv_wide(x, packed, so, cfg)
                assert y.dtype == torch.bfloat16 and y.shape == (rows, 45)
                # float32 sums of exact products, then one bfloat16 rounding of y
                assert rel(y, ref) < 6e-3, (k, sym, cfg, rows, rel(y, ref))
    # SwiGLU form: SiLU(gate)·up of a fused gate/up weight, as the GEMV then silu_mul round
    from pensieve.backends.cuda_layers import silu_mul
    for k, sym in ((448, False), (256, True), (2240, True)):
        packed, so, w = weight(2 * 45, k, sym, seed=k + 1)
        for cfg in (CANDIDATES[0], CANDIDATES[5], CANDIDATES[-3]):
            x = torch.randn(1, k).to(torch.bfloat16)
            fused = gemv_wide(x, packed, so, cfg, swiglu=True)
            assert fused.shape == (1, 45)
            assert torch.equal(fused, silu_mul(gemv_wide(x, packed, so, cfg))), (k, sym, cfg)
    # the older gemv prefetching its next step (route gemv_pf), several steps: equal to plain
    for k, sym in ((2240, True), (448, False)):
        packed, so, w = weight(45, k, sym, seed=k + 2)
        x = torch.randn(2, k).to(torch.bfloat16)
        plain = cuda_int4.gemv(x, packed, so)
        assert torch.equal(cuda_int4.gemv(x, packed, so, prefetch=True), plain)
        plan = cuda_int4.Plan({1: "gemv_pf", 2: "gemv_pf"})
        assert torch.equal(cuda_int4.int4_linear(x, packed, so, plan=plan), plain)
        assert rel(plain, x.double() @ w.T) < 6e-3
    # the route: a plan naming "wide" runs it on bfloat16 rows, gemv_words on others
    packed, so, w = weight(45, 256, True)
    plan = cuda_int4.Plan({1: "wide", 2: "wide"}, wide=CANDIDATES[1])
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 256).to(dtype)
        y = cuda_int4.int4_linear(x, packed, so, plan=plan)
        assert y.dtype == dtype and rel(y, x.double() @ w.T) < 6e-3, dtype


@pytest.mark.slow
def test_candidates_in_the_interpreter():
    run_in_triton_interpreter(
        "import tests.unit.test_cuda_int4_gemv_wide as t; t.interpreter_check(); print('ok')")


def test_plans_keep_their_wide_tiles():
    from pensieve.backends.cuda_int4_plan_cache import from_json, to_json

    plan = cuda_int4.default_plan(4096)
    plan.route[1] = "wide"
    plan.wide = Wide(4, 64, 2, word_threads=True)
    assert from_json(to_json(plan)) == plan
    assert from_json(to_json(cuda_int4.default_plan(4096))).wide is None


def test_only_bfloat16_rows_fit():
    k = 256
    assert fits(torch.zeros(1, k, dtype=torch.bfloat16), k)
    assert fits(torch.zeros(2, k, dtype=torch.bfloat16), k)
    assert not fits(torch.zeros(3, k, dtype=torch.bfloat16), k)
    assert not fits(torch.zeros(1, k, dtype=torch.float16), k)
    packed, so, _ = weight(8, k, True)
    with pytest.raises(ValueError):
        gemv_wide(torch.zeros(1, k, dtype=torch.float16), packed, so, CANDIDATES[0])


@pytest.mark.slow
def test_candidates_compile_for_the_h100():
    from pensieve.backends import cuda_int4_gemv_wide_kernels as kernels
    from tests.helpers.triton_compile import compile_for

    types = dict(X2="*i32", W="*i32", SO="*i16", Y="*bf16", N="i32", GROUPS="i32",
                 stride_x2="i32", stride_y="i32", stride_w="i32")
    for t in CANDIDATES:
        for even, sym in ((True, True), (False, False)):
            consts = dict(BLOCK_N=t.block_n, BLOCK_G=t.block_g, EVEN=even, SYM=sym,
                          WORD_THREADS=t.word_threads, ASM=True, SWIGLU=not even,
                          PREFETCH=t.prefetch)
            so_type = "*i16" if sym else "*i32"
            assert compile_for(kernels.gemv_wide, {**types, "SO": so_type}, consts,
                               t.num_warps, t.num_stages) is not None, t


def test_prefetching_gemv_compiles_for_the_h100():
    from pensieve.backends import cuda_int4_kernels as kernels
    from tests.helpers.triton_compile import compile_for

    types = dict(X="*bf16", W="*u8", SO="*i16", Y="*bf16", N="i32", K="i32", GROUPS="i32",
                 stride_x="i32", stride_y="i32")
    t = cuda_int4.GEMV
    consts = dict(BLOCK_N=t.block_n, BLOCK_G=t.block_g, SYM=True, PREFETCH=True)
    assert compile_for(kernels.gemv, types, consts, t.num_warps, t.num_stages) is not None


@needs_cuda
@pytest.mark.parametrize("sym", [True, False])
def test_candidates_at_a_model_shape_on_the_gpu(sym):
    packed, so, w = weight(1024, 4096, sym)
    packed, so = packed.cuda(), so.cuda()
    for cfg in CANDIDATES:
        for rows in (1, 2):
            x = torch.randn(rows, 4096, device="cuda").to(torch.bfloat16)
            ref = x.double().cpu() @ w.T
            assert rel(gemv_wide(x, packed, so, cfg), ref) < 6e-3, (cfg, rows)
    x = torch.randn(2, 4096, device="cuda").to(torch.bfloat16)
    assert torch.equal(cuda_int4.gemv(x, packed, so, prefetch=True), cuda_int4.gemv(x, packed, so))


@needs_cuda
def test_swiglu_form_equals_the_gemv_then_silu_mul_on_the_gpu():
    from pensieve.backends.cuda_layers import silu_mul

    packed, so, _ = weight(2 * 1536, 4096, False)
    packed, so = packed.cuda(), so.cuda()
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    for cfg in CANDIDATES:
        ref = silu_mul(gemv_wide(x, packed, so, cfg))
        fused = gemv_wide(x, packed, so, cfg, swiglu=True)
        assert (fused == ref).float().mean() > 0.99, cfg  # same sums, same roundings
        torch.testing.assert_close(fused, ref, atol=1e-2, rtol=1e-2)


@needs_cuda
def test_replays_under_a_cuda_graph():
    packed, so, _ = weight(512, 1024, True)
    packed, so = packed.cuda(), so.cuda()
    x = torch.randn(1, 1024, device="cuda").to(torch.bfloat16)
    assert_replays_as_eager(lambda x: gemv_wide(x, packed, so, Wide(8, 32, 1)), x)
