"""Q6_K's split-K FMA GEMV for 1-16 rows (``backends/cuda_q6k_split.py``) and its place in
``cuda_q6k_tune``'s race.

On CPU: the split each tile takes at the real shapes (a divisor of the steps, none for a
head-sized N); in Triton's interpreter (a fresh process) every tuner candidate against the
float64 product at N = 13 and K = 512, and edge tiles at N = 45, K = 768 (24 groups: splits of 3
and 6 steps, BLOCK_G cut to 8) — no N a multiple of a tile — 1 row up to the tile's rows,
float32 and float16 x; the
tuner's choice with a timer the test controls (split where it is cheapest, a wrong split left
out); every candidate compiled for sm_90 in bfloat16 with the launch's 16-divisible arguments,
with vector code loads and no register spill. With a GPU: bf16 against float64 at Qwen3-8B's
Q6_K shapes, and the split-K reduction in a CUDA graph (the counters reset between replays).
"""

from __future__ import annotations

import os

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends import cuda_q6k
from pensieve.backends.cuda_q6k import CudaQ6KLinear
from pensieve.backends.cuda_q6k_split import SPLIT_MAX_N, Split, fits, split_of
from tests.helpers.cuda_graph_check import assert_replays_as_eager
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.helpers.tune_race import few_q6k_tiles, kept_warnings
from tests.unit.test_cuda_int8 import groups, rel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def candidates() -> list[Split]:
    from pensieve.backends.cuda_q6k_tune import SPLIT_CANDIDATES

    return [t for ts in SPLIT_CANDIDATES.values() for t in ts]


def layer_of(n: int, k: int, seed: int) -> CudaQ6KLinear:
    return CudaQ6KLinear([groups(Q.Q6_K, n // 2, k, seed=seed),
                          groups(Q.Q6_K, n - n // 2, k, seed=seed + 1)])


def test_split_is_a_divisor_of_the_steps_and_none_for_a_head():
    for t in candidates():
        for n, k in ((1024, 4096), (4096, 12288), (151936, 4096), (45, 768)):
            bg, s = split_of(t, n, k // 32)
            assert (k // 32) % (bg * s) == 0 and 1 <= s <= t.split_k, (t, n, k)
            assert s == 1 or n < SPLIT_MAX_N
    assert split_of(Split(1, 8, 8, 8, 2), 4096, 384) == (8, 8)  # 48 steps
    assert split_of(Split(1, 8, 8, 8, 2), 45, 24) == (8, 3)  # 3 steps: all three
    assert split_of(Split(1, 8, 16, 4, 2), 45, 24) == (8, 3)  # BLOCK_G cut to 8, split to 3
    assert split_of(Split(1, 8, 8, 8, 2), 151936, 128) == (8, 1)
    assert fits(Split(4, 8, 4, 4, 2), 3) and not fits(Split(4, 8, 4, 4, 2), 5)
    assert not fits(Split(1, 2, 8, 4, 2), 1)  # fewer outputs a tile than the counters cover


def kernels_check() -> None:
    """Every candidate (and a few edge tiles) under the interpreter."""
    from pensieve.backends.cuda_q6k_split import gemv_split

    edge = [Split(2, 4, 16, 8, 2),  # BLOCK_G 16 cut to 8: 3 steps, split 3
            Split(8, 16, 2, 8, 4),  # 12 steps of 2 groups: split 6
            Split(4, 4, 16, 8, 2, words=True), Split(8, 16, 2, 8, 4, words=True)]
    for n, k, tiles in ((13, 512, candidates()), (45, 768, edge)):
        layer = layer_of(n, k, seed=k)
        w = layer.weight_buffers()
        weight = layer.dequantize().double()
        for i, t in enumerate(tiles):
            cases = [(t.block_m, torch.float32, 1e-5)]
            if i % 3 == 0:
                cases += [(1, torch.float32, 1e-5), (max(1, t.block_m - 1), torch.float16, 2e-3)]
            for rows, dtype, tol in cases:
                x = torch.randn(rows, k).to(dtype)
                y = gemv_split(x, w, torch.empty(rows, n, dtype=dtype), t)
                r = rel(y, x.double() @ weight.T)
                assert r < tol, (n, k, t, rows, dtype, r)
        with pytest.raises(ValueError):  # more rows than the tile
            gemv_split(torch.randn(3, k), w, torch.empty(3, n), Split(2, 8, 8, 4, 2))


def tuner_check() -> None:
    """The split GEMV in the tuner's race: where priced cheapest it wins its buckets (its tiles
    of that bucket's rows), a wrong one is left out with a warning, and the planned routes give
    the product."""
    os.environ["PENSIEVE_TUNE_FULL"] = "1"  # the whole race (the lean one: test_cuda_q6k_rows)

    from pensieve.backends import cuda_q6k_split
    from pensieve.backends import cuda_q6k_tune as tune

    warnings = kept_warnings(tune.log)
    # fewer tiles (the interpreter is slow; the race is the same code)
    few_q6k_tiles(tune)
    tune.ROWS_CANDIDATES = ()  # rows' place in the race: test_cuda_q6k_rows.py
    os.environ["PENSIEVE_Q6K_SKINNY2"] = "0"  # skinny2's race: test_cuda_q6k_skinny2.py
    tune.SPLIT_CANDIDATES = {b: (Split(b, 8, 8, 4, 2), Split(b, 16, 4, 2, 4))
                             for b in (1, 2, 4, 8, 16)}
    price = {"gemv": 2.0, "split": 1.0, "skinny": 1.5, "gemm": 5.0, "dequant": 3.0}

    def timer(run, sample, reps):
        run(sample[0])
        name, t = run.choice
        return price[name] + 0.01 * t.block_n / 16

    k = 512
    rows = {1: 1, 2: 2, 4: 3, 8: 5, 16: 9, 32: 17, 256: 18, 2048: 19}
    model = torch.nn.Sequential(layer_of(13, k, 1))
    tune.prepare(model, torch.float32, timer=timer, rows=rows)
    plan = model[0].plan
    for b in (1, 2, 4, 8, 16):
        assert plan[b] == ("split", Split(b, 8, 8, 4, 2)), (b, plan[b])
    assert plan[32][0] == "skinny" and not warnings
    assert tune.describe(plan[4]) == "split 4x8x8/4"
    assert tune.describe(("split", Split(1, 8, 8, 4, 2, words=True))) == "split 1x8x8/4 w"
    weight = model[0].dequantize().double()
    for r in (1, 2, 3, 7, 16):  # the planned routes give the product
        x = torch.randn(r, k)
        assert rel(cuda_q6k.q6k_linear(x, model[0].weight_buffers(), plan),
                   x.double() @ weight.T) < 1e-5, r

    real = cuda_q6k_split.gemv_split

    def broken(x, w, y, t):
        if t.block_n == 8:
            return y.zero_()  # the one that would win: wrong, left out
        return real(x, w, y, t)

    cuda_q6k_split.gemv_split = broken
    try:
        tune.prepare(model, torch.float32, timer=timer, rows=rows)
    finally:
        cuda_q6k_split.gemv_split = real
    plan = model[0].plan
    for b in (1, 2, 4, 8, 16):
        assert plan[b] == ("split", Split(b, 16, 4, 2, 4)), (b, plan[b])
    assert any("relative error" in m and "split" in m for m in warnings)


@pytest.mark.slow
def test_split_gemv_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k_split import kernels_check as c; "
                              "c(); print('ok')")


@pytest.mark.slow
def test_tuner_races_the_split_gemv_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k_split import tuner_check as c; "
                              "c(); print('ok')")


def compile_sm90(fn, types: dict[str, str], consts: dict, num_warps: int, num_stages: int,
                 divisible: set[str]):
    """``fn`` compiled for sm_90 as a launch with ``divisible`` arguments 16-divisible (pointers
    16-byte aligned) would be: (the compiled kernel, registers, local-memory bytes a thread)."""
    import inspect
    import os
    import re
    import subprocess
    import tempfile

    if torch.cuda.is_available():
        pytest.skip("the compiled kernels are checked on this GPU")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    names = list(inspect.signature(fn.fn).parameters)
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in consts:
            sig[name], cx[(i,)] = "constexpr", consts[name]
        else:
            sig[name] = types[name]
            if name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    c = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return c, None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    return c, int(found[1]) if found else None, int(found[2]) if found else None


@pytest.mark.slow
def test_candidates_compile_for_the_h100_without_spills():
    """Every split candidate and every 16-row skinny candidate, bf16, for sm_90: no local
    memory (a spill), and the split GEMV's code bytes in vector loads."""
    from pensieve.backends import cuda_q6k_kernels, cuda_q6k_split_kernels
    from pensieve.backends.cuda_q6k_tune import SKINNY_CANDIDATES

    types = {"X": "*bf16", "LO": "*u8", "HI": "*u8", "SC": "*i8", "D": "*i16", "Y": "*bf16",
             "WS": "*fp32", "CNT": "*i32", "M": "i32", "N": "i32", "GROUPS": "i32",
             "G_PER": "i32", "stride_x": "i32", "stride_y": "i32"}
    divisible = set(types) - {"M"}
    words = {**types, "LO": "*i32", "HI": "*i32"}
    assert any(t.words for t in candidates())
    for t in candidates():
        consts = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_G": t.block_g,
                  "SPLIT_K": t.split_k}
        fn = cuda_q6k_split_kernels.gemv_split_words if t.words else \
            cuda_q6k_split_kernels.gemv_split
        c, regs, local = compile_sm90(fn, words if t.words else types, consts, t.num_warps,
                                      t.num_stages, divisible)
        assert local in (0, None), (t, regs, local)
        ptx = c.asm["ptx"]
        assert "ld.global.v2.b32" in ptx or "ld.global.v4.b32" in ptx, t
    for t in SKINNY_CANDIDATES[16]:
        consts = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_G": t.block_g,
                  "SPLIT_K": t.split_k, "EVEN": True}
        _, regs, local = compile_sm90(cuda_q6k_kernels.skinny, types, consts, t.num_warps,
                                      t.num_stages, divisible)
        assert local in (0, None), (t, regs, local)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_gemv_against_float64(dtype):
    """Every split candidate (float16: each bucket's first) at Qwen3-8B's v / down shapes and a
    head-sized N (no split)."""
    from pensieve.backends.cuda_q6k_split import gemv_split
    from pensieve.backends.cuda_q6k_tune import SPLIT_CANDIDATES

    tiles = candidates() if dtype == torch.bfloat16 else [ts[0] for ts in
                                                          SPLIT_CANDIDATES.values()]

    for n, k in ((1024, 4096), (4096, 12288), (151936 // 4, 4096)):
        layer = CudaQ6KLinear(groups(Q.Q6_K, n, k, seed=n)).cuda()
        w = layer.weight_buffers()
        x = torch.randn(16, k, generator=torch.Generator().manual_seed(n)).to(dtype).cuda()
        ref = x.double() @ layer.dequantize().double().T
        for t in tiles:
            for rows in sorted({1, max(1, t.block_m - 1), t.block_m}):
                y = gemv_split(x[:rows], w, torch.empty(rows, n, device="cuda", dtype=dtype), t)
                r = rel(y, ref[:rows].cpu())
                assert r < 1e-2, (n, k, t, rows, r)
                again = gemv_split(x[:rows], w, torch.empty_like(y), t)
                assert torch.equal(y, again), t  # the fixed-order reduction: deterministic


@needs_cuda
@pytest.mark.parametrize("rows", [1, 2, 8, 16])
def test_split_gemv_in_a_cuda_graph(rows):
    import dataclasses

    from pensieve.backends.cuda_q6k_split import split_workspace
    from pensieve.backends.cuda_q6k_tune import SPLIT_CANDIDATES

    layer = CudaQ6KLinear(groups(Q.Q6_K, 256, 4096, 5)).to(device="cuda", dtype=torch.bfloat16)
    # the bucket's first tile with K over 8 programs
    t = dataclasses.replace(SPLIT_CANDIDATES[cuda_q6k.bucket(rows)][0], split_k=8)
    layer.plan = {b: ("split", t) for b in cuda_q6k.BUCKETS}
    split_workspace(torch.device("cuda"), 256)
    assert_replays_as_eager(layer, torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16))


def test_no_rows_launch_nothing():
    """A step where no chunk completes hands the head 0 rows (a long prompt's first chunk):
    every route answers [0, N] without a launch — the split kernel raised here on the H100
    (2026-12-07: the Qwen3-8B server died in its start-up warm-up)."""
    from pensieve.backends.cuda_int4 import CudaInt4Linear

    layer = layer_of(48, 512, 3)
    x = torch.empty(0, 512)
    for tile in candidates()[:2]:
        assert cuda_q6k.launch(("split", tile), x, layer.weight_buffers()).shape == (0, 48)
    assert layer(x).shape == (0, 48)
    assert CudaInt4Linear([groups(Q.Q4_K, 32, 512, 1)])(torch.empty(2, 0, 512)).shape == (2, 0, 32)
