"""The one-layout int4 kernels: ``gemv_words`` (decode) and the dequantising ``gemm`` (prefill),
the per-bucket ``Plan``, ``prepare``'s checked and timed choice, and the KV cache's share of the
GPU (``--gpu-memory-fraction``).

The kernels run on this CPU under Triton's interpreter (float32 and float16 x: the interpreter's
bfloat16 is not faithful), on the GPU against float64 and inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from pensieve.backends import cuda_int4, model_runner
from pensieve.backends.cuda_int4 import GEMM_BUCKETS, CudaInt4Linear, Gemm, Plan, Words
from pensieve.engine.config import EngineConfig
from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_weight(n: int, k: int, seed: int, device: str = "cpu", sym: bool = False):
    """Packed random codes with Q4_1-like scales/offsets (``sym``: Q4_0's, offsets −8 · scale,
    held as the scales alone), and the float32 weight they are."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half().float()
    packed = cuda_int4.pack_codes(codes).to(device)
    if sym:
        so = cuda_int4.pack_scales(scales).to(device)
    else:
        offsets = -8 * scales + torch.randn(n, k // 32, generator=gen) * 1e-3
        so = cuda_int4.pack_scale_offset(scales, offsets).to(device)
    return packed, so, cuda_int4.unpack(packed, so)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()


def interpreter_check() -> None:
    """Run under TRITON_INTERPRET=1: N not a multiple of the tiles, K of 448 (14 groups: the
    gemv's masked last step, the gemm's BLOCK_G cut to 2) and 256 (even steps), float32 and
    float16 x, every route of ``int4_linear`` that needs no GPU copy."""
    for n, k, dtype, tol, sym in ((40, 448, torch.float32, 1e-5, False),
                                  (24, 256, torch.float16, 2e-3, False),
                                  (40, 448, torch.float32, 1e-5, True),
                                  (24, 256, torch.float16, 2e-3, True)):
        packed, so, weight = random_weight(n, k, n, sym=sym)
        assert cuda_int4.symmetric(so) == sym
        x = torch.randn(3, k).to(dtype)
        ref = x.double() @ weight.double().T
        for t in (Words(8, 32, 1), Words(4, 4, 1)):
            assert _rel(cuda_int4.gemv_words(x[:1], packed, so, t), ref[:1]) < tol, (n, k, t)
            assert _rel(cuda_int4.gemv_words(x, packed, so, t), ref) < tol, (n, k, t)
        x = torch.randn(40, k).to(dtype)
        ref = x.double() @ weight.double().T
        assert _rel(cuda_int4.gemm(x, packed, so, Gemm(32, 16, 8, 4, 1, 2)), ref) < tol, (n, k)
        if sym:  # the older kernels on the scales-only form
            tiles = cuda_int4.Tiles(16, 16, 2, 4, 1)
            assert _rel(cuda_int4.gemv(x[:2], packed, so, tiles), ref[:2]) < tol
            assert _rel(cuda_int4.matmul(x, packed, so, tiles), ref) < tol
            assert _rel(cuda_int4.skinny(x[:5], packed, so, cuda_int4.Skinny(16, 2, 2 if k == 256 else 1, 4, 1)),
                        ref[:5]) < 2e-3
            torch.testing.assert_close(cuda_int4.dequantize(packed, so, torch.float32, tiles),
                                       weight)
    plan = cuda_int4.default_plan(k)
    plan.gemm = {b: Gemm(16, 16, 2, 4, 1) for b in GEMM_BUCKETS}
    for route in ("words", "gemv", "gemm", "dequant"):
        plan.route = {b: route for b in plan.route}
        x = torch.randn(20 if route in ("gemm", "dequant") else 1, k)
        got = cuda_int4.int4_linear(x, packed, so, plan=plan)
        assert _rel(got, x.double() @ weight.double().T) < 1e-5, route
    print("ok")


def test_kernels_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_int4_gemm import interpreter_check; "
                              "interpreter_check()")


def test_q4_0_keeps_the_files_size_and_values():
    """A Q4_0 weight (offsets −8 · scale) keeps its float16 scales alone: 18 bytes a 32-weight
    block as in the file, the file's own values; a fused Q4_0 + Q4_1 keeps pairs."""
    from gguf import GGMLQuantizationType as Q

    from pensieve.loaders.int4_codes import int4_groups
    from pensieve.loaders.quants import dequantize
    from tests.unit.test_int4_codes import random_blocks

    raw = random_blocks(Q.Q4_0, 48, 256, 5)
    groups = int4_groups(raw, Q.Q4_0, (48, 256))
    layer = CudaInt4Linear([groups]).to(torch.bfloat16)
    assert layer.scale_offset.dtype == torch.int16
    assert layer.packed.nbytes + layer.scale_offset.nbytes == raw.numel() == 48 * 256 * 18 // 32
    assert torch.equal(cuda_int4.unpack(layer.packed, layer.scale_offset),
                       dequantize(raw, Q.Q4_0, (48, 256)))
    q4_1 = int4_groups(random_blocks(Q.Q4_1, 16, 256, 6), Q.Q4_1, (16, 256))
    assert CudaInt4Linear([groups, q4_1]).scale_offset.dtype == torch.int32


def test_plan_buckets_and_defaults():
    plan = Plan({1: "words", 2: "gemv", 4: "skinny", 8: "skinny", 16: "skinny", 32: "gemm",
                 256: "dequant", 2048: "gemm"})
    assert plan.kernel(1) == ("words", 1)
    assert plan.kernel(3) == ("skinny", 4)
    assert plan.kernel(17) == ("gemm", 32)
    assert plan.kernel(200) == ("dequant", 256)
    assert plan.kernel(10_000) == ("gemm", 2048)  # past the last bucket: the last
    # K of 4096: a skinny tile fits; K of 64: none does, so 2-16 rows go to the gemm
    assert cuda_int4.default_plan(4096).route[8] == "skinny"
    small = cuda_int4.default_plan(64)
    assert small.skinny is None and small.route[8] == "gemm" and small.route[2048] == "gemm"
    assert cuda_int4.default_plan(4096, dense=torch.zeros(1)).route[256] == "dense"
    for bucket in GEMM_BUCKETS:
        assert bucket in cuda_int4.GEMM_CANDIDATES


@pytest.mark.parametrize("fraction,in_use,expect", [(0.9, 10, 80 * 0.9 - 10 - 4),
                                                     (0.5, 38, 0), (1.0, 0, 76)])
def test_kv_budget_is_the_fraction_less_what_is_on_the_gpu(monkeypatch, fraction, in_use, expect):
    """KV bytes = fraction × the card − everything already on it (weights, other programs)
    − the headroom, never negative; the blocks follow from it (at least one full context)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: ((80 - in_use) * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    config = EngineConfig(device="cuda", gpu_memory_fraction=fraction, context_length=1024)
    budget = model_runner.kv_budget(config)
    assert budget == pytest.approx(max(0, expect) * gib, abs=1)


def test_gpu_memory_fraction_is_checked():
    with pytest.raises(ValueError):
        EngineConfig(gpu_memory_fraction=0)
    with pytest.raises(ValueError):
        EngineConfig(gpu_memory_fraction=1.5)


@needs_cuda
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (4608, 3584), (96, 4096)])
def test_words_and_gemm_against_float64_and_in_a_graph(n, k, sym):
    """gemv_words (every candidate) at 1-2 rows and the gemm (every candidate) at 17-600 rows
    on bf16 x, both weight forms, and gemv_words replayed from a CUDA graph."""
    packed, so, weight = random_weight(n, k, n + k, "cuda", sym)
    weight = weight.double().cpu()
    for rows in (1, 2):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double().cpu() @ weight.T
        for t in cuda_int4.WORDS_CANDIDATES:
            assert _rel(cuda_int4.gemv_words(x, packed, so, t), ref) < 1e-2, (t, rows)
    for rows in (17, 600):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double().cpu() @ weight.T
        for cands in cuda_int4.GEMM_CANDIDATES.values():
            for t in cands:
                assert _rel(cuda_int4.gemm(x, packed, so, t), ref) < 1e-2, (t, rows)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    cuda_int4.gemv_words(x, packed, so)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda_int4.gemv_words(x, packed, so)
    for _ in range(2):
        x.normal_()
        graph.replay()
        assert _rel(y, x.double().cpu() @ weight.T) < 1e-2


@needs_cuda
@pytest.mark.parametrize("keep_dense", [False, True])
def test_prepare_plans_one_layout_unless_asked(keep_dense):
    """prepare: a timed plan for every layer, no extra copy unless keep_dense; the layer then
    gives the dequantised product at every bucket."""
    from pensieve.backends.cuda_int4_tune import prepare
    from pensieve.models.quant_linear import Int4Groups

    torch.manual_seed(0)
    parts = [Int4Groups(torch.randint(0, 16, (256, 512), dtype=torch.uint8),
                        torch.rand(256, 16) * 0.02 + 1e-3, torch.randn(256, 16) * 0.01, 32)]
    model = torch.nn.Sequential(CudaInt4Linear(parts), CudaInt4Linear(parts)).cuda()
    prepare(model, torch.bfloat16, keep_dense=keep_dense, reps=3)
    layer = model[0]
    assert isinstance(layer.plan, Plan) and model[1].plan is layer.plan
    assert (layer.dense is not None) == keep_dense
    weight = cuda_int4.unpack(layer.packed, layer.scale_offset).double().cpu()
    for rows in (1, 2, 5, 16, 30, 200, 3000):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        assert _rel(layer(x), x.double().cpu() @ weight.T) < 1e-2, (rows, layer.plan.kernel(rows))


def test_prepare_leaves_out_wrong_and_failing_candidates(monkeypatch):
    """``fastest`` keeps only candidates that build and give the dequantised product, then
    the quickest of those (timing stubbed: the choice logic, on the CPU)."""
    from pensieve.backends import cuda_int4_tune as tune
    from pensieve.models.quant_linear import Int4Groups

    torch.manual_seed(1)
    layer = CudaInt4Linear([Int4Groups(torch.randint(0, 16, (32, 64), dtype=torch.uint8),
                                       torch.rand(32, 2) * 0.02 + 1e-3, torch.randn(32, 2) * 0.01,
                                       32)])
    weight = cuda_int4.unpack(layer.packed, layer.scale_offset)
    monkeypatch.setattr(tune, "dequantize", lambda packed, so, dtype: cuda_int4.unpack(packed, so))
    x = torch.randn(3, 64)
    times = {"right_slow": 9.0, "right_fast": 2.0, "wrong": 1.0, "broken": 0.5}
    monkeypatch.setattr(tune, "gpu_us", lambda run, sample, reps: times[run.__name__])

    def named(name, fn):
        fn.__name__ = name
        return fn

    def broken(m):
        raise RuntimeError("no such tile")

    runs = {"right_slow": named("right_slow", lambda m: x @ weight.T),
            "right_fast": named("right_fast", lambda m: x @ weight.T),
            "wrong": named("wrong", lambda m: x @ weight.T * 1.1),
            "broken": named("broken", broken)}
    best, timed = tune.fastest(runs, [layer], x, 3)
    assert best == "right_fast" and set(timed) == {"right_slow", "right_fast"}
    assert tune.fastest({"wrong": runs["wrong"]}, [layer], x, 3) == (None, {})
