"""The expert-major pick GEMV on the CUDA cores (``backends/cuda_moe_rows.py``,
``moe_experts(route="rows")``): each picked expert's weights once a pass of R of its tokens.

In Triton's interpreter (a fresh process) against float64 torch experts and the pick GEMV:
int4 / q4k / 6-bit / int8 (Q8_0, Q5_K with offsets) codes, R = 1, 2, 4 rows a pass, gate/up
paired and not, at 1, 2, 5 and 8 tokens, an expert picked by every token (more tokens than R:
passes of R, then 2 and 1) and one by none; gpt-oss's MXFP4 experts (packed, and as int8
codes) with biases and the clamped SwiGLU at K = 64 and 2880 (masked steps); int8 codes in
groups of 16 one launch at a time; 16-bit x equal to the same x in float32 through the kernel;
a token count past 16. Compiled for sm_90 (bfloat16, the runtime JIT's 16-byte
specialisations): every layout, fused (paired and not) and routed, at the raced tiles — no
register spills, in each K loop the codes in 16-byte word loads (``ld.global.v4.b32``), x's
int64 words 16 bytes a load, 4 a row, no shared memory or barrier. On a GPU: bfloat16 at
gpt-oss-20b's and Qwen3-30B-A3B's routing against float64 and the pick GEMV, and replayed from a
CUDA graph with new routing."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from pensieve.backends import cuda_moe, cuda_moe_rows
from pensieve.backends.cuda_moe import Tiles
from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_block_k_and_masking():
    assert cuda_moe_rows.block_k(2048, 256) == 256 and not cuda_moe_rows.masked(2048, 256)
    assert cuda_moe_rows.block_k(768, 512) == 256  # 768 = 3 · 256
    assert cuda_moe_rows.block_k(768, 1024) == 1024 and cuda_moe_rows.masked(768, 1024)
    assert cuda_moe_rows.block_k(2880, 256) == 256 and cuda_moe_rows.masked(2880, 256)
    assert cuda_moe_rows.block_k(96, 256) == 128 and cuda_moe_rows.masked(96, 128)
    assert cuda_moe_rows.block_k(64, 256) == 64 and not cuda_moe_rows.masked(64, 64)
    assert "rows" in cuda_moe.ROUTES


def test_rows_routes_are_raced_at_2_to_16_tokens_and_kept_plans_round_trip(monkeypatch,
                                                                          tmp_path):
    """``cuda_moe_tune``: the rows candidates at 2-16 tokens only, a rows plan through the
    kept-plan JSON and the cache (checked, not timed, at a later start), a kept route this
    build does not know (an older or newer start's) read as no plan: timed afresh."""
    from torch import nn

    from pensieve.backends import cuda_moe_tune
    from pensieve.backends.tune_cache import TuneCache
    from tests.unit.test_cuda_moe_tune import fake_world, small_layer

    layer = small_layer()
    for tokens, want in ((1, 0), (2, 3), (16, 3), (32, 0)):
        rows = [r for r in cuda_moe_tune.candidates(layer, tokens) if r[0] == "rows"]
        assert rows == ([("rows", t) for t in cuda_moe_tune.ROWS_CANDIDATES] if want else [])
    for t in cuda_moe_tune.ROWS_CANDIDATES:  # x's words in the codes' layout; R a pass
        assert t.block_k // 8 < 32 * t.num_warps and t.block_m in (1, 2, 4), t
        # a (row, group) pair a thread (paired gate/up: two, the gate's and the up's)
        assert t.block_n * t.block_k // 32 == 32 * t.num_warps, t
    paired = cuda_moe_tune.ROWS_CANDIDATES[2]
    assert cuda_moe_tune.describe(("rows", paired)) == "rows 2x8x512w4 pair"
    plan = {2: ("rows", cuda_moe_tune.ROWS_CANDIDATES[0]), 4: ("rows", paired), 8: ("rows", None)}
    assert cuda_moe_tune.from_json(cuda_moe_tune.to_json(plan)) == plan
    with pytest.raises(ValueError):
        cuda_moe_tune.from_json({"2": ["rows2", [2, 16, 256, 4, 2, False, False]]})
    with pytest.raises(ValueError):  # a tile pair is the pick GEMV's
        cuda_moe_tune.from_json({"2": ["rows", {"gate_up": [2, 16, 256, 4, 2],
                                                "down": [2, 16, 256, 4, 2]}]})
    monkeypatch.setattr(cuda_moe_tune, "device_key", lambda device, dtype: f"fake|{dtype}")
    fastest = ("rows", cuda_moe_tune.ROWS_CANDIDATES[1])
    timer, calls = fake_world(monkeypatch, lambda r, t: 1.0 if r == fastest else 2.0)
    cache = TuneCache("moe", ("cuda_moe_tune.py",), root=tmp_path)
    cuda_moe_tune.prepare(nn.ModuleList([layer]), torch.float32, reps=1, timer=timer,
                          buckets=(1, 2, 16), environ={}, cache=cache)
    assert layer.plan[2] == layer.plan[16] == fastest and layer.plan[1][0] != "rows"
    later = small_layer(seed=4)
    calls.clear()
    cuda_moe_tune.prepare(nn.ModuleList([later]), torch.float32, reps=1,
                          timer=lambda *a: pytest.fail("timed"), buckets=(1, 2, 16),
                          environ={}, cache=TuneCache("moe", ("cuda_moe_tune.py",),
                                                      root=tmp_path))
    assert later.plan == layer.plan and (fastest, 2) in calls and (fastest, 16) in calls
    cache.put(cuda_moe_tune.cache_key(later, torch.float32, (1, 2, 16)),
              {"1": ["gemv", None], "2": ["rows_v9", None]})  # not this build's
    timer, calls = fake_world(monkeypatch, lambda r, t: 1.0 if r[0] == "grouped" else 2.0)
    cuda_moe_tune.prepare(nn.ModuleList([later]), torch.float32, reps=1, timer=timer,
                          buckets=(1, 2, 16), environ={}, cache=cache)
    assert {r[0] for r in later.plan.values()} == {"grouped"}


def shared_ids(tokens: int, experts: int, k: int) -> torch.Tensor:
    """Every token picks expert 1 (more tokens than a pass's rows); none picks experts - 1."""
    ids = torch.stack([torch.tensor([1] + [(2 + t + 2 * j) % (experts - 1) for j in range(k - 1)])
                       for t in range(tokens)])
    ids[:, 1:] = torch.where(ids[:, 1:] == 1, 0, ids[:, 1:])
    for row in ids:  # distinct a token
        assert len(set(row.tolist())) == k
    return ids


def int8_stack(experts: int, n: int, k: int, group: int, seed: int) -> cuda_moe.Stack:
    """Random int8 codes with a float16 scale per ``group`` (no offsets), as ``Stack``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (experts * n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(experts * n, k // group, generator=g) * 0.02 + 0.001).half().view(torch.int16)
    return cuda_moe.Stack(w, s, None, False, group, n, k)


def interpreter_check() -> None:
    """Run with TRITON_INTERPRET=1: the kernels on CPU tensors against float64 torch."""
    from pensieve.backends.cuda_moe import moe_experts, reference_experts
    from tests.unit.test_cuda_int8 import rel
    from tests.unit.test_cuda_moe import MIXES, make_layer, routing
    from tests.unit.test_cuda_moe_mxfp4 import clamped_experts, random_layer

    experts, k = 6, 3
    gemv = Tiles(1, 64, 256, 4, 2)
    # (few programs: the interpreter runs each in turn)
    a, b, c = Tiles(2, 64, 256, 4, 2), Tiles(4, 64, 128, 4, 2, pair=True), Tiles(1, 64, 256, 4, 2)
    for i, (gu, dn, hidden, inner) in enumerate(MIXES):
        layer = make_layer(gu, dn, hidden, inner, experts, seed=50 + i)
        gate_up, down = (w.double() for w in layer.dequantize())
        runs = (((1, (a,)), (2, (b,)), (5, (a, b, c)), (8, (a, b, c))) if i == 0 else
                ((5, (b if i % 2 else a,)), (8, (a if i % 2 else b,))))
        for tokens, tiles in runs:
            w, ids = routing(tokens, experts, k, tokens + i)
            if tokens == 5 or tokens == 8 and i == 0:  # expert 1 picked by all: R, 2, 1 rows
                ids = shared_ids(tokens, experts, k)
            x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
            ref = reference_experts(x.double(), w.double(), ids, gate_up, down)
            for t in tiles:
                got = moe_experts(x, w, ids, *layer.stacks(), experts, route="rows", tiles=t)
                assert rel(got, ref) < 1e-5, (gu.name, dn.name, tokens, t, rel(got, ref))
            if tokens == 8:
                want = moe_experts(x, w, ids, *layer.stacks(), experts, route="gemv", tiles=gemv)
                assert rel(got.double(), want.double()) < 1e-5
        if i > 1:
            continue
        # 16-bit x: the same as that x in float32 through the kernel (its words unpacked
        # right); y in float32 (the interpreter rounds to bfloat16 by truncation)
        w, ids = routing(3, experts, k, 7)
        flat, rw = ids.reshape(-1).contiguous(), w.reshape(-1).contiguous()
        for st, fuse in zip(layer.stacks(), (True, False)):
            x = torch.randn(3 if fuse else 3 * k, st.k) * (0.05 if fuse else 1)
            for dt in (torch.bfloat16, torch.float16):
                x16 = x.to(dt)
                y16, y32 = (torch.empty(3 * k, st.n // 2 if fuse else st.n) for _ in range(2))
                for xx, y in ((x16, y16), (x16.float(), y32)):
                    cuda_moe_rows.rows_gemv(xx, flat, rw, st, y, tokens=3, experts=experts,
                                            topk=k, gather=fuse, fuse=fuse, routed=not fuse,
                                            t=a)
                assert torch.equal(y16, y32), (gu.name, fuse, dt)
    # gpt-oss: MXFP4 packed (fp4) and as int8 codes, biases on both projections, the clamp
    # binding; K = 2880 (steps of 256, the last masked) and 64
    for experts, hidden, inner, tokens, seed, packed in (
            (4, 64, 32, 6, 0, True), (4, 64, 32, 6, 0, False), (3, 2880, 64, 2, 2, True),
            (3, 2880, 64, 2, 2, False)):
        layer = random_layer(experts, hidden, inner, seed, packed=packed)
        ref = clamped_experts(layer)
        w, ids = routing(tokens, experts, 2, seed)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = ref(x.double(), w.double(), ids)
        for t in (Tiles(2, 64, 256, 4, 2, pair=True), Tiles(4, 64, 256, 4, 2)):
            got = moe_experts(x, w, ids, *layer.stacks(), experts, route="rows",
                              glu=layer.glu, tiles=t)
            assert rel(got, want) < 1e-5, (experts, hidden, packed, t, rel(got, want))
    # int8 codes in groups of 16, one launch: fused gate/up (gathered) and routed down
    e, n, kk, topk = 4, 64, 96, 2
    w, ids = routing(5, e, topk, 3)
    flat, rw = ids.reshape(-1).contiguous(), w.reshape(-1).contiguous()
    for fuse in (True, False):
        st = int8_stack(e, n, kk, 16, seed=int(fuse))
        dense = cuda_moe._dequantize(st, e).double()
        x = torch.randn(5 if fuse else 10, kk, generator=torch.Generator().manual_seed(1))
        for t in (Tiles(2, 64, 64, 4, 2), Tiles(4, 32, 128, 4, 2, pair=True)):
            y = torch.empty(10, n // 2 if fuse else n)
            cuda_moe_rows.rows_gemv(x, flat, rw, st, y, tokens=5, experts=e, topk=topk,
                                    gather=fuse, fuse=fuse, routed=not fuse, t=t)
            xr = x.double()[torch.arange(10) // topk] if fuse else x.double()
            full = torch.einsum("pk,pnk->pn", xr, dense[flat])
            if fuse:
                g, u = full.chunk(2, dim=-1)
                want = torch.nn.functional.silu(g) * u
            else:
                want = full * rw.double()[:, None]
            assert rel(y, want) < 1e-5, (fuse, t, rel(y, want))
    # past 16 tokens (the token list's next power of two)
    layer = make_layer(*MIXES[1], 5, seed=3)
    gate_up, down = (t.double() for t in layer.dequantize())
    w, ids = routing(20, 5, 2, 20)
    x = torch.randn(20, layer.hidden)
    ref = reference_experts(x.double(), w.double(), ids, gate_up, down)
    got = moe_experts(x, w, ids, *layer.stacks(), 5, route="rows", tiles=Tiles(4, 64, 64, 4, 2))
    assert rel(got, ref) < 1e-5


@pytest.mark.slow
def test_rows_route_equals_float64_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_moe_rows import interpreter_check "
                              "as c; c(); print('ok')")


# layout: (pointer types, constexprs, code loads a row a step: (v4.b32, v2.b32))
LAYOUTS = {
    "int4": (dict(S="*i32"), dict(INT4=True), (1, 0)),
    "q4k": (dict(S="*i32"), dict(Q4K=True), (2, 0)),  # codes + the super-block quad
    "six": (dict(S="*i8", MN="*u8", D="*i16"), dict(SIX=True, GS=16), (1, 2)),  # 8 B twice
    "fp4": (dict(S="*u8"), dict(FP4=True), (1, 0)),
    "int8": (dict(S="*i16", MN="*i16"), dict(GS=32, HAS_MIN=True), (2, 0)),
    "int8/16": (dict(S="*i16"), dict(GS=16), (2, 0)),
}
TYPES = {"X": "*bf16", "IDS": "*i64", "RW": "*bf16", "W": "*u8", "S": "*i32", "MN": "*i32",
         "D": "*i32", "B": "*bf16", "Y": "*bf16", "T": "i32", "N": "i32", "K": "i32",
         "stride_x": "i32", "stride_y": "i32"}
CONSTS = dict(TOPK=8, K_PAD=8, TB=16, INT4=False, SIX=False, Q4K=False, FP4=False, GS=32,
              HAS_MIN=False, HAS_BIAS=False, SWIGLU=False, ALPHA=0.0, LIMIT=0.0)
ROUTES = {"paired": (True, True), "fused": (True, False), "down": (False, False)}


def k_loops(ptx: str) -> list[Counter]:
    """The global loads by width and the shared-memory / barrier instructions of each
    innermost PTX loop that reads x (the K loops; a pass's loop holds them textually)."""
    from tests.unit.test_cuda_moe_loads import ops

    lines, seen, spans = ptx.splitlines(), {}, []
    for i, line in enumerate(lines):
        if m := re.match(r"\s*(\$L__BB\d+_\d+):", line):
            seen[m.group(1)] = i
        if (m := re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)) and m.group(1) in seen:
            spans.append((seen[m.group(1)], i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    loops = [ops(lines[a:b + 1]) for a, b in inner]
    return [n for n in loops if n["ld.v2.b64"]]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rows_gemv_compiles_for_the_h100_with_16_byte_loads(layout):
    from pensieve.backends import cuda_moe_rows_kernels as kernels
    from pensieve.backends import cuda_moe_tune
    from tests.helpers.triton_compile import compile_for
    from tests.unit.test_cuda_gdn import _resources

    types, consts, (v4, v2) = LAYOUTS[layout]
    types = dict(TYPES, **types)
    aligned = [n for n, t in types.items() if t.startswith("*")] + ["N", "K", "stride_x",
                                                                      "stride_y"]
    oss = layout == "fp4"
    for t in cuda_moe_tune.ROWS_CANDIDATES:
        for route, (fuse, pair) in ROUTES.items():
            if pair and not t.pair or t.pair and fuse and not pair:
                continue
            c = dict(CONSTS, **consts, GATHER=fuse, FUSE=fuse, ROUTED=not fuse,
                     BLOCK_N=t.block_n, BLOCK_K=t.block_k, PAIR=pair, ROWS=t.block_m,
                     HAS_BIAS=oss, SWIGLU=oss and fuse, ALPHA=1.702 if oss and fuse else 0.0,
                     LIMIT=7.0 if oss and fuse else 0.0)
            built = compile_for(kernels.rows_gemv, types, c, t.num_warps, t.num_stages,
                                aligned=aligned)
            where = (layout, route, t)
            assert "STACK:0 " in _resources(built), (where, _resources(built))
            loops = k_loops(built.asm["ptx"])
            # a K loop a pass size (R, then 2 and 1 for a remainder), twice where gate and up
            # are two loops
            sizes = [r for r in (4, 2, 1) if r <= t.block_m]
            want = sorted(sizes * (2 if fuse and not pair else 1))
            assert sorted(n["ld.v2.b64"] // 4 for n in loops) == want, (where, loops)
            held = 2 if pair else 1  # rows a thread holds of its group
            for n in loops:
                assert n["ld.v2.b64"] % 4 == 0 and n["ld.b64"] == 0, (where, n)  # x: 4 a row
                assert n["ld.b8"] + n["ld.u8"] == (held if oss else 0), (where, n)  # (E8M0)
                assert n["ld.v4.b32"] == v4 * held and n["ld.v2.b32"] == v2 * held, (where, n)
                assert n["st.shared"] + n["ld.shared"] + n["bar.sync"] == 0, (where, n)


@needs_cuda
@pytest.mark.parametrize("preset", ["gpt-oss-20b", "qwen3-30b-a3b"])
def test_rows_route_on_cuda_in_bfloat16_and_under_a_graph(preset):
    """gpt-oss-20b's routing and hidden width (32 experts, top-4, K = 2880; packed MXFP4,
    biases, the clamp; the expert width cut to 256 for the float64 reference) and
    Qwen3-30B-A3B's (128 experts, top-8, Q4_K gate/up + Q6_K down, 2048 x 768), at 8 tokens:
    every raced tile against float64 and the pick GEMV, then replayed from a CUDA graph with
    new inputs and routing, bit for bit as eager."""
    from gguf import GGMLQuantizationType as Q

    from pensieve.backends import cuda_moe_tune
    from pensieve.backends.cuda_moe import moe_experts
    from tests.helpers.cuda_graph_check import assert_replays_as_eager
    from tests.unit.test_cuda_int8 import rel
    from tests.unit.test_cuda_moe import make_layer, routing
    from tests.unit.test_cuda_moe_mxfp4 import random_layer

    tokens = 8
    if preset == "gpt-oss-20b":
        experts, k = 32, 4
        layer = random_layer(experts, 2880, 256, 0, packed=True)
    else:
        experts, k = 128, 8
        layer = make_layer(Q.Q4_K, Q.Q6_K, 2048, 768, experts, seed=1)
    w, ids = routing(tokens, experts, k, 0)
    x = torch.randn(tokens, layer.hidden, generator=torch.Generator().manual_seed(0)) * 0.05
    want = cuda_moe.reference_layer(layer, x, w, ids).double()
    layer = layer.cuda()
    xc, wc, ic = x.cuda().bfloat16(), w.cuda().bfloat16(), ids.cuda()
    gemv = moe_experts(xc, wc, ic, *layer.stacks(), experts, route="gemv", glu=layer.glu)
    for t in (None, *cuda_moe_tune.ROWS_CANDIDATES):
        got = moe_experts(xc, wc, ic, *layer.stacks(), experts, route="rows", glu=layer.glu,
                          tiles=t)
        assert rel(got.double().cpu(), want) < 2e-2, (t, rel(got.double().cpu(), want))
        assert rel(got.double(), gemv.double()) < 2e-2, t

        def run(xn: torch.Tensor, t=t) -> torch.Tensor:  # noqa: ANN001
            return moe_experts(xn, wc, ic, *layer.stacks(), experts, route="rows",
                               glu=layer.glu, tiles=t)

        assert_replays_as_eager(run, xc.clone())  # new x
        xg = xc.clone()
        run(xg)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(xg)
        w2, ids2 = routing(tokens, experts, k, 5)  # new routing
        wc.copy_(w2.cuda().bfloat16())
        ic.copy_(ids2.cuda())
        graph.replay()
        torch.testing.assert_close(out, run(xg), atol=0, rtol=0)
        wc.copy_(w.cuda().bfloat16())
        ic.copy_(ids.cuda())
