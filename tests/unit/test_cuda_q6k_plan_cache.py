"""Q6_K kernel plans kept between starts (``backends/cuda_q6k_plan_cache.py``): the first start's
race is stored, a later start reads it back and checks it on the kernels instead of timing, a
plan that no longer checks out is raced afresh. The kernels run in the Triton interpreter here
(the GPU runs them compiled at every real start)."""

from __future__ import annotations

import os

import pytest
import torch

from pensieve.backends.cuda_q6k import GEMV, Tiles
from pensieve.backends.cuda_q6k_plan_cache import from_json, to_json
from pensieve.backends.cuda_q6k_rows import Rows
from pensieve.backends.cuda_q6k_split import Split
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.helpers.tune_race import few_q6k_tiles, kept_warnings


def test_plans_round_trip_through_json():
    plan = {1: ("split", Split(1, 8, 8, 4, 2, words=True)), 2: ("gemv", GEMV),
            4: ("rows", Rows(16, 64, 2, 8, 4, 1, 2)), 256: ("dequant", Tiles(1, 8, 16, 4, 1)),
            2048: ("torch", None)}
    assert from_json(to_json(plan)) == plan
    with pytest.raises(KeyError):
        from_json({"1": ["nonsense", {}]})


def cache_check(root: str) -> None:
    import logging

    from pensieve.backends import cuda_q6k
    from pensieve.backends import cuda_q6k_tune as tune
    from pensieve.backends.tune_cache import TuneCache
    from tests.unit.test_cuda_q6k_rows import layer_of

    import pensieve.backends.cuda_q6k_plan_cache as plan_cache

    plan_cache._key = lambda m, dtype: f"{m.out_features}x{m.in_features}"  # no GPU to name
    few_q6k_tiles(tune)  # the interpreter is slow
    tune.SPLIT_CANDIDATES = {b: (tune.SPLIT_CANDIDATES[b][0],) for b in (1, 2, 4, 8, 16)}
    tune.ROWS_CANDIDATES = (Rows(16, 16, 2, 4, 4, 1, 1),)
    os.environ["PENSIEVE_Q6K_SKINNY2"] = "0"  # skinny2's race: test_cuda_q6k_skinny2.py
    price = {"gemv": 2.0, "split": 1.0, "rows": 1.5, "skinny": 1.8, "gemm": 5.0, "dequant": 3.0}
    timed: list[str] = []

    def timer(run, sample, reps):  # noqa: ANN001, ANN202
        run(sample[0])
        timed.append(run.choice[0])
        return price[run.choice[0]]

    rows = {1: 1, 2: 2, 4: 3, 8: 5, 16: 16, 32: 17, 256: 18, 2048: 19}
    cache = TuneCache("q6k", ("cuda_q6k.py",), root=__import__("pathlib").Path(root))
    first = torch.nn.Sequential(layer_of(45, 512, 1))
    tune.prepare(first, torch.float32, timer=timer, rows=rows, cache=cache)
    assert timed and cache.path.exists()
    timed.clear()
    again = torch.nn.Sequential(layer_of(45, 512, 1))  # a later start: read back, checked
    tune.prepare(again, torch.float32, timer=timer, rows=rows, cache=TuneCache(
        "q6k", ("cuda_q6k.py",), root=cache.path.parent))
    assert not timed and again[0].plan == first[0].plan
    # a kept plan whose kernel no longer gives the product: raced afresh, with a warning
    warnings = kept_warnings(logging.getLogger("pensieve.backends.cuda_q6k_plan_cache"))
    real = cuda_q6k.launch
    bucket_1 = first[0].plan[1]
    cuda_q6k.launch = lambda c, x, w: (real(c, x, w) * 0 if c == bucket_1 else real(c, x, w))
    plan_cache.launch = cuda_q6k.launch
    try:
        tune.prepare(torch.nn.Sequential(layer_of(45, 512, 1)), torch.float32, timer=timer,
                     rows=rows, cache=TuneCache("q6k", ("cuda_q6k.py",), root=cache.path.parent))
    finally:
        cuda_q6k.launch = plan_cache.launch = real
    assert timed and any("cached Q6_K plan" in m for m in warnings)


@pytest.mark.slow
def test_a_later_start_reads_the_plan_back_in_the_triton_interpreter(tmp_path):
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k_plan_cache import cache_check as c; "
                              f"c({str(tmp_path)!r}); print('ok')")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_later_start_reads_the_plan_back_on_the_gpu(tmp_path):
    """An attn_v-shaped Q6_K weight in bfloat16: the first start races and stores, the second
    gets the same plan without timing anything."""
    from pensieve.backends import cuda_q6k_tune as tune
    from pensieve.backends.tune_cache import TuneCache
    from tests.unit.test_cuda_q6k_rows import layer_of

    def model():  # noqa: ANN202
        return torch.nn.Sequential(layer_of(1024, 4096, 1)).cuda()

    first = model()
    tune.prepare(first, torch.bfloat16, reps=3, cache=TuneCache("q6k", ("x",), root=tmp_path))

    def no_timing(run, sample, reps):  # noqa: ANN001, ANN202
        raise AssertionError("a kept plan is checked, not timed")

    again = model()
    tune.prepare(again, torch.bfloat16, timer=no_timing,
                 cache=TuneCache("q6k", ("x",), root=tmp_path))
    assert again[0].plan == first[0].plan and len(first[0].plan) == 8
