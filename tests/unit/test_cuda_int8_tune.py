"""The int8-code layers' per-bucket routes (``backends/cuda_int8_tune.py``): the race picks the
priced-cheapest right route per row bucket, a wrong tile is left out, the planned routes give
the product, plans survive a restart. Kernels in the Triton interpreter here (compiled on a GPU
at every real start; ``test_cuda_int8.py`` checks them there)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends.cuda_int8 import GEMV, GEMV2, SKINNY, Tiles, bucket
from pensieve.backends.cuda_int8_tune import from_json, to_json
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.helpers.tune_race import kept_warnings


def test_buckets_and_plans_round_trip():
    assert [bucket(m) for m in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    plan = {1: ("gemv", GEMV), 2: ("gemv", Tiles(1, 8, 256, 4, 3)), 4: ("skinny", SKINNY),
            8: ("skinny", SKINNY), 16: ("skinny", Tiles(16, 64, 64, 4, 4))}
    assert from_json(to_json(plan)) == plan
    plan[2] = ("gemv2", GEMV2)  # the third route's name round-trips too
    assert from_json(to_json(plan)) == plan
    with pytest.raises(TypeError):
        from_json({"1": ["gemv", {"block_n": 4}]})


def tune_check(root: str) -> None:
    from pathlib import Path

    from pensieve.backends import cuda_int8, cuda_int8_tune as tune
    from pensieve.backends.cuda_int8 import CudaInt8Linear, int8_linear
    from pensieve.backends.tune_cache import TuneCache
    from tests.unit.test_cuda_int8 import groups

    tune._key = lambda m, dtype: f"{m.out_features}x{m.in_features}"  # no GPU to name
    tune.GEMV_CANDIDATES = (GEMV, Tiles(1, 8, 256, 4, 3))  # few tiles: the interpreter is slow
    tune.SKINNY_CANDIDATES = (SKINNY, Tiles(16, 64, 64, 4, 4))
    tune.GEMV2_CANDIDATES = (GEMV2,)
    warnings = kept_warnings(tune.log)
    timed: list[tuple[str, Tiles, int]] = []

    def timer(run, sample, reps):  # noqa: ANN001, ANN202 - gemv costs a weight read a row
        run(sample[0])
        route, t = run.choice
        rows = run.rows
        timed.append((route, t, rows))
        price = {"gemv": 1.0 * rows, "gemv2": 1.0 * rows + 0.5, "skinny": 3.0}[route]
        return price + 0.01 * t.block_n / 16

    layers = [CudaInt8Linear(groups(Q.Q8_0, 45, 512, seed=s)) for s in (1, 2)]
    mixed = CudaInt8Linear([groups(Q.Q8_0, 16, 512, seed=3), groups(Q.Q5_1, 29, 512, seed=4)])
    model = torch.nn.Sequential(*layers, mixed)
    cache = TuneCache("int8", ("cuda_int8.py",), root=Path(root))
    tune.prepare(model, torch.float32, timer=timer, cache=cache)
    plan = layers[0].plan
    assert plan is layers[1].plan and mixed.plan is not None and mixed.plan is not plan
    assert [plan[b][0] for b in (1, 2, 4, 8, 16)] == ["gemv", "gemv", "skinny", "skinny", "skinny"]
    assert plan[1][1] == GEMV and plan[8][1] == SKINNY  # narrower tiles priced cheaper
    # gemv2 raced (built, right) at 1 row, then in every bucket's race, priced slower here
    assert {rows for r, t, rows in timed if r == "gemv2"} == {1, 2, 4, 8, 16}
    assert not warnings
    for m in (model[0], mixed):
        weight = m.dequantize().double()
        for r in (1, 2, 3, 7, 16):
            x = torch.randn(r, 512)
            y = int8_linear(x, m.blocks(), m.out_features, m.plan)
            ref = x.double() @ weight.T
            assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5, r
    # a later start: read back and checked, nothing timed
    timed.clear()
    again = torch.nn.Sequential(CudaInt8Linear(groups(Q.Q8_0, 45, 512, seed=1)))
    tune.prepare(again, torch.float32, timer=timer, cache=TuneCache(
        "int8", ("cuda_int8.py",), root=Path(root)))
    assert not timed and again[0].plan == plan
    # a tile that gives a wrong product is left out of a fresh race with a warning
    real = cuda_int8.gemv

    def broken(x, b, y, t=GEMV):  # noqa: ANN001, ANN202
        out = real(x, b, y, t)
        return out.zero_() if t == GEMV else out

    cuda_int8.gemv = broken
    try:
        fresh = torch.nn.Sequential(CudaInt8Linear(groups(Q.Q8_0, 45, 512, seed=5)))
        tune.prepare(fresh, torch.float32, timer=timer)
    finally:
        cuda_int8.gemv = real
    assert fresh[0].plan[1] == ("gemv", Tiles(1, 8, 256, 4, 3))
    assert any("relative error" in w and "gemv" in w for w in warnings)


@pytest.mark.slow
def test_the_race_in_the_triton_interpreter(tmp_path):
    run_in_triton_interpreter("from tests.unit.test_cuda_int8_tune import tune_check as c; "
                              f"c({str(tmp_path)!r}); print('ok')")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_race_on_the_gpu(tmp_path):
    """gpt-oss-like Q8_0 shapes on the GPU in bfloat16: every bucket planned, the planned routes
    give the dequantised product, and a second start reads the plan back (timing nothing)."""
    from pensieve.backends import cuda_int8_tune as tune
    from pensieve.backends.cuda_int8 import CudaInt8Linear, int8_linear
    from pensieve.backends.tune_cache import TuneCache
    from tests.unit.test_cuda_int8 import groups

    model = torch.nn.Sequential(CudaInt8Linear(groups(Q.Q8_0, 5120, 2880, seed=1)),
                                CudaInt8Linear(groups(Q.Q8_0, 5120, 2880, seed=2))).cuda()
    tune.prepare(model, torch.bfloat16, reps=3, cache=TuneCache("int8", ("x",), root=tmp_path))
    plan = model[0].plan
    assert plan is not None and set(plan) == {1, 2, 4, 8, 16}
    weight = model[0].dequantize()
    for r in (1, 2, 3, 8, 13):
        x = torch.randn(r, 2880, device="cuda", dtype=torch.bfloat16)
        y = int8_linear(x, model[0].blocks(), 5120, plan)
        ref = x.float() @ weight.T
        assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2, r
    again = torch.nn.Sequential(CudaInt8Linear(groups(Q.Q8_0, 5120, 2880, seed=1))).cuda()

    def no_timing(run, sample, reps):  # noqa: ANN001, ANN202
        raise AssertionError("a kept plan is checked, not timed")

    tune.prepare(again, torch.bfloat16, timer=no_timing,
                 cache=TuneCache("int8", ("x",), root=tmp_path))
    assert again[0].plan == plan
