"""Q6_K's ``rows`` kernel, made for 4-16 rows (``backends/cuda_q6k_rows.py``: swap-AB tensor
cores on the code words, 8/16-row tiles), and its place in ``cuda_q6k_tune``'s race (1-16).

On CPU: the split each tile takes at the real shapes (a divisor of the steps, none for a
head-sized N, up to 16 for a short one); in Triton's interpreter (a fresh process) every tuner
candidate against the float64 product at N = 45 (no multiple of a tile) and K = 768 / 512 (24 /
16 groups: splits of 3, 6, 12 steps, BLOCK_G cut), 1 row up to the tile's 8 or 16, float32
(exact to rounding) and float16 x — the bfloat16 bit trick is beyond the interpreter and
checked on a GPU; the tuner's choice with a timer the test controls (rows where it is cheapest, a wrong tile left out
with a warning); every candidate compiled for sm_90 in bfloat16 with the launch's 16-divisible
arguments, without a register spill and (64+ outputs a tile) on wgmma. With a GPU: bf16/fp16
against float64 at Qwen3-8B's Q6_K shapes and a head-sized N, the split-K reduction
deterministic and in a CUDA graph (the counters reset between replays), and the tuner's real
race at 1-16 rows.
"""

from __future__ import annotations

import os

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends import cuda_q6k
from pensieve.backends.cuda_q6k import CudaQ6KLinear
from pensieve.backends.cuda_q6k_rows import SPLIT_MAX_N, Rows, fits, split_of
from tests.helpers.cuda_graph_check import assert_replays_as_eager
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.helpers.tune_race import few_q6k_tiles, first_q6k_tiles, kept_warnings
from tests.unit.test_cuda_int8 import groups, rel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# tiles beyond the tuner's: a step of one group, 16 outputs (mma.sync), 8 warps on 128 with
# two steps prefetched and Triton's pipeline
EDGE = (Rows(16, 16, 1, 16, 4, 1, True), Rows(16, 16, 8, 8, 4, 1, False),
        Rows(16, 128, 1, 3, 8, 2, 2))


def candidates() -> tuple[Rows, ...]:
    from pensieve.backends.cuda_q6k_tune import ROWS_CANDIDATES

    return ROWS_CANDIDATES


def layer_of(n: int, k: int, seed: int) -> CudaQ6KLinear:
    return CudaQ6KLinear([groups(Q.Q6_K, n // 2, k, seed=seed),
                          groups(Q.Q6_K, n - n // 2, k, seed=seed + 1)])


def test_split_is_a_divisor_of_the_steps_and_none_for_a_head():
    for t in candidates() + EDGE:
        for n, k in ((1024, 4096), (4096, 12288), (151936, 4096), (45, 768), (45, 512)):
            bg, s = split_of(t, n, k // 32)
            assert (k // 32) % (bg * s) == 0 and 1 <= s <= min(t.split_k, 16), (t, n, k)
            assert s == 1 or n < SPLIT_MAX_N
    assert split_of(Rows(16, 64, 2, 16, 4, 1, True), 1024, 128) == (2, 16)  # attn_v: 16 × 4 steps
    assert split_of(Rows(16, 64, 2, 8, 4, 1, True), 4096, 384) == (2, 8)  # ffn_down: 8 × 24
    assert split_of(Rows(16, 64, 4, 16, 4, 1, True), 45, 24) == (4, 6)  # 6 steps
    assert split_of(Rows(16, 64, 2, 8, 4, 1, True), 151936, 128) == (2, 1)  # a head: no split
    assert fits(Rows(16, 64, 2, 8, 4, 1), 16) and fits(Rows(16, 64, 2, 8, 4, 1), 1)
    assert not fits(Rows(16, 64, 2, 8, 4, 1), 17) and not fits(Rows(16, 64, 2, 8, 4, 1), 0)
    assert fits(Rows(8, 64, 2, 8, 4, 1), 8) and not fits(Rows(8, 64, 2, 8, 4, 1), 9)
    assert not fits(Rows(32, 64, 2, 8, 4, 1), 4)  # the workspace holds 16 rows
    assert not fits(Rows(16, 8, 2, 8, 4, 1), 4)  # counters per 16 outputs


def kernels_check() -> None:
    """Every candidate and the edge tiles under the interpreter."""
    from pensieve.backends.cuda_q6k_rows import gemm_rows

    for n, k, tiles in ((45, 768, candidates() + EDGE), (45, 512, candidates()[:3] + EDGE)):
        layer = layer_of(n, k, seed=k)
        w = layer.weight_buffers()
        weight = layer.dequantize().double()
        for i, t in enumerate(tiles):
            cases = [(t.block_m, torch.float32, 1e-5), (5, torch.float32, 1e-5)]
            if i % 3 == 0:
                cases += [(1, torch.float32, 1e-5), (t.block_m - 1, torch.float16, 2e-3)]
            for rows, dtype, tol in cases:
                x = torch.randn(rows, k).to(dtype)
                y = gemm_rows(x, w, torch.empty(rows, n, dtype=dtype), t)
                r = rel(y, x.double() @ weight.T)
                assert r < tol, (n, k, t, rows, dtype, r)
        with pytest.raises(ValueError):  # more rows than the tile
            gemm_rows(torch.randn(17, k), w, torch.empty(17, n), candidates()[0])
        with pytest.raises(ValueError):  # an 8-row tile
            gemm_rows(torch.randn(9, k), w, torch.empty(9, n), Rows(8, 16, 2, 4, 4, 1, 1))
    # a strided output (a column slice of a wider y), through the module's router
    layer = layer_of(48, 512, 7)
    x = torch.randn(6, 512)
    y = cuda_q6k.launch(("rows", candidates()[0]), x, layer.weight_buffers())
    assert y.shape == (6, 48) and rel(y, x.double() @ layer.dequantize().double().T) < 1e-5


def tuner_check() -> None:
    """``rows`` in the tuner's race: priced cheapest it wins buckets 1-16 (never 32+),
    a wrong tile is left out with a warning, and the planned routes give the product."""
    from pensieve.backends import cuda_q6k_rows
    from pensieve.backends import cuda_q6k_tune as tune

    warnings = kept_warnings(tune.log)
    # fewer tiles (the interpreter is slow; the race is the same code)
    few_q6k_tiles(tune)
    tune.SPLIT_CANDIDATES = {b: (tune.SPLIT_CANDIDATES[b][0],) for b in (1, 2, 4, 8, 16)}
    cheap, other = Rows(16, 16, 2, 4, 4, 1, 1), Rows(16, 32, 2, 8, 4, 1, 2)
    tiny = Rows(8, 16, 2, 4, 4, 1, 1)  # the cheapest where it fits: 8 rows at most
    tune.ROWS_CANDIDATES = (other, cheap, tiny)
    os.environ["PENSIEVE_Q6K_SKINNY2"] = "0"  # skinny2's race: test_cuda_q6k_skinny2.py
    price = {"gemv": 2.0, "split": 1.5, "rows": 1.0, "skinny": 1.8, "gemm": 5.0, "dequant": 3.0}

    def timer(run, sample, reps):
        run(sample[0])
        name, t = run.choice
        return price[name] + 0.01 * t.block_n / 16 - 0.001 * (t.block_m == 8)

    k = 512
    rows = {1: 1, 2: 2, 4: 3, 8: 5, 16: 16, 32: 17, 256: 18, 2048: 19}
    model = torch.nn.Sequential(layer_of(45, k, 1))
    tune.prepare(model, torch.float32, timer=timer, rows=rows)
    plan = model[0].plan
    for b in (1, 2, 4, 8):
        assert plan[b] == ("rows", tiny), (b, plan[b])
    assert plan[16] == ("rows", cheap) and plan[32][0] == "skinny"
    assert not warnings
    assert tune.describe(plan[16]) == "rows 16x16x2/4 pf1"
    assert tune.describe(("rows", Rows(16, 64, 2, 4, 4, 3))) == "rows 16x64x2/4 s3"
    weight = model[0].dequantize().double()
    for r in (1, 3, 7, 16, 20):  # the planned routes give the product
        x = torch.randn(r, k)
        assert rel(cuda_q6k.q6k_linear(x, model[0].weight_buffers(), plan),
                   x.double() @ weight.T) < 1e-5, r

    real = cuda_q6k_rows.gemm_rows

    def broken(x, w, y, t):
        if t in (cheap, tiny):
            return y.zero_()  # the one that would win: wrong, left out
        return real(x, w, y, t)

    cuda_q6k_rows.gemm_rows = broken
    try:
        tune.prepare(model, torch.float32, timer=timer, rows=rows)
    finally:
        cuda_q6k_rows.gemm_rows = real
    plan = model[0].plan
    for b in (1, 2, 4, 8, 16):
        assert plan[b] == ("rows", other), (b, plan[b])
    assert any("relative error" in m and "rows" in m for m in warnings)
    price["rows"] = 1.6  # dearer than split (1.5), cheaper than skinny (1.8) and gemv
    tune.prepare(model, torch.float32, timer=timer, rows=rows)
    plan = model[0].plan  # the lean race (the default) times split only at 1-2 rows
    assert [plan[b][0] for b in (1, 2, 4, 8, 16)] == ["split"] * 2 + ["rows"] * 3, plan
    assert plan[256][0] == plan[2048][0] == "dequant"  # the gemm raced only at 32 rows
    os.environ["PENSIEVE_TUNE_FULL"] = "1"  # the whole race (a subprocess of its own)
    tune.prepare(model, torch.float32, timer=timer, rows=rows)
    assert all(model[0].plan[b][0] == "split" for b in (1, 2, 4, 8, 16))


@pytest.mark.slow
def test_rows_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k_rows import kernels_check as c; "
                              "c(); print('ok')")


@pytest.mark.slow
def test_tuner_races_rows_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k_rows import tuner_check as c; "
                              "c(); print('ok')")


@pytest.mark.slow
def test_candidates_compile_for_the_h100_without_spills():
    """Every candidate, bf16 and fp16, for sm_90: no local memory (a spill); tiles of 64+
    outputs a warp group on wgmma (the tensor cores' sm_90 form)."""
    from pensieve.backends import cuda_q6k_rows_kernels
    from tests.unit.test_cuda_q6k_split import compile_sm90

    types = {"X": "*bf16", "LO": "*i32", "HI": "*i32", "SC": "*i8", "D": "*i16", "Y": "*bf16",
             "WS": "*fp32", "CNT": "*i32", "M": "i32", "N": "i32", "GROUPS": "i32",
             "G_PER": "i32", "stride_x": "i32", "stride_y": "i32"}
    divisible = set(types) - {"M"}
    for dt in ("bf16", "fp16"):
        for t in candidates() + EDGE[2:]:
            consts = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_G": t.block_g,
                      "SPLIT_K": t.split_k, "PREFETCH": int(t.prefetch)}
            c, regs, local = compile_sm90(cuda_q6k_rows_kernels.rows,
                                          {**types, "X": f"*{dt}", "Y": f"*{dt}"}, consts,
                                          t.num_warps, t.num_stages, divisible)
            assert local in (0, None), (t, dt, regs, local)
            if t.block_n >= 16 * t.num_warps:
                assert "wgmma.mma_async" in c.asm["ptx"], (t, dt)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_against_float64(dtype):
    """Every candidate (float16: the first three) at Qwen3-8B's v / down shapes and a
    head-sized N (no split); the split-K reduction deterministic."""
    from pensieve.backends.cuda_q6k_rows import gemm_rows, rows_workspace

    tiles = candidates() + EDGE if dtype == torch.bfloat16 else candidates()[:3]
    for n, k in ((1024, 4096), (4096, 12288), (151936 // 4, 4096)):
        layer = CudaQ6KLinear(groups(Q.Q6_K, n, k, seed=n)).cuda()
        w = layer.weight_buffers()
        rows_workspace(torch.device("cuda"), n)
        x = torch.randn(16, k, generator=torch.Generator().manual_seed(n)).to(dtype).cuda()
        ref = x.double() @ layer.dequantize().double().T
        for t in tiles:
            for rows in [r for r in (1, 4, 8, 13, 16) if r <= t.block_m]:
                y = gemm_rows(x[:rows], w, torch.empty(rows, n, device="cuda", dtype=dtype), t)
                r = rel(y, ref[:rows].cpu())
                assert r < 1e-2, (n, k, t, rows, r)
            again = gemm_rows(x[:rows], w, torch.empty_like(y), t)
            assert torch.equal(y, again), t  # the fixed-order reduction: deterministic


@needs_cuda
@pytest.mark.parametrize("rows", [4, 8, 16])
def test_rows_in_a_cuda_graph(rows):
    from pensieve.backends.cuda_q6k_rows import rows_workspace

    layer = CudaQ6KLinear(groups(Q.Q6_K, 256, 4096, 5)).to(device="cuda", dtype=torch.bfloat16)
    t = Rows(16, 64, 2, 16, 4, 1, True)  # K over 16 programs
    layer.plan = {b: ("rows", t) for b in cuda_q6k.BUCKETS}
    rows_workspace(torch.device("cuda"), 256)
    assert_replays_as_eager(layer, torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16))


@needs_cuda
def test_tuner_races_rows_on_the_gpu(monkeypatch):
    """The real race (bf16, the GPU timer) with every rows tile and each other family's first
    (fewer compiles): each bucket's choice is right; which one wins is the GPU's (printed)."""
    from pensieve.backends import cuda_q6k_tune as tune

    first_q6k_tiles(monkeypatch, tune)
    model = torch.nn.Sequential(layer_of(1024, 4096, 9)).to(device="cuda", dtype=torch.bfloat16)
    tune.prepare(model, torch.bfloat16, reps=3)
    plan = model[0].plan
    print({b: tune.describe(c) for b, c in plan.items()})
    weight = model[0].dequantize().double()
    for r in (1, 4, 8, 16):
        x = torch.randn(r, 4096, device="cuda", dtype=torch.bfloat16)
        assert plan[cuda_q6k.bucket(r)][0] != "torch"
        assert rel(model[0](x), (x.double() @ weight.T).cpu()) < 1e-2, r
