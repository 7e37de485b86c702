"""The split-K int4 GEMV (``backends/cuda_int4_gemv.py``) for 1-8 rows of x.

On CPU: every start-time candidate in Triton's interpreter (``TRITON_INTERPRET=1``, a fresh
process) against dequantise → matmul at N = 45 (no tile divides it) and K of 14 and 8 groups
(uneven and even splits), Q4_0's scales alone and affine pairs, float32 and float16 x, rows
1-5 (two row blocks), twice in a row (the split-K counters reset); the route through
``int4_linear`` and its fallback; the plan's round trip through the plan cache; and each
candidate compiled for sm_90 by Triton's own ptxas (what the interpreter cannot see: a tile the
compiler refuses, the dp4a inline PTX). With a GPU: bf16 at model shapes against float64, and
under a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from pensieve.backends import cuda_int4, cuda_int4_gemv
from pensieve.backends.cuda_int4_gemv import CANDIDATES, Split, gemv_split
from tests.helpers.cuda_graph_check import assert_replays_as_eager
from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def weight(n: int, k: int, sym: bool, seed: int = 0):
    """Random codes with Q4_0-like scales (``sym``: offsets −8 · scale, held as scales alone)
    or affine pairs; the packed layout and its float64 weight."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // 32, generator=gen) * 0.01 + 0.001
    offsets = -8 * scales + (0 if sym else torch.randn(n, k // 32, generator=gen) * 2e-3)
    packed = cuda_int4.pack_codes(codes)
    so = cuda_int4.pack_scales(scales) if sym else cuda_int4.pack_scale_offset(scales, offsets)
    assert cuda_int4.symmetric(so) == sym
    return packed, so, cuda_int4.unpack(packed, so).double()


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()


def tolerance(cfg: Split, dtype: torch.dtype) -> float:
    """int8 x: llama.cpp's rounding (~0.5% measured); float x: float32 sums of exact products."""
    return 1.5e-2 if cfg.q8 else 2e-3 if dtype == torch.float16 else 1e-5


def interpreter_check(full: bool) -> None:
    n = 45
    uneven = (Split(4, 32, 3, 1), Split(8, 64, 2, 1, q8=1),  # 14 groups: masked, empty runs
              Split(8, 32, 3, 1, q8=2))
    shapes = ((448, True), (448, False), (256, True)) if full else ((448, True),)
    for k, sym in shapes:
        packed, so, w = weight(n, k, sym, seed=k)
        for c, cfg in enumerate(CANDIDATES if full else uneven):
            cases = {(448, True): [(1, torch.float32)], (448, False): [(3, torch.float16)],
                     (256, True): [(2, torch.float32)]}[k, sym]
            if sym and c % 3 == 0:
                cases.append((5, torch.float32))  # two row blocks
            if not full:
                cases = [(1, torch.float32), (3, torch.float16)]
            for rows, dtype in cases:
                x = torch.randn(rows, k).to(dtype)
                ref = x.double() @ w.T
                for _ in range(2):  # the second call needs the counters the first reset
                    y = gemv_split(x, packed, so, cfg)
                    assert y.dtype == dtype and y.shape == (rows, n)
                    r = rel(y, ref)
                    assert r < tolerance(cfg, dtype), (k, sym, cfg, rows, dtype, r)
    # the route: split where the plan names it, words where its tiles are missing
    packed, so, w = weight(n, 256, True)
    x = torch.randn(2, 256)
    plan = cuda_int4.default_plan(256)
    plan.route[2] = "split"
    plan.split = CANDIDATES[0]
    assert rel(cuda_int4.int4_linear(x, packed, so, plan=plan), x.double() @ w.T) < 1e-5
    plan.split = None
    assert rel(cuda_int4.int4_linear(x, packed, so, plan=plan), x.double() @ w.T) < 1e-5
    # int8 x: each row's codes, scales and sums
    xq, xd, xs = cuda_int4_gemv.quantize_q8(x)
    back = xq.double().view(2, 8, 32) * xd.double()[..., None]
    assert (back - x.double().view(2, 8, 32)).abs().max() <= xd.max() / 2 + 1e-7
    torch.testing.assert_close(xs.double(), back.sum(-1))
    print("ok")


def test_uneven_splits_in_the_triton_interpreter():
    """A float and two int8-x tiles (x rounded first, in the kernel) whose splits do not divide
    the groups (masked and empty runs)."""
    run_in_triton_interpreter("from tests.unit.test_cuda_int4_gemv import interpreter_check "
                              "as c; c(False)")


@pytest.mark.slow
def test_every_candidate_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_int4_gemv import interpreter_check "
                              "as c; c(True)")


def test_rows_and_splits_past_the_limits_are_refused():
    packed, so, _ = weight(8, 64, True)
    with pytest.raises(ValueError):
        gemv_split(torch.zeros(9, 64), packed, so, CANDIDATES[0])
    with pytest.raises(ValueError):
        gemv_split(torch.zeros(1, 64), packed, so, Split(8, 32, 16, 1))


def test_int8_x_candidates_can_be_left_out(monkeypatch):
    assert any(c.q8 for c in cuda_int4_gemv.candidates())
    monkeypatch.setenv("PENSIEVE_INT4_Q8", "0")
    assert cuda_int4_gemv.candidates() and not any(c.q8 for c in cuda_int4_gemv.candidates())


def test_the_plan_cache_keeps_the_split_tiles():
    from pensieve.backends import cuda_int4_plan_cache as plan_cache

    plan = cuda_int4.default_plan(4096)
    plan.route[1] = "split"
    plan.split = CANDIDATES[-1]
    assert plan_cache.from_json(plan_cache.to_json(plan)) == plan
    old = plan_cache.to_json(plan)
    del old["split"]  # a plan written before the split kernel
    assert plan_cache.from_json(old).split is None


@needs_cuda
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (45, 448)])
@pytest.mark.parametrize("sym", [True, False])
def test_cuda_candidates_against_float64(n, k, sym):
    """Every candidate in bf16 at 1-8 rows (3: a masked row of a 4-row block; 8: two blocks),
    twice in a row."""
    packed, so, w = weight(n, k, sym, seed=n + k)
    packed, so = packed.cuda(), so.cuda()
    gen = torch.Generator().manual_seed(k)
    for cfg in CANDIDATES:
        for rows in (1, 2, 3, 8):
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            ref = x.double() @ w.T
            for _ in range(2):
                y = gemv_split(x.cuda(), packed, so, cfg)
                assert not torch.isnan(y).any()
                r = rel(y, ref)
                assert r < (2e-2 if cfg.q8 else 1e-2), (cfg, rows, r)


@needs_cuda
@pytest.mark.parametrize("rows", [1, 4])
def test_split_k_in_a_cuda_graph(rows):
    packed, so, _ = weight(4096, 4096, True)
    packed, so = packed.cuda(), so.cuda()
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    for cfg in (c for c in CANDIDATES if c.split_k > 1):
        assert_replays_as_eager(lambda v, c=cfg: gemv_split(v, packed, so, c), x)


@needs_cuda
def test_the_tuner_times_the_split_candidates():
    from pensieve.backends.cuda_int4 import CudaInt4Linear
    from pensieve.backends.cuda_int4_tune import plan_shape
    from pensieve.models.quant_linear import Int4Groups

    scales = torch.rand(4096, 128, device="cuda") * 0.004 + 0.001
    codes = torch.randint(0, 16, (4096, 4096), dtype=torch.uint8, device="cuda")
    layers = [CudaInt4Linear([Int4Groups(codes, scales, -8 * scales, 32)]).cuda()
              for _ in range(2)]
    plan, note = plan_shape(layers, torch.bfloat16, 5)
    assert plan.split in CANDIDATES and "split" in note
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ cuda_int4.dequantize(layers[0].packed, layers[0].scale_offset,
                                           torch.float32).T
    y = cuda_int4.int4_linear(x, layers[0].packed, layers[0].scale_offset, plan=plan)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2


def compile_candidates(cfgs, block_ms, dtype: str = "bf16", syms=(True,), even=True) -> None:
    from pensieve.backends import cuda_int4_gemv_kernels as kernels
    from tests.helpers.triton_compile import compile_for

    types = {"X": f"*{dtype}", "XD": "*fp32", "XS": "*fp32", "W": "*i32", "SO": "*i16",
             "Y": f"*{dtype}", "WS": "*fp32", "CNT": "*i32", "M": "i32", "N": "i32",
             "GROUPS": "i32", "stride_x": "i32", "stride_y": "i32", "stride_w": "i32"}
    for cfg in cfgs:
        for bm in block_ms:
            for sym in syms:
                t = {**types, "X": "*i32" if cfg.q8 == 1 else types["X"],
                     "SO": "*i16" if sym else "*i32"}
                consts = {"BLOCK_M": bm, "BLOCK_N": cfg.block_n, "BLOCK_G": cfg.block_g,
                          "SPLIT_K": cfg.split_k, "NUM_STAGES": cfg.num_stages, "EVEN": even,
                          "Q8": cfg.q8, "SYM": sym, "ASM": True}
                assert compile_for(kernels.gemv_split, t, consts, cfg.num_warps, 1) is not None
    types = {"X": f"*{dtype}", "XQ": "*i8", "XD": "*fp32", "XS": "*fp32", "GROUPS": "i32",
             "stride_x": "i32", "stride_q": "i32"}
    assert compile_for(kernels.quantize_q8, types, {"BLOCK_G": 16}, 4, 1) is not None


def test_candidates_compile_for_the_h100():
    """Each start-time candidate at 1 row in bfloat16 on Q4_0 scales, built for sm_90 here (the
    dp4a PTX through ptxas)."""
    compile_candidates(CANDIDATES, (1,))


@pytest.mark.slow
def test_candidates_compile_for_the_h100_at_every_row_block():
    compile_candidates(CANDIDATES, (2, 4), syms=(True, False))
    compile_candidates(CANDIDATES[:1] + CANDIDATES[2:3] + CANDIDATES[-1:], (1,), dtype="fp16")
    compile_candidates(CANDIDATES, (1,), even=False)  # groups the splits do not divide
