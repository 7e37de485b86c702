"""The MoE route per decode bucket, chosen at start (``backends/cuda_moe_tune.py``).

On CPU with a fake timer and a fake launcher: each bucket takes its fastest right candidate, the
pick GEMV's tiles raced a launch at a time (gate/up and down each their fastest right tile), a
wrong or unbuildable one is left out with a warning, the expert-major GEMV is raced only at
2-16 tokens and never over packed MXFP4, layers of one shape share a plan, a layer of unknown
top-k and ``PENSIEVE_MOE_ROUTE=static`` are left to the constant rule, and a plan's bucket
lookup; a kept plan's JSON (an older one-tile gemv entry read as that tile for both launches); the reference the start checks against (each expert dequantised alone) is the whole
layer's. In Triton's interpreter (a fresh process): the real candidates all build and are right
at 1-4 tokens on int4/int8, Q4_K (q4k) and packed MXFP4 layers (biases, clamp), grouped tiles
passed through. With a GPU: layers at gpt-oss-20b's (packed MXFP4) and Qwen3-30B-A3B's (Q4_K + Q6_K)
expert shapes tuned on the real timer, then every bucket eager and replayed from a CUDA graph
with new routing against the float reference and the same bits as eager.
"""

from __future__ import annotations

import logging

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from pensieve.backends import cuda_moe, cuda_moe_tune
from pensieve.backends.cuda_moe import GEMV, GEMV_FEW, GROUPED_SMALL, GemvTiles, reference_layer
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.unit.test_cuda_int8 import rel
from tests.unit.test_cuda_moe import make_layer, routing

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_layer(experts: int = 6, top_k: int = 2, seed: int = 0) -> cuda_moe.CudaMoEExperts:
    layer = make_layer(Q.Q4_0, Q.Q8_0, 64, 32, experts, seed=seed)
    layer.top_k = top_k
    return layer


def fake_world(monkeypatch, costs, wrong=(), broken=()):  # noqa: ANN001, ANN201
    """``launch`` replaced by the reference (×1.5 for ``wrong`` routes, an error for
    ``broken``; either a set or a test of a route), ``launch_projection`` by a no-op; the
    timer returns ``costs(route, tokens)`` (a pick GEMV launch alone: ("gate_up" | "down",
    tiles)); returns the calls' log (route, tokens), the launches alone's included."""
    calls = []
    is_wrong = wrong if callable(wrong) else wrong.__contains__
    is_broken = broken if callable(broken) else broken.__contains__

    def launch(route, case):  # noqa: ANN001, ANN202
        calls.append((route, case[1].shape[0]))
        if is_broken(route):
            raise RuntimeError("out of shared memory\nmore")
        y = reference_layer(*case)
        return y * 1.5 if is_wrong(route) else y

    def launch_projection(route, case):  # noqa: ANN001, ANN202
        layer, x, w, ids = case
        assert x.shape == (ids.shape[0], layer.hidden if route[0] == "gate_up"
                           else ids.shape[1] * layer.inner)
        calls.append((route, x.shape[0]))

    def timer(run, cases, reps):  # noqa: ANN001, ANN202
        for c in cases:
            run(c)
        return costs(run.route, cases[0][1].shape[0])

    monkeypatch.setattr(cuda_moe_tune, "launch", launch)
    monkeypatch.setattr(cuda_moe_tune, "launch_projection", launch_projection)
    return timer, calls


def test_each_bucket_takes_its_fastest_right_route(monkeypatch, caplog):
    grouped_wide = ("grouped", cuda_moe_tune.GROUPED_CANDIDATES[2])
    fast_down, wrong_down = cuda_moe_tune.DOWN_CANDIDATES[:2]
    # each pick GEMV launch alone; the layer's gemv route costs its two launches'
    alone = {("gate_up", GEMV_FEW): lambda t: 5 * t, ("gate_up", GEMV): lambda t: 4 * t + 3,
             ("down", GEMV_FEW): lambda t: 5 * t, ("down", GEMV): lambda t: 5 * t + 2,
             ("down", fast_down): lambda t: 3 * t + 3,
             ("down", wrong_down): lambda t: 0.5}  # fastest, but wrong: never timed
    costs = {("experts", None): lambda t: 40 + t, ("grouped", GROUPED_SMALL): lambda t: 60 + t}

    def cost(route, tokens):  # noqa: ANN001, ANN202
        name, t = route
        if name == "gemv":
            return cost(("gate_up", t.gate_up), tokens) + cost(("down", t.down), tokens)
        if name in ("gate_up", "down"):
            return alone.get(route, lambda t: 1000.0)(tokens)  # the rest: slow here
        if name == "rows" or t is not None and t.swap:
            return 1000.0
        return costs.get(route, lambda t: 1.0)(tokens)  # two grouped tiles: fastest...

    grouped_narrow = ("grouped", cuda_moe_tune.GROUPED_CANDIDATES[1])
    # ... but one is wrong and the other does not build: never chosen
    timer, calls = fake_world(
        monkeypatch, cost, broken={grouped_wide},
        wrong=lambda r: r == grouped_narrow or (r[0] == "gemv" and r[1].down == wrong_down))
    layer = small_layer()
    model = nn.ModuleList([layer])
    with caplog.at_level(logging.INFO, logger=cuda_moe_tune.log.name):
        plans = cuda_moe_tune.prepare(model, torch.float32, reps=2, timer=timer,
                                      buckets=(1, 2, 4, 8, 16, 32), environ={})
    # gate/up: 5 vs 7, 10 vs 11, then GEMV (19 vs 20 at 4); down: 5 vs 6 at 1, then the
    # 32-row tile (9 vs 10 at 2). Whole: 1: 10 (no expert GEMV at one token); 2: 19 vs 42;
    # 4: 34 vs 44; 8: 62 vs 48 experts; 16: 56; 32: 230 / (no expert GEMV past 16) 92 grouped
    assert layer.plan == {1: ("gemv", GemvTiles(GEMV_FEW, GEMV_FEW)),
                          2: ("gemv", GemvTiles(GEMV_FEW, fast_down)),
                          4: ("gemv", GemvTiles(GEMV, fast_down)),
                          8: ("experts", None), 16: ("experts", None),
                          32: ("grouped", GROUPED_SMALL)}
    assert list(plans.values()) == [layer.plan]
    tried = {(r, t) for r, t in calls}
    assert (("experts", None), 1) not in tried and (("experts", None), 32) not in tried
    assert (("experts", None), 2) in tried
    gate_ups, downs = cuda_moe_tune.gemv_candidates(layer)
    # every tile of each launch timed alone at every bucket, but the wrong one
    for b in (1, 2, 4, 8, 16, 32):
        assert {t for (r, t), n in calls if r == "gate_up" and n == b} == set(gate_ups)
        assert {t for (r, t), n in calls if r == "down" and n == b} == set(downs) - {wrong_down}
    # each checked in the whole layer beside the constant rule's other tile
    checks = {t for (r, t), n in calls if r == "gemv" and n == 1}
    assert {GemvTiles(g, GEMV_FEW) for g in gate_ups} <= checks
    assert {GemvTiles(GEMV_FEW, d) for d in downs} <= checks
    text = caplog.text
    assert "relative error 1.5" not in text and "relative error 0.5" in text
    assert "out of shared memory" in text  # (its first line)
    assert "MoE routes per decode bucket" in text
    assert "6x32x64 top-2: 1 gemv 1x8x512w4/1x8x512w4 10 µs, 2 gemv 1x8x512w4/1x32x256w8 " \
           "19 µs (static 20), 4 gemv 1x16x256w4/1x32x256w8 34 µs (static 40)" in text
    assert "8 experts 48 µs (static 80)" in text  # 16 picks: the constant rule's few-pick GEMV
    assert "32 grouped 16x64x64w4 92 µs (static 293)" in text
    # the bucket lookup: the smallest bucket at or above; past the last, the constant rule
    assert layer.route(3) == ("gemv", GemvTiles(GEMV, fast_down))
    assert layer.route(5) == ("experts", None)
    assert layer.route(32) == ("grouped", GROUPED_SMALL) and layer.route(33) is None
    assert cuda_moe.plan_route(None, 1) is None and cuda_moe.plan_route({}, 1) is None


def test_a_plan_is_shared_by_a_shape_and_unknown_top_k_is_left_alone(monkeypatch):
    timer, calls = fake_world(monkeypatch, lambda r, t: 1.0 if r[0] == "grouped" else 2.0)
    a, b = small_layer(seed=1), small_layer(seed=2)
    other = small_layer(experts=8, seed=3)  # another shape: its own plan
    unknown = small_layer(seed=4)
    unknown.top_k = 0
    model = nn.ModuleList([a, b, other, unknown])
    plans = cuda_moe_tune.prepare(model, torch.float32, reps=1, timer=timer, buckets=(1, 2),
                                  environ={})
    assert len(plans) == 2 and a.plan is b.plan and other.plan is not a.plan
    assert a.plan == {1: ("grouped", GROUPED_SMALL), 2: ("grouped", GROUPED_SMALL)}
    assert unknown.plan is None
    # the timed cases cycle the shape's layers (each routing on the next layer)
    assert len(calls) > 0


def test_static_env_keeps_the_constant_rule(monkeypatch, caplog):
    timer, calls = fake_world(monkeypatch, lambda r, t: 1.0)
    layer = small_layer()
    layer.plan = {1: ("grouped", GROUPED_SMALL)}
    with caplog.at_level(logging.INFO, logger=cuda_moe_tune.log.name):
        plans = cuda_moe_tune.prepare(nn.ModuleList([layer]), torch.float32, timer=timer,
                                      environ={cuda_moe_tune.ENV: "static"})
    assert plans == {} and layer.plan is None and calls == []
    assert "static" in caplog.text
    assert cuda_moe_tune.static({cuda_moe_tune.ENV: " Static "})
    assert not cuda_moe_tune.static({}) and not cuda_moe_tune.static({cuda_moe_tune.ENV: "0"})


def test_no_right_route_leaves_the_bucket_to_the_constant_rule(monkeypatch, caplog):
    layer = small_layer()
    timer, _ = fake_world(monkeypatch, lambda r, t: 1.0, wrong=lambda r: True)
    cuda_moe_tune.prepare(nn.ModuleList([layer]), torch.float32, timer=timer, buckets=(1, 2),
                          environ={})
    assert layer.plan == {} and layer.route(1) is None
    assert "no route builds and is right" in caplog.text


def test_a_planned_model_keeps_top_k_on_its_experts_and_plans_them_as_one_shape(
        tmp_path_factory, monkeypatch):
    """The wiring on CPU: a tiny gpt-oss GGUF (3 layers, 4 experts, top-2, MXFP4) planned for
    CUDA — ``swap_in_experts`` gives each ``CudaMoEExperts`` the model's top-k, and ``prepare``
    (fake launcher and timer) plans the three layers as one shape."""
    from tests.unit.test_cuda_moe_mxfp4 import planned_model, tiny

    ckpt, model, _ = planned_model(tiny(tmp_path_factory.mktemp("tune_oss"), "gguf"))
    layers = [m for m in model.modules() if isinstance(m, cuda_moe.CudaMoEExperts)]
    assert len(layers) == 3 and {m.top_k for m in layers} == {ckpt.args.moe.top_k} == {2}
    timer, _ = fake_world(monkeypatch, lambda r, t: 1.0 if r[0] == "gemv" else 2.0)
    plans = cuda_moe_tune.prepare(model, torch.float32, reps=1, timer=timer, buckets=(1, 2),
                                  environ={})
    assert len(plans) == 1 and all(m.plan is layers[0].plan for m in layers)
    assert {r[0] for r in layers[0].plan.values()} == {"gemv"}


def test_a_kept_plan_is_checked_instead_of_timed_and_retimed_when_wrong(monkeypatch, tmp_path,
                                                                         caplog):
    from pensieve.backends.tune_cache import TuneCache

    monkeypatch.setattr(cuda_moe_tune, "device_key", lambda device, dtype: f"fake|{dtype}")
    swap = ("grouped", cuda_moe_tune.GROUPED_CANDIDATES[-1])
    timer, calls = fake_world(monkeypatch, lambda r, t: 1.0 if r == swap else 2.0)
    cache = TuneCache("moe", ("cuda_moe_tune.py",), root=tmp_path)
    first = small_layer(seed=1)
    cuda_moe_tune.prepare(nn.ModuleList([first]), torch.float32, reps=1, timer=timer,
                          buckets=(1, 2), environ={}, cache=cache)
    assert first.plan == {1: swap, 2: swap} and cache.path.exists()
    # a later start (a fresh cache object over the same file): one check a bucket, no timing
    again = TuneCache("moe", ("cuda_moe_tune.py",), root=tmp_path)
    calls.clear()
    later = small_layer(seed=2)
    with caplog.at_level(logging.INFO, logger=cuda_moe_tune.log.name):
        cuda_moe_tune.prepare(nn.ModuleList([later]), torch.float32, reps=1,
                              timer=lambda *a: pytest.fail("timed"), buckets=(1, 2),
                              environ={}, cache=again)
    assert later.plan == first.plan and calls == [(swap, 1), (swap, 2)]
    assert "kept from an earlier start" in caplog.text
    # the kept route now wrong: timed afresh (and another choice kept)
    timer, calls = fake_world(monkeypatch, lambda r, t: 1.0 if r[0] == "gemv" else 2.0,
                              wrong={swap})
    third = small_layer(seed=3)
    cuda_moe_tune.prepare(nn.ModuleList([third]), torch.float32, reps=1, timer=timer,
                          buckets=(1, 2), environ={}, cache=again)
    assert {r[0] for r in third.plan.values()} == {"gemv"}
    assert all(isinstance(t, GemvTiles) for _, t in third.plan.values())
    assert cuda_moe_tune.from_json(cuda_moe_tune.to_json(third.plan)) == third.plan
    # other buckets: another key
    assert again.get(cuda_moe_tune.cache_key(third, torch.float32, (1, 2, 4))) is None


def test_a_kept_gemv_pair_round_trips_and_an_older_entry_reads_as_one_tile_for_both(
        monkeypatch, tmp_path):
    from pensieve.backends.tune_cache import TuneCache

    monkeypatch.setattr(cuda_moe_tune, "device_key", lambda device, dtype: f"fake|{dtype}")
    down = cuda_moe_tune.DOWN_CANDIDATES[0]
    plan = {1: ("gemv", GemvTiles(cuda_moe_tune.GEMV_CANDIDATES[2], down)),
            2: ("grouped", GROUPED_SMALL), 4: ("experts", None)}
    raw = cuda_moe_tune.to_json(plan)
    assert raw["1"] == ["gemv", {"gate_up": [1, 8, 512, 4, 2, False, True],
                                 "down": [1, 32, 256, 8, 2, False, False]}]
    assert cuda_moe_tune.from_json(raw) == plan
    # an older start's entry: one tile set for both launches, as it ran then
    old = {"1": ["gemv", [1, 16, 256, 4, 2, False, False]], "2": ["gemv", None]}
    assert cuda_moe_tune.from_json(old) == {1: ("gemv", GemvTiles(GEMV, GEMV)), 2: ("gemv", None)}
    for bad in ({"1": ["gemv", {"gate_up": [1, 8, 512, 4, 2]}]},  # no down
                {"1": ["grouped", {"gate_up": [1, 8, 512, 4, 2], "down": [1, 8, 512, 4, 2]}]},
                {"1": ["gemv", [1, 8], [1, 8]]}):
        with pytest.raises((TypeError, ValueError, KeyError)):
            cuda_moe_tune.from_json(bad)
    # through the cache: the older entry kept and checked (as the pair), a malformed one
    # ignored (timed afresh), neither a crash
    timer, calls = fake_world(monkeypatch, lambda r, t: 1.0 if r[0] == "grouped" else 2.0)
    cache = TuneCache("moe", ("cuda_moe_tune.py",), root=tmp_path)
    layer = small_layer(seed=5)
    cache.put(cuda_moe_tune.cache_key(layer, torch.float32, (1, 2)),
              {"1": ["gemv", [1, 16, 256, 4, 2, False, False]], "2": ["experts", None]})
    cuda_moe_tune.prepare(nn.ModuleList([layer]), torch.float32, reps=1, timer=lambda *a: 1 / 0,
                          buckets=(1, 2), environ={}, cache=cache)
    assert layer.plan == {1: ("gemv", GemvTiles(GEMV, GEMV)), 2: ("experts", None)}
    cache.put(cuda_moe_tune.cache_key(layer, torch.float32, (1, 2)),
              {"1": ["gemv", {"down": [1, 16, 256, 4, 2, False, False]}]})
    cuda_moe_tune.prepare(nn.ModuleList([layer]), torch.float32, reps=1, timer=timer,
                          buckets=(1, 2), environ={}, cache=cache)
    assert layer.plan == {1: ("grouped", GROUPED_SMALL), 2: ("grouped", GROUPED_SMALL)}


def test_candidates_per_bucket_and_format():
    from tests.unit.test_cuda_moe_mxfp4 import random_layer

    layer = small_layer()
    names = lambda t: [r[0] for r in cuda_moe_tune.candidates(layer, t)]  # noqa: E731
    n_t = len(set(cuda_moe_tune.GROUPED_CANDIDATES))
    n_e = 1 + len(set(cuda_moe_tune.EXPERT_CANDIDATES))
    assert names(1) == ["grouped"] * n_t  # (the pick GEMV's raced a launch at a time)
    n_r = len(set(cuda_moe_tune.ROWS_CANDIDATES))
    assert names(2) == names(16) == ["experts"] * n_e + ["rows"] * n_r + ["grouped"] * n_t
    assert "experts" not in names(32) and "rows" not in names(32)
    # the pick GEMV's tiles: gate/up today's three and its two; down today's unpaired, its
    # three and, K = 32 ≤ 1024, the whole-row step
    gate_ups, downs = cuda_moe_tune.gemv_candidates(layer)
    assert gate_ups == cuda_moe_tune.GEMV_CANDIDATES + cuda_moe_tune.GATE_UP_CANDIDATES
    assert downs == (GEMV_FEW, GEMV, *cuda_moe_tune.DOWN_CANDIDATES, cuda_moe_tune.DOWN_WHOLE_K)
    assert not any(t.pair for t in downs) and all(t.block_m == 1 for t in gate_ups + downs)
    for t in gate_ups + downs:  # x's words in the codes' layout
        assert t.block_k // 8 < 32 * t.num_warps, t
    for t in (*cuda_moe_tune.GATE_UP_CANDIDATES, *cuda_moe_tune.DOWN_CANDIDATES,
              cuda_moe_tune.DOWN_WHOLE_K):  # the new ones: a (row, group) pair a thread
        assert t.block_n * (2 if t.pair else 1) * t.block_k // 32 == 32 * t.num_warps, t
    wide = make_layer(Q.Q4_0, Q.Q8_0, 64, 1056, 2)  # down's K past the whole-row step
    assert cuda_moe_tune.DOWN_WHOLE_K not in cuda_moe_tune.gemv_candidates(wide)[1]
    # the static route: the constant rule's tile for each launch
    assert cuda_moe_tune.static_route(layer, 8) == ("gemv", GemvTiles(GEMV_FEW, GEMV_FEW))
    assert cuda_moe_tune.static_route(layer, 9) == ("gemv", GemvTiles(GEMV, GEMV))
    pair = GemvTiles(cuda_moe.Tiles(1, 8, 512, 4, 2, pair=True), cuda_moe.Tiles(1, 32, 256, 8, 2))
    assert cuda_moe_tune.describe(("gemv", pair)) == "gemv 1x8x512w4 pair/1x32x256w8"
    assert cuda_moe_tune.describe(("gemv", GemvTiles(GEMV, cuda_moe_tune.DOWN_WHOLE_K))) == \
        "gemv 1x16x256w4/1x8x1024w8"
    assert cuda_moe_tune.describe(("down", GEMV)) == "down 1x16x256w4"
    packed = random_layer(3, 64, 32, seed=1, packed=True)  # the expert GEMV takes FP4 too
    assert ("experts", None) in cuda_moe_tune.candidates(packed, 8)
    assert cuda_moe_tune.describe(("grouped", GROUPED_SMALL)) == "grouped 16x64x64w4"
    swap = cuda_moe.Tiles(16, 64, 32, 8, 3, swap=True)
    assert cuda_moe_tune.describe(("grouped", swap)) == "grouped 16x64x32w8 swap"
    assert ("grouped", swap) in cuda_moe_tune.candidates(layer, 1)
    assert cuda_moe_tune.describe(None) == "static"


def test_routings_are_uniform_distinct_and_seeded():
    layer = small_layer(experts=32, top_k=4)
    a = cuda_moe_tune.routings(layer, 8, torch.float32, 3, seed=8)
    b = cuda_moe_tune.routings(layer, 8, torch.float32, 3, seed=8)
    for (x, w, ids), (x2, w2, ids2) in zip(a, b):
        assert torch.equal(ids, ids2) and torch.equal(x, x2) and torch.equal(w, w2)
        assert ids.shape == (8, 4) and all(len(set(r.tolist())) == 4 for r in ids)
        torch.testing.assert_close(w.sum(-1), torch.ones(8))
    assert not torch.equal(a[0][2], a[1][2])
    many = cuda_moe_tune.routings(layer, 64, torch.float32, 8, seed=1)
    hits = torch.bincount(torch.cat([ids.reshape(-1) for _, _, ids in many]), minlength=32)
    assert hits.min() > 0  # 2048 picks over 32 experts: every one hit


@pytest.mark.parametrize("packed", [False, True])
def test_reference_layer_dequantises_each_expert_alone(packed):
    from tests.unit.test_cuda_moe_mxfp4 import clamped_experts, random_layer

    if packed:
        layer = random_layer(5, 64, 32, seed=3, packed=True)
        ref_module = clamped_experts(layer)
    else:
        layer = make_layer(Q.Q4_K, Q.Q6_K, 256, 256, 5, seed=3)
        gate_up, down = (t.double() for t in layer.dequantize())
    w, ids = routing(4, 5, 2, 1)
    x = torch.randn(4, layer.hidden, generator=torch.Generator().manual_seed(2))
    got = reference_layer(layer, x, w, ids)
    if packed:
        want = ref_module(x.double(), w.double(), ids)
    else:
        want = cuda_moe.reference_experts(x.double(), w.double(), ids, gate_up, down)
    assert got.dtype == torch.float32 and rel(got, want) < 1e-5


def interpreter_check() -> None:
    """Run with TRITON_INTERPRET=1: the real candidates over small layers, a fake timer."""
    from pensieve.backends import cuda_moe_expert
    from tests.unit.test_cuda_moe_mxfp4 import random_layer

    cuda_moe_expert.BLOCK_N = 64  # fewer programs: the interpreter runs each in turn
    cuda_moe_tune.GEMV_CANDIDATES = (cuda_moe.Tiles(1, 32, 256, 4, 2),
                                     cuda_moe.Tiles(1, 64, 128, 4, 2))
    cuda_moe_tune.GATE_UP_CANDIDATES = (cuda_moe.Tiles(1, 16, 512, 8, 2, pair=True),)
    cuda_moe_tune.DOWN_CANDIDATES = (cuda_moe.Tiles(1, 32, 256, 8, 2),)
    cuda_moe_tune.DOWN_WHOLE_K = cuda_moe.Tiles(1, 32, 1024, 8, 2)
    cuda_moe_tune.ROWS_CANDIDATES = (cuda_moe.Tiles(4, 64, 128, 4, 2, pair=True),)
    warned = []
    cuda_moe_tune.log.warning = lambda *a: warned.append(a)  # type: ignore[method-assign]
    order = [("grouped", t) for t in cuda_moe_tune.GROUPED_CANDIDATES[::-1]]

    def timer(run, cases, reps):  # noqa: ANN001, ANN202
        for c in cases:
            run(c)
        return float(order.index(run.route)) if run.route in order else 10.0 + cases[0][1].shape[0]

    cuda_moe_tune.ROUTINGS = 2
    int8 = small_layer(experts=5, top_k=3, seed=7)
    packed = random_layer(4, 64, 32, seed=5, packed=True)
    packed.top_k = 2
    q4k = make_layer(Q.Q4_K, Q.Q4_K, 256, 256, 4, seed=6)  # Q4_K's own factors (q4k)
    q4k.top_k = 2
    for layer in (int8, packed, q4k):
        plans = cuda_moe_tune.prepare(nn.ModuleList([layer]), torch.float32, reps=1,
                                      timer=timer, buckets=(1, 4), environ={})
        assert not warned, warned  # every candidate builds and is right
        assert len(plans) == 1
        # the last grouped tile set is the fake timer's fastest, at every bucket
        assert layer.plan == {1: order[0], 4: order[0]}, layer.plan
        w, ids = routing(3, layer.num_experts, layer.top_k, 4)
        x = torch.randn(3, layer.hidden)
        ref = reference_layer(layer, x, w, ids)
        gate_ups, downs = cuda_moe_tune.gemv_candidates(layer)
        pairs = [("gemv", GemvTiles(gate_ups[i % len(gate_ups)], downs[i % len(downs)]))
                 for i in range(max(len(gate_ups), len(downs)))]  # each tile, others beside
        for r in cuda_moe_tune.candidates(layer, 3) + pairs:
            assert rel(cuda_moe_tune.launch(r, (layer, x, w, ids)), ref) < 1e-5, r
    print("ok")


def interpreter_check_swaps() -> None:
    """Run with TRITON_INTERPRET=1 (a process of its own: with the routes above one run came
    within reach of the interpreter helper's time limit on the 2-core CI machine)."""
    # swap-AB grouped tiles over every code layout: Q4_K (q4k) + Q6_K, 6-bit gate/up + Q5_K down
    # (int8 codes with offsets), Q4_K down (q4k routed), at 1 and 3 tokens (1-3 picks an
    # expert), against float32
    swaps = [t for t in cuda_moe_tune.GROUPED_CANDIDATES if t.swap]
    for gu, dn in ((Q.Q4_K, Q.Q6_K), (Q.Q6_K, Q.Q5_K), (Q.Q4_K, Q.Q4_K)):
        layer = make_layer(gu, dn, 256, 256, 4, seed=8)
        for tokens in (1, 3):
            w, ids = routing(tokens, 4, 2, tokens)
            x = torch.randn(tokens, 256)
            ref = reference_layer(layer, x, w, ids)
            runs = [("grouped", t) for t in swaps]
            runs += [("experts", t) for t in cuda_moe_tune.EXPERT_CANDIDATES] if tokens > 1 else []
            for route, t in runs:
                got = cuda_moe.moe_experts(x, w, ids, *layer.stacks(), 4, route=route, tiles=t)
                assert rel(got, ref.double()) < 1e-5, (gu.name, dn.name, tokens, route, t)
    print("ok")


@pytest.mark.slow
def test_candidates_in_the_triton_interpreter():
    run_in_triton_interpreter(
        "from tests.unit.test_cuda_moe_tune import interpreter_check; interpreter_check()")


@pytest.mark.slow
def test_swap_ab_candidates_in_the_triton_interpreter():
    run_in_triton_interpreter(
        "from tests.unit.test_cuda_moe_tune import interpreter_check_swaps; "
        "interpreter_check_swaps()")


@pytest.mark.parametrize("fmt", ["int4", "six", "int8", "fp4", "q4k"])
def test_swap_ab_grouped_tiles_compile_for_the_h100(fmt):
    """The swap-AB grouped GEMM (both raced tiles) and expert-major GEMV (its swap tile; its
    constants over packed MXFP4) built for sm_90 in bfloat16 here, no GPU needed: fused gate/up
    and routed down, each code layout (MXFP4 with biases and the clamped SwiGLU); no register
    spills but the grouped int8's (with offsets) fused at 128 outputs."""
    from pensieve.backends import cuda_moe_kernels as kernels
    from tests.helpers.triton_compile import compile_for
    from tests.unit.test_cuda_gdn import _resources

    types = {"X": "*bf16", "RW": "*bf16", "W": "*u8", "S": "*i16", "MN": "*i16", "D": "*i16",
             "B": "*bf16", "Y": "*bf16", "N": "i32", "K": "i32", "stride_x": "i32",
             "stride_y": "i32", "SORTED": "*i32", "BEXP": "*i32", "P": "i32", "E": "i32"}
    base = dict(TOPK=4, INT4=fmt == "int4", SIX=fmt == "six", FP4=fmt == "fp4", Q4K=fmt == "q4k",
                GS=16 if fmt == "six" else 32, HAS_MIN=fmt == "int8", HAS_BIAS=fmt == "fp4")
    if fmt == "int4":
        types.update(S="*i32")
    elif fmt == "q4k":
        types.update(S="*i32")
    elif fmt == "six":
        types.update(S="*i8", MN="*u8")
    elif fmt == "fp4":
        types.update(S="*u8", MN="*u8", D="*u8")
    for t in (t for t in cuda_moe_tune.GROUPED_CANDIDATES if t.swap):
        for fuse in (True, False):
            act = dict(SWIGLU=fuse and fmt == "fp4", ALPHA=1.702 if fuse else 0.0,
                       LIMIT=7.0 if fuse else 0.0)
            consts = dict(base, **act, GATHER=fuse, FUSE=fuse, ROUTED=not fuse, SWAP=True,
                          BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k)
            built = compile_for(kernels.grouped_gemm, types, consts, t.num_warps, t.num_stages)
            assert built
            if not (fmt == "int8" and fuse and t.block_n == 128):
                assert "STACK:0 " in _resources(built), (fmt, t, fuse, _resources(built))
    # the expert-major GEMV: its swap-AB candidate, and its constants over packed MXFP4
    from pensieve.backends import cuda_moe_expert
    from pensieve.backends import cuda_moe_expert_kernels as ek

    const = cuda_moe.Tiles(16, cuda_moe_expert.BLOCK_N, cuda_moe_expert.BLOCK_K,
                           cuda_moe_expert.NUM_WARPS, cuda_moe_expert.NUM_STAGES)
    etypes = {**{n: types[n] for n in ("X", "RW", "W", "S", "MN", "D", "B", "Y", "N", "K",
                                       "stride_x", "stride_y")}, "IDS": "*i64", "T": "i32"}
    for t in (*cuda_moe_tune.EXPERT_CANDIDATES, *((const,) if fmt == "fp4" else ())):
        for fuse in (True, False):
            act = dict(SWIGLU=fuse and fmt == "fp4", ALPHA=1.702 if fuse else 0.0,
                       LIMIT=7.0 if fuse else 0.0)
            consts = dict(base, **act, K_PAD=4, GATHER=fuse, FUSE=fuse, ROUTED=not fuse,
                          SWAP=t.swap, BLOCK_M=16, BLOCK_N=t.block_n, BLOCK_K=t.block_k)
            built = compile_for(ek.expert_gemv, etypes, consts, t.num_warps, t.num_stages)
            assert built
            assert "STACK:0 " in _resources(built), ("experts", fmt, t, fuse, _resources(built))


def tuned_layers():  # noqa: ANN201
    """gpt-oss-20b's experts (32, 2880 x 2880, top-4, packed MXFP4, biases, clamp) and
    Qwen3-30B-A3B's (128, 2048 x 768, top-8, Q4_K gate/up + Q6_K down), on the GPU in bf16."""
    from tests.unit.test_cuda_moe_mxfp4 import random_layer

    oss = random_layer(32, 2880, 2880, seed=11, packed=True).cuda().to(torch.bfloat16)
    oss.top_k = 4
    qwen = make_layer(Q.Q4_K, Q.Q6_K, 2048, 768, 128, seed=12).cuda().to(torch.bfloat16)
    qwen.top_k = 8
    return oss, qwen


@needs_cuda
def test_tuned_layers_match_the_reference_at_every_bucket_graphs_included(caplog, tmp_path):
    from pensieve.backends.tune_cache import TuneCache

    oss, qwen = tuned_layers()
    cache = TuneCache("moe", ("cuda_moe_tune.py",), root=tmp_path)  # timed here, not read back
    with caplog.at_level(logging.INFO, logger=cuda_moe_tune.log.name):
        plans = cuda_moe_tune.prepare(nn.ModuleList([oss, qwen]), torch.bfloat16, reps=3,
                                      cache=cache)
    assert len(plans) == 2 and "MoE routes per decode bucket" in caplog.text
    print(caplog.text)
    timed = (oss.plan, qwen.plan)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=cuda_moe_tune.log.name):  # a later start's read
        cuda_moe_tune.prepare(nn.ModuleList([oss, qwen]), torch.bfloat16, cache=TuneCache(
            "moe", ("cuda_moe_tune.py",), root=tmp_path), timer=lambda *a: pytest.fail("timed"))
    assert (oss.plan, qwen.plan) == timed and "kept from an earlier start" in caplog.text
    for layer in (oss, qwen):
        assert set(layer.plan) == set(cuda_moe_tune.BUCKETS), layer.plan  # every bucket right
        for tokens in cuda_moe_tune.BUCKETS:
            x = torch.randn(tokens, layer.hidden, device="cuda", dtype=torch.bfloat16)
            w, ids = (t.cuda() for t in routing(tokens, layer.num_experts, layer.top_k, tokens))
            w = w.bfloat16()
            eager = layer(x, w, ids)
            err = rel(eager, reference_layer(layer, x, w, ids).double().cpu())
            assert err < 2e-2, (layer.num_experts, tokens, layer.route(tokens), err)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                layer(x, w, ids)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = layer(x, w, ids)
            for seed in (100, 101):
                x.normal_()
                nw, nids = routing(tokens, layer.num_experts, layer.top_k, seed)
                w.copy_(nw)
                ids.copy_(nids)
                graph.replay()
                ref = reference_layer(layer, x, w, ids).double().cpu()
                assert rel(y, ref) < 2e-2, (layer.num_experts, tokens, layer.route(tokens))
                torch.testing.assert_close(y, layer(x, w, ids), atol=0, rtol=0)
            del graph


@needs_cuda
def test_static_env_on_cuda_is_the_constant_rule(monkeypatch):
    monkeypatch.setenv(cuda_moe_tune.ENV, "static")
    oss, _ = tuned_layers()
    assert cuda_moe_tune.prepare(nn.ModuleList([oss]), torch.bfloat16) == {}
    assert oss.plan is None and oss.route(8) is None
    x = torch.randn(8, oss.hidden, device="cuda", dtype=torch.bfloat16)
    w, ids = (t.cuda() for t in routing(8, 32, 4, 0))
    w = w.bfloat16()
    same = cuda_moe.moe_experts(x, w, ids, *oss.stacks(), 32, glu=oss.glu)
    torch.testing.assert_close(oss(x, w, ids), same, atol=0, rtol=0)


def bench_check(out: str) -> None:
    """``bench.gpu_moe_kernels --routes`` on tiny gpt-oss-shaped layers (interpreter, CPU)."""
    import json
    from pathlib import Path

    from contextlib import redirect_stdout
    from io import StringIO

    from bench import gpu_moe_kernels

    with redirect_stdout(StringIO()) as printed:  # (the snippet's stdout must be just "ok")
        assert gpu_moe_kernels.main(["--routes", "--tiny", "--device", "cpu", "--presets",
                                     "gpt-oss-20b", "--buckets", "1,2", "--reps", "1",
                                     "--layers", "2", "--out", out]) == 0
    assert "| 1 |" in printed.getvalue()
    rows = json.loads((Path(out) / "gpu_moe_routes.json").read_text())
    assert [r["tokens"] for r in rows] == [1, 2]
    layer = gpu_moe_kernels.preset_layer("gpt-oss-20b", True)
    gate_ups, downs = cuda_moe_tune.gemv_candidates(layer)
    for r in rows:  # every pick_gemv launch's tile and grouped tile right
        experts = (1 + len(cuda_moe_tune.EXPERT_CANDIDATES)
                   + len(set(cuda_moe_tune.ROWS_CANDIDATES))) if r["tokens"] >= 2 else 0
        alone = [k for k in r["us"] if k.startswith(("gate_up ", "down "))]
        assert len(alone) == len(gate_ups) + len(downs)
        whole = len(r["us"]) - len(alone) - experts - len(cuda_moe_tune.GROUPED_CANDIDATES)
        assert whole in (1, 2)  # the gemv route's fastest pair, the constant rule's if other
        assert r["chosen"] in r["us"] and r["static"] in r["us"]
    assert "| 2 |" in (Path(out) / "gpu_moe_routes.md").read_text()
    print("ok")


@pytest.mark.slow
def test_the_routes_bench_plumbing_in_the_triton_interpreter(tmp_path):
    run_in_triton_interpreter("from tests.unit.test_cuda_moe_tune import bench_check; "
                              f"bench_check({str(tmp_path)!r})")


@needs_cuda
def test_the_routes_bench_runs_on_cuda(tmp_path):
    import json

    from bench import gpu_moe_kernels

    assert gpu_moe_kernels.main(["--routes", "--presets", "qwen3-30b-a3b", "--buckets", "1,8",
                                 "--reps", "3", "--layers", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_moe_routes.json").read_text())
    assert [r["tokens"] for r in rows] == [1, 8]
    assert all(r["chosen"] != "static" and r["gain"] is not None for r in rows)
    assert "experts" in rows[1]["us"]  # Q4_K/Q6_K at 8 tokens: the expert GEMV raced
