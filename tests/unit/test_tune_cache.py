"""Kernel plans kept between starts (``tune_cache``, ``cuda_int4_plan_cache``): a second start
reads each shape's plan back instead of timing every candidate; an unreadable file, a changed
kernel source or a plan whose kernels fail the check is timed afresh. On the CPU the timing and
the check are stand-ins (they need a GPU); the CUDA test runs the real ones."""

from __future__ import annotations

import pytest
import torch

from pensieve.backends import cuda_int4_plan_cache as plan_cache
from pensieve.backends import cuda_int4_tune
from pensieve.backends.cuda_int4 import (
    GEMM_CANDIDATES, SKINNY_CANDIDATES, CudaInt4Linear, Plan, Words, default_plan,
)
from pensieve.backends.tune_cache import TuneCache
from pensieve.models.quant_linear import Int4Groups


def layer(n: int, k: int, seed: int = 0) -> CudaInt4Linear:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // 32, generator=g) * 0.01
    return CudaInt4Linear([Int4Groups(codes, scales, -scales * 7.5, 32)])


def test_plans_round_trip_through_json():
    plan = default_plan(4096)
    plan.words, plan.skinny = Words(4, 128, 4), SKINNY_CANDIDATES[2]
    plan.route[2048] = "dequant"
    plan.gemm[256] = GEMM_CANDIDATES[256][1]
    back = plan_cache.from_json(plan_cache.to_json(plan))
    assert back == plan and isinstance(back, Plan)
    none = Plan({1: "gemv"}, Words(8, 32, 1), None, {})
    assert plan_cache.from_json(plan_cache.to_json(none)) == none


def test_a_cache_file_persists_and_a_bad_one_is_ignored(tmp_path):
    a = TuneCache("int4", ("cuda_int4.py",), root=tmp_path)
    assert a.get("k") is None
    a.put("k", {"x": 1})
    assert TuneCache("int4", ("cuda_int4.py",), root=tmp_path).get("k") == {"x": 1}
    # another kernel source: another file
    assert TuneCache("int4", ("cuda_int8.py",), root=tmp_path).get("k") is None
    a.path.write_text("{not json")
    b = TuneCache("int4", ("cuda_int4.py",), root=tmp_path)
    assert b.get("k") is None
    b.put("k", {"x": 2})  # rewritten
    assert TuneCache("int4", ("cuda_int4.py",), root=tmp_path).get("k") == {"x": 2}


def test_plans_of_the_whole_race_are_kept_apart(tmp_path, monkeypatch):
    """PENSIEVE_TUNE_FULL=1 races every candidate: its plans go to a file of their own, so
    a lean start never reads them as its own, nor the reverse."""
    monkeypatch.delenv("PENSIEVE_TUNE_FULL", raising=False)
    TuneCache("int4", ("cuda_int4.py",), root=tmp_path).put("k", {"lean": 1})
    monkeypatch.setenv("PENSIEVE_TUNE_FULL", "1")
    full = TuneCache("int4", ("cuda_int4.py",), root=tmp_path)
    assert full.get("k") is None and full.path.name.endswith("-full.json")
    full.put("k", {"full": 1})
    monkeypatch.delenv("PENSIEVE_TUNE_FULL")
    assert TuneCache("int4", ("cuda_int4.py",), root=tmp_path).get("k") == {"lean": 1}


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """A cache in tmp_path, a key without a GPU, a timing that counts its calls and a check
    whose answer the test sets."""
    cache = TuneCache("int4", ("cuda_int4.py",), root=tmp_path)
    monkeypatch.setattr(plan_cache, "PLANS", cache)
    monkeypatch.setattr(plan_cache, "_key", lambda m, dtype: f"{m.out_features}x{m.in_features}")
    timed: list[tuple[int, int]] = []

    def plan_shape(sample, dtype, reps):
        timed.append((sample[0].out_features, sample[0].in_features))
        plan = default_plan(sample[0].in_features)
        plan.route[1] = "gemv"  # what "timing" chose
        return plan, "timed"

    monkeypatch.setattr(cuda_int4_tune, "plan_shape", plan_shape)
    ok = {"value": True}
    monkeypatch.setattr(plan_cache, "works", lambda plan, m, dtype: ok["value"])
    return cache, timed, ok


def test_a_second_start_reads_the_plans_back(stand_ins):
    cache, timed, ok = stand_ins
    layers = [layer(64, 256, 1), layer(64, 256, 2), layer(128, 256, 3)]
    cuda_int4_tune._plan_all(layers, torch.bfloat16, reps=1)
    assert timed == [(64, 256), (128, 256)]  # each shape timed once
    assert all(m.plan.route[1] == "gemv" for m in layers)
    fresh = [layer(64, 256, 4), layer(128, 256, 5)]
    note = cuda_int4_tune._plan_all(fresh, torch.bfloat16, reps=1)
    assert timed == [(64, 256), (128, 256)] and "earlier start" in note  # nothing timed
    assert all(m.plan.route[1] == "gemv" for m in fresh)
    ok["value"] = False  # the cached kernels no longer check out: timed afresh
    cuda_int4_tune._plan_all([layer(64, 256, 6)], torch.bfloat16, reps=1)
    assert timed[-1] == (64, 256) and len(timed) == 3


def test_plans_with_the_opt_in_copies_are_not_kept(stand_ins):
    cache, timed, _ = stand_ins
    m = layer(64, 256)
    m.dense = torch.zeros(64, 256)
    cuda_int4_tune._plan_all([m], torch.bfloat16, reps=1)
    assert cache.get("64x256") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cached_plan_is_checked_on_the_gpu(tmp_path, monkeypatch):
    cache = TuneCache("int4", ("cuda_int4.py",), root=tmp_path)
    monkeypatch.setattr(plan_cache, "PLANS", cache)
    m = layer(256, 512).cuda()
    cuda_int4_tune._plan_all([m], torch.bfloat16, reps=3)
    again = layer(256, 512, 1).cuda()
    assert plan_cache.load(again, torch.bfloat16) == m.plan
    broken = Plan(dict(m.plan.route), m.plan.words, m.plan.skinny,
                  {b: GEMM_CANDIDATES[b][0] for b in GEMM_CANDIDATES})
    broken.route[1] = "no such kernel"  # falls to gemm: still right
    assert plan_cache.works(broken, again, torch.bfloat16)
