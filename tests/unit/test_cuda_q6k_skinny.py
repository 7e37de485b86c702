"""Q6_K on CUDA at 2+ rows (``backends/cuda_q6k.py``): the ``skinny`` tensor-core kernel (16 and
32-row tiles, one-launch split-K), the ``dequant`` kernel (the weight into a temporary +
cuBLAS, a vocabulary-sized weight a block of rows at a time) and ``cuda_q6k_tune``'s choice per
row bucket.

On CPU, in Triton's interpreter (``TRITON_INTERPRET=1``, a fresh process): every kernel against
the dequantised weight at N = 45 (no multiple of a tile) and K = 768 / 512 (24 / 16 groups: a
split that does and does not divide them), 1-33 rows, float32 and float16 x (bfloat16's bit
tricks are beyond the interpreter: they are compiled for sm_90 in ``test_cuda_q6k.py`` and
checked on a GPU below); the tuner's choice with a timer the test controls (the fastest right
candidate per bucket; a wrong one and one that fails to build left out, a bucket with none right
on the reference). With a GPU: bf16/fp16 against float64 at Qwen3-8B's Q6_K shapes and in a CUDA
graph (the split-K counters reset between replays), and the tuner with the real timer.
"""

from __future__ import annotations

import os

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends import cuda_q6k
from pensieve.backends.cuda_q6k import CudaQ6KLinear, Skinny
from tests.helpers.cuda_graph_check import assert_replays_as_eager
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.helpers.tune_race import kept_warnings
from tests.unit.test_cuda_int8 import groups, rel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TILES = (Skinny(16, 16, 4, 1, 4, 3),  # 24 groups: 6 steps, no mask
         Skinny(16, 32, 4, 4, 4, 3),  # 4 programs of 8 groups: the last one empty (masks)
         Skinny(16, 16, 16, 1, 4, 3),  # one step of 16 groups past 24: masked
         Skinny(32, 64, 2, 3, 4, 3),  # 3 programs of 8 groups: even
         Skinny(32, 16, 8, 2, 4, 3))  # 2 programs of 16 groups: the second half empty


def layer_of(n: int, k: int, seed: int) -> CudaQ6KLinear:
    return CudaQ6KLinear([groups(Q.Q6_K, n // 2, k, seed=seed),
                          groups(Q.Q6_K, n - n // 2, k, seed=seed + 1)])


def kernels_check() -> None:
    """skinny, dequant and every default bucket under the interpreter."""
    for n, k, tiles in ((45, 768, TILES), (45, 512, TILES[1::2])):
        layer = layer_of(n, k, seed=k)
        w = layer.weight_buffers()
        weight = layer.dequantize().double()
        for t in tiles:
            for rows, dtype, tol in ((1, torch.float32, 1e-5), (5, torch.float16, 2e-3),
                                     (t.block_m, torch.float32, 1e-5)):
                x = torch.randn(rows, k).to(dtype)
                y = cuda_q6k.skinny(x, w, torch.empty(rows, n, dtype=dtype), t)
                r = rel(y, x.double() @ weight.T)
                assert r < tol, (n, k, t, rows, dtype, r)
        with pytest.raises(ValueError):  # more rows than the tile
            cuda_q6k.skinny(torch.randn(17, k), w, torch.empty(17, n), TILES[0])
        # the weight in float32 is the reference's, exactly; in float16 rounded once
        assert torch.equal(cuda_q6k.dequant_weight(w, torch.float32).double(), weight)
        half = cuda_q6k.dequant_weight(w, torch.float16)
        assert torch.equal(half, weight.to(torch.float16))
        x = torch.randn(40, k)
        for chunk in (k * 10, k * 45, 1 << 26):  # 5 blocks of rows (the last short), 1, 1
            assert rel(cuda_q6k.dequant_linear(x, w, chunk=chunk), x.double() @ weight.T) < 1e-5
        for rows in (1, 2, 3, 9, 17, 33):  # every default route, 1-33 rows
            x = torch.randn(rows, k)
            assert rel(cuda_q6k.q6k_linear(x, w), x.double() @ weight.T) < 1e-5, rows
    # a weight with more outputs than SPLIT_MAX_N never splits K: no workspace for it
    assert not cuda_q6k.skinny_fits(Skinny(16, 64, 4, 4, 4, 3), cuda_q6k.SPLIT_MAX_N)
    big = cuda_q6k.default_plan(151936)
    assert all(c[1].split_k == 1 for c in big.values() if c[0] == "skinny")
    assert cuda_q6k.default_plan(4096)[8][1].split_k > 1


def tuner_check() -> None:
    """``cuda_q6k_tune.prepare`` with a timer that prices each kernel (the tiles tie-break),
    then with a candidate that is wrong and one that fails to build."""
    os.environ["PENSIEVE_TUNE_FULL"] = "1"  # the whole race (the lean one: test_cuda_q6k_rows)

    from pensieve.backends import cuda_q6k_tune as tune

    warnings = kept_warnings(tune.log)
    # fewer gemv and gemm tiles (the interpreter is slow on them; their choice is the same code)
    tune.GEMV_CANDIDATES = (cuda_q6k.Tiles(1, 16, 8, 4, 2), cuda_q6k.GEMV)
    tune.SPLIT_CANDIDATES = {}  # the split-K GEMV's place in the race: test_cuda_q6k_split.py
    tune.ROWS_CANDIDATES = ()  # rows' place in the race: test_cuda_q6k_rows.py
    os.environ["PENSIEVE_Q6K_SKINNY2"] = "0"  # skinny2's race: test_cuda_q6k_skinny2.py
    # three 16-row skinny tiles (each is raced at 2, 4, 8 and 16 rows)
    tune.SKINNY_CANDIDATES = {16: (cuda_q6k.SKINNY16, Skinny(16, 32, 4, 8, 4, 2),
                                   Skinny(16, 64, 2, 8, 4, 3)),
                              32: tune.SKINNY_CANDIDATES[32]}
    tune.GEMM_CANDIDATES = {16: (cuda_q6k.GEMM16,), 32: (cuda_q6k.GEMM16,),
                            256: (cuda_q6k.GEMM_SMALL,), 2048: (cuda_q6k.GEMM_SMALL,)}
    price = {"gemv": 2.0, "skinny": 1.0, "gemm": 5.0, "dequant": 3.0}

    def timer(run, sample, reps):
        run(sample[0])
        name, t = run.choice
        return price[name] + 0.01 * t.block_n / 16 + 0.001 * getattr(t, "split_k", 0)

    k = 512
    rows = {1: 1, 2: 2, 4: 3, 8: 4, 16: 5, 32: 17, 256: 18, 2048: 19}
    model = torch.nn.Sequential(layer_of(45, k, 1), layer_of(45, k, 3))
    tune.prepare(model, torch.float32, timer=timer, rows=rows)
    plan = model[0].plan
    assert plan is model[1].plan  # one plan a weight shape
    assert plan[1] == ("gemv", cuda_q6k.GEMV)  # block_n 8: the cheaper gemv
    sk16 = min(tune.SKINNY_CANDIDATES[16], key=lambda t: (t.block_n, t.split_k))
    assert plan[2] == plan[4] == plan[8] == plan[16] == ("skinny", sk16)
    sk32 = min(tune.SKINNY_CANDIDATES[32], key=lambda t: (t.block_n, t.split_k))
    assert plan[32] == ("skinny", sk32)
    dq = ("dequant", min(tune.DEQUANT_CANDIDATES, key=lambda t: t.block_n))
    assert plan[256] == plan[2048] == dq  # cheaper than the gemm's tiles
    assert not warnings
    weight = model[0].dequantize().double()
    for r in (1, 2, 7, 20, 33):  # the planned routes give the product
        x = torch.randn(r, k)
        y = cuda_q6k.q6k_linear(x, model[0].weight_buffers(), plan)
        assert rel(y, x.double() @ weight.T) < 1e-5, r

    real = cuda_q6k.skinny

    def broken(x, w, y, t=cuda_q6k.SKINNY16):
        if t == sk16:
            return y.zero_()  # the one that would win: wrong, left out
        if t.block_m == 32:
            raise RuntimeError("out of resources")  # a Triton that cannot build it
        return real(x, w, y, t)

    cuda_q6k.skinny = broken
    try:
        tune.prepare(model, torch.float32, timer=timer, rows=rows)
    finally:
        cuda_q6k.skinny = real
    plan = model[0].plan
    assert plan[8][0] == "skinny" and plan[8][1] != sk16
    assert plan[32] == dq  # no 32-row skinny: dequant beats the gemm
    assert any("relative error" in m for m in warnings)
    assert any("out of resources" in m for m in warnings)

    def nothing(*args, **kwargs):
        raise RuntimeError("no kernels here")

    saved = cuda_q6k.skinny, cuda_q6k.gemm
    cuda_q6k.skinny = cuda_q6k.gemm = nothing
    try:
        tune.prepare(model, torch.float32, timer=timer, rows=rows)
    finally:
        cuda_q6k.skinny, cuda_q6k.gemm = saved
    plan = model[0].plan
    assert plan[8] == ("torch", None)  # nothing right at 8 rows: the reference
    assert plan[1][0] == "gemv" and plan[256] == dq
    assert any("no kernel builds" in m for m in warnings)


def test_skinny_and_dequant_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k_skinny import kernels_check as c; "
                              "c(); print('ok')")


def test_tuner_choice_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k_skinny import tuner_check as c; "
                              "c(); print('ok')")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_and_dequant_against_float64(dtype):
    """Every skinny and dequant candidate at Qwen3-8B's v / down shapes and a head-sized N."""
    from pensieve.backends import cuda_q6k_tune as tune

    for n, k in ((1024, 4096), (4096, 12288), (151936 // 4, 4096)):
        layer = CudaQ6KLinear(groups(Q.Q6_K, n, k, seed=n)).cuda()
        w = layer.weight_buffers()
        x = torch.randn(64, k, generator=torch.Generator().manual_seed(n)).to(dtype).cuda()
        ref = x.double() @ layer.dequantize().double().T
        for bm, cands in tune.SKINNY_CANDIDATES.items():
            for t in cands:
                if not cuda_q6k.skinny_fits(t, n):
                    continue
                for rows in (1, 2, 3, 8, bm):
                    y = cuda_q6k.skinny(x[:rows], w, torch.empty(rows, n, device="cuda",
                                                                  dtype=dtype), t)
                    r = rel(y, ref[:rows].cpu())
                    assert r < 1e-2, (n, k, t, rows, r)
        for t in tune.DEQUANT_CANDIDATES:
            dense = cuda_q6k.dequant_weight(w, dtype, t)
            assert torch.equal(dense, layer.dequantize().to(dtype))
            for chunk in (cuda_q6k.DEQUANT_CHUNK, k * 1000):
                y = cuda_q6k.dequant_linear(x, w, t, chunk)
                assert rel(y, ref.cpu()) < 1e-2, (n, k, t, chunk)


@needs_cuda
@pytest.mark.parametrize("rows", [2, 8, 32])
def test_split_k_skinny_in_a_cuda_graph(rows):
    layer = CudaQ6KLinear(groups(Q.Q6_K, 256, 4096, 5)).to(device="cuda", dtype=torch.bfloat16)
    t = Skinny(16 if rows <= 16 else 32, 32, 4, 8, 4, 3)
    layer.plan = {b: ("skinny", t) for b in cuda_q6k.BUCKETS}
    cuda_q6k.skinny_workspace(torch.device("cuda"), 256)
    assert_replays_as_eager(layer, torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16))


@needs_cuda
def test_tuner_on_the_gpu():
    from pensieve.backends import cuda_q6k_tune as tune

    model = torch.nn.Sequential(CudaQ6KLinear(groups(Q.Q6_K, 1024, 4096, 9)))
    model = model.to(device="cuda", dtype=torch.bfloat16)
    tune.prepare(model, torch.bfloat16, reps=3)
    plan = model[0].plan
    assert set(plan) == set(cuda_q6k.BUCKETS) and all(c[0] != "torch" for c in plan.values())
    x = torch.randn(40, 4096, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ model[0].dequantize().double().T
    for r in (1, 2, 5, 16, 32, 40):
        assert rel(model(x[:r]), ref[:r].cpu()) < 1e-2, r
