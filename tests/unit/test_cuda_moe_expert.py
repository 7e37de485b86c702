"""The expert-major MoE GEMV (``backends/cuda_moe_expert.py``): each picked expert's weights
once for all the tokens that picked it. In Triton's interpreter against float64 torch experts:
int4 / q4k (Q4_K's own factors) / 6-bit / int8 codes at 2-16 tokens (tokens sharing experts, an expert nobody picked),
gpt-oss's MXFP4 experts with biases and the clamped SwiGLU, the same picks as ``pick_gemv``;
the route's switch; compiled for sm_90 at gpt-oss-20b's and GLM-4.7-Flash's expert shapes; on
a GPU in bfloat16 and under a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends import cuda_moe, cuda_moe_expert
from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_route_switch_and_sharing():
    auto = {cuda_moe_expert.ENV_SWITCH: "auto"}
    assert not cuda_moe_expert.wanted(8, 32, 4, {})  # off by default (slower on the H100)
    assert cuda_moe_expert.wanted(8, 32, 4, auto)  # gpt-oss-20b: ~1.5 picks an expert
    assert not cuda_moe_expert.wanted(8, 64, 4, auto)  # GLM-4.7-Flash: ~1.24 at 8 tokens
    assert cuda_moe_expert.wanted(16, 64, 4, auto)  # ~1.55 at 16
    assert cuda_moe_expert.wanted(8, 64, 4, {cuda_moe_expert.ENV_SWITCH: "1"})
    assert not cuda_moe_expert.wanted(8, 256, 8, auto)  # Qwen3.6-35B-A3B: ~1.11
    assert cuda_moe_expert.wanted(8, 256, 8, {cuda_moe_expert.ENV_SWITCH: "1"})
    assert not cuda_moe_expert.wanted(8, 32, 4, {cuda_moe_expert.ENV_SWITCH: "0"})
    assert not cuda_moe_expert.wanted(1, 32, 4, {cuda_moe_expert.ENV_SWITCH: "1"})  # 1 token
    assert not cuda_moe_expert.wanted(17, 32, 4, {cuda_moe_expert.ENV_SWITCH: "1"})
    assert abs(cuda_moe_expert.expected_sharing(1, 32, 4) - 1.0) < 1e-9


def interpreter_check() -> None:
    """Run with TRITON_INTERPRET=1: the kernels on CPU tensors against float64 torch."""
    from pensieve.backends.cuda_moe import Tiles, moe_experts, reference_experts
    from tests.unit.test_cuda_int8 import rel
    from tests.unit.test_cuda_moe import MIXES, make_layer, routing
    from tests.unit.test_cuda_moe_mxfp4 import clamped_experts, random_layer

    cuda_moe.GEMV = cuda_moe.GEMV_FEW = Tiles(1, 64, 256, 4, 2)
    cuda_moe_expert.BLOCK_N = 64  # fewer programs: the interpreter runs each in turn
    experts, k = 7, 3
    for i, (gu, dn, hidden, inner) in enumerate(MIXES):
        layer = make_layer(gu, dn, hidden, inner, experts, seed=30 + i)
        gate_up, down = (w.double() for w in layer.dequantize())
        for tokens in (2, 5, 16) if i == 0 else (5,):
            w, ids = routing(tokens, experts, k, tokens + i)
            if tokens == 5:  # every token picks expert 1; none picks expert 6
                ids = torch.stack([torch.tensor([1, (2 + t) % 6, (3 + t) % 6 or 4])
                                   for t in range(tokens)])
                ids[:, 1:] = torch.where(ids[:, 1:] == 1, 5, ids[:, 1:])
            x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
            ref = reference_experts(x.double(), w.double(), ids, gate_up, down)
            got = moe_experts(x, w, ids, *layer.stacks(), experts, route="experts")
            assert rel(got, ref) < 1e-5, (gu.name, dn.name, tokens, rel(got, ref))
            gemv = moe_experts(x, w, ids, *layer.stacks(), experts, route="gemv")
            assert rel(got, gemv.double()) < 1e-5
    # gpt-oss: MXFP4 as int8 codes, biases on both projections, the clamp binding; K = 2880
    # (45 steps of 64)
    for experts, hidden, inner, tokens, seed in ((4, 64, 32, 6, 0), (3, 2880, 64, 2, 2)):
        layer = random_layer(experts, hidden, inner, seed)
        ref = clamped_experts(layer)
        w, ids = routing(tokens, experts, 2, seed)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = ref(x.double(), w.double(), ids)
        got = moe_experts(x, w, ids, *layer.stacks(), experts, route="experts", glu=layer.glu)
        assert rel(got, want) < 1e-5, (experts, hidden, rel(got, want))
    # the default route: by expected sharing (7 experts at top-3, 4 tokens: 1.7), the same
    # result
    x = torch.randn(4, 256)
    layer = make_layer(*MIXES[0], experts, seed=3)
    w, ids = routing(4, experts, k, 3)
    import os

    os.environ[cuda_moe_expert.ENV_SWITCH] = "auto"  # this check runs in its own interpreter
    assert cuda_moe_expert.wanted(4, experts, k)
    assert torch.equal(moe_experts(x, w, ids, *layer.stacks(), experts),
                       moe_experts(x, w, ids, *layer.stacks(), experts, route="experts"))


@pytest.mark.slow
def test_expert_gemv_equals_float64_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_moe_expert import interpreter_check "
                              "as c; c(); print('ok')")


@pytest.mark.parametrize("fmt", ["int8", "int4", "six", "q4k"])
def test_expert_gemv_compiles_for_the_h100(fmt):
    """bfloat16, gate/up fused (SiLU or gpt-oss's clamp, biased) and down routed, at 16 rows,
    without register spills."""
    from pensieve.backends import cuda_moe_expert_kernels as kernels
    from tests.helpers.triton_compile import compile_for
    from tests.unit.test_cuda_gdn import _resources

    types = {"X": "*bf16", "IDS": "*i64", "RW": "*fp32", "W": "*u8", "S": "*i16", "MN": "*i16",
             "D": "*i16", "B": "*bf16", "Y": "*bf16", "T": "i32", "N": "i32", "K": "i32",
             "stride_x": "i32", "stride_y": "i32"}
    if fmt != "int8":
        types.update(S={"int4": "*i32", "six": "*i8", "q4k": "*i32"}[fmt], MN="*u8")
    gpt_oss = fmt == "int8"
    base = dict(TOPK=4, K_PAD=4, INT4=fmt == "int4", SIX=fmt == "six", Q4K=fmt == "q4k",
                GS=32 if fmt != "six" else 16, HAS_MIN=False, HAS_BIAS=gpt_oss, BLOCK_M=16,
                BLOCK_N=cuda_moe_expert.BLOCK_N, BLOCK_K=cuda_moe_expert.BLOCK_K)
    for fuse in (True, False):
        act = dict(SWIGLU=fuse and gpt_oss, ALPHA=1.702 if fuse and gpt_oss else 0.0,
                   LIMIT=7.0 if fuse and gpt_oss else 0.0)
        consts = dict(base, **act, GATHER=fuse, FUSE=fuse, ROUTED=not fuse)
        built = compile_for(kernels.expert_gemv, types, consts, cuda_moe_expert.NUM_WARPS,
                            cuda_moe_expert.NUM_STAGES)
        assert "STACK:0 " in _resources(built), (fmt, fuse, _resources(built))  # no spills


@needs_cuda
def test_expert_gemv_on_cuda_in_bfloat16_and_under_a_graph():
    """gpt-oss-20b's routing and hidden width (32 experts, top-4, K = 2880; the expert width
    cut to 256 to keep the float64 reference small), MXFP4 as int8 codes with biases, at 8
    tokens: the expert-major route against ``pick_gemv``'s and float64, and replayed from a
    CUDA graph with new routing."""
    from pensieve.backends.cuda_moe import moe_experts
    from tests.unit.test_cuda_int8 import rel
    from tests.unit.test_cuda_moe import routing
    from tests.unit.test_cuda_moe_mxfp4 import clamped_experts, random_layer

    experts, tokens = 32, 8
    layer = random_layer(experts, 2880, 256, 0)
    ref = clamped_experts(layer)
    w, ids = routing(tokens, experts, 4, 0)
    x = torch.randn(tokens, 2880) * 0.05
    with torch.no_grad():
        want = ref(x.double(), w.double(), ids)
    layer = layer.cuda()
    xc, wc, ic = x.cuda().bfloat16(), w.cuda().bfloat16(), ids.cuda()
    got = moe_experts(xc, wc, ic, *layer.stacks(), experts, route="experts", glu=layer.glu)
    gemv = moe_experts(xc, wc, ic, *layer.stacks(), experts, route="gemv", glu=layer.glu)
    assert rel(got.double().cpu(), want) < 2e-2 and rel(got.double(), gemv.double()) < 2e-2
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = moe_experts(xc, wc, ic, *layer.stacks(), experts, route="experts", glu=layer.glu)
    w2, ids2 = routing(tokens, experts, 4, 5)
    wc.copy_(w2.cuda().bfloat16())
    ic.copy_(ids2.cuda())
    graph.replay()
    with torch.no_grad():
        want2 = ref(x.double(), w2.double(), ids2)
    assert rel(out.double().cpu(), want2) < 2e-2
