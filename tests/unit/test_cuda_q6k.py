"""Q6_K on CUDA as 6-bit codes (``backends/cuda_q6k.py``): the file's 210 bytes a 256 weights.

On CPU: the layout against the GGUF bytes (exact values, exact size), the wiring through
``cuda_codes_linear`` (alone, beside Q4_K parts, a Q6_K without its scale factors as int8), and
both kernels in Triton's interpreter (``TRITON_INTERPRET=1``, a fresh process) against
dequantise + matmul at an odd N and K = 768 (three blocks) for 1-40 rows (the skinny and
dequant kernels and the tuner: ``test_cuda_q6k_skinny.py``). With a GPU: the compiled kernels in
bf16/fp16 against float64 at model shapes and under a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from pensieve.backends import cuda_q6k
from pensieve.backends.cuda_int4 import CudaInt4Linear
from pensieve.backends.cuda_int8 import CudaInt8Linear, CudaMixedLinear, cuda_codes_linear
from pensieve.backends.cuda_q6k import CudaQ6KLinear, pack_six, unpack_six
from tests.helpers.cuda_graph_check import assert_replays_as_eager
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.unit.test_cuda_int8 import groups, random_raw, rel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_layer_holds_the_files_bytes_and_values():
    n, k = 45, 768
    raw = random_raw(Q.Q6_K, n, k, seed=3)
    layer = CudaQ6KLinear(groups(Q.Q6_K, n, k, seed=3))
    held = sum(b.nbytes for b in layer.buffers())
    assert held == raw.numel() == cuda_q6k.layout_bytes(n, k)  # 210 bytes a 256 weights
    ref = torch.from_numpy(gguf_dequantize(raw.numpy(), Q.Q6_K).reshape(n, k))
    assert torch.equal(layer.dequantize(), ref)  # d·sc in float32: exact
    ids = torch.tensor([44, 0, 7, 7])
    assert torch.equal(layer.rows(ids), ref[ids])
    layer = layer.to(torch.bfloat16)  # the model's cast leaves codes and scale bits alone
    assert (layer.lo.dtype, layer.hi.dtype, layer.sc.dtype, layer.d.dtype) == (
        torch.uint8, torch.uint8, torch.int8, torch.int16)
    x = torch.randn(3, k)
    torch.testing.assert_close(layer.float()(x), x @ ref.T, atol=1e-4, rtol=1e-4)


def test_pack_six_round_trips():
    codes = torch.randint(-32, 32, (5, 512), dtype=torch.int8)
    lo, hi = pack_six(codes)
    assert lo.shape == (5, 256) and hi.shape == (5, 128)
    assert torch.equal(unpack_six(lo, hi), codes)


def test_wiring_alone_beside_q4_k_and_without_scale_factors():
    import dataclasses

    k = 512
    q6, q4 = groups(Q.Q6_K, 24, k, 1), groups(Q.Q4_K, 32, k, 2)
    assert isinstance(cuda_codes_linear([q6]), CudaQ6KLinear)
    assert isinstance(cuda_codes_linear([q6, q6]), CudaQ6KLinear)  # fused: rows stacked
    bias = torch.randn(88)
    mixed = cuda_codes_linear([q4, q4, q6], bias)  # a Q4_K_M layer's q, k, v
    assert isinstance(mixed, CudaMixedLinear)
    assert [type(m) for m in mixed.parts] == [CudaInt4Linear, CudaQ6KLinear]
    x = torch.randn(2, k)
    w = torch.cat([q4.dequantize(), q4.dequantize(), q6.dequantize()])
    assert rel(mixed(x), (x @ w.T + bias).double()) < 1e-3
    bare = dataclasses.replace(q6, k_scales=None)  # e.g. from a packed cache: int8 codes
    assert isinstance(cuda_codes_linear([bare]), CudaInt8Linear)
    with pytest.raises(ValueError):
        CudaQ6KLinear(bare)


def interpreter_check() -> None:
    """Run under TRITON_INTERPRET=1: gemv and gemm (16-row and larger tiles) on CPU tensors
    against float64, float32 and float16 x, N = 45 (not a multiple of any tile)."""
    n, k = 45, 768
    layer = CudaQ6KLinear([groups(Q.Q6_K, 20, k, seed=11), groups(Q.Q6_K, 25, k, seed=12)])
    w = layer.weight_buffers()
    weight = layer.dequantize().double()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for rows, kernel in ((1, cuda_q6k.gemv), (2, cuda_q6k.gemv), (5, cuda_q6k.gemm),
                             (16, cuda_q6k.gemm), (40, cuda_q6k.gemm)):
            x = torch.randn(rows, k).to(dtype)
            y = kernel(x, w, torch.empty(rows, n, dtype=dtype))
            r = rel(y, x.double() @ weight.T)
            assert r < tol, (dtype, rows, kernel.__name__, r)
    x = torch.randn(3, k)
    for t in (cuda_q6k.GEMM, cuda_q6k.GEMM_SMALL):  # the prefill tiles on a few rows
        y = cuda_q6k.gemm(x, w, torch.empty(3, n), t)
        assert rel(y, x.double() @ weight.T) < 1e-5, t
    out = torch.empty(4, 2 * n)  # a column slice of a wider output (a fused projection)
    cuda_q6k.gemv(x[:1], w, out[:1, n:])
    assert rel(out[:1, n:], x[:1].double() @ weight.T) < 1e-5
    for rows in (1, 7):
        xr = torch.randn(rows, k)
        assert rel(cuda_q6k.q6k_linear(xr, w), xr.double() @ weight.T) < 1e-5
    for rows in (3, 16, 40, 300):  # a plan's "torch" entries: dequantise + matmul
        xr = torch.randn(rows, k)
        plan = {b: ("torch", None) for b in cuda_q6k.BUCKETS}
        assert rel(cuda_q6k.q6k_linear(xr, w, plan), xr.double() @ weight.T) < 1e-5


def test_kernels_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k import interpreter_check as c; "
                              "c(); print('ok')")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels_against_float64(dtype):
    """Every route at odd and model shapes (Qwen3-8B's v, down and a vocabulary-sized head)."""
    for n, k in ((45, 768), (1024, 4096), (4096, 12288), (151936 // 8, 4096)):
        layer = CudaQ6KLinear(groups(Q.Q6_K, n, k, seed=n)).cuda()
        x = torch.randn(300, k, generator=torch.Generator().manual_seed(n)).to(dtype)
        ref = x.cuda().double() @ layer.dequantize().double().T
        for rows in (1, 2, 3, 8, 16, 17, 40, 300):
            y = layer(x[:rows].cuda())
            assert y.dtype == dtype and not torch.isnan(y).any()
            r = rel(y, ref[:rows].cpu())
            assert r < 1e-2, (n, k, rows, r)
        ids = torch.tensor([0, n - 1, 5], device="cuda")
        assert torch.equal(layer.rows(ids), layer.dequantize()[ids])


@needs_cuda
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_q6k_layer_in_a_cuda_graph(rows):
    k = 768
    q4, q6 = groups(Q.Q4_K, 64, k, 1), groups(Q.Q6_K, 32, k, 2)
    for layer in (cuda_codes_linear([q4, q4, q6], torch.randn(160)), CudaQ6KLinear(q6)):
        layer = layer.to(device="cuda", dtype=torch.bfloat16)
        assert_replays_as_eager(layer, torch.randn(rows, k, device="cuda", dtype=torch.bfloat16))


def test_random_bytes_cover_every_code():
    """The checks above see every 6-bit code and both signs of sub-scales (random bytes)."""
    g = groups(Q.Q6_K, 45, 768, seed=3)
    assert set(np.unique(g.codes.numpy())) == set(range(-32, 32))
    assert (g.k_scales[0] < 0).any() and (g.k_scales[0] > 0).any()


def compile_tiles(dtype: str, choices: list) -> None:
    """Each (kernel, tiles) of ``choices`` built for sm_90 with x in ``dtype``."""
    from pensieve.backends import cuda_q6k_kernels as kernels
    from tests.helpers.triton_compile import compile_for

    types = {"X": f"*{dtype}", "LO": "*u8", "HI": "*u8", "SC": "*i8", "D": "*i16",
             "Y": f"*{dtype}", "OUT": f"*{dtype}", "WS": "*fp32", "CNT": "*i32", "M": "i32",
             "N": "i32", "GROUPS": "i32", "G_PER": "i32", "stride_x": "i32", "stride_y": "i32"}
    for name, t in choices:
        if name == "gemv":
            fn, consts = kernels.gemv, {"BLOCK_N": t.block_n, "BLOCK_G": t.block_g}
        elif name == "skinny":
            fn, consts = kernels.skinny, {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n,
                                          "BLOCK_G": t.block_g, "SPLIT_K": t.split_k,
                                          "EVEN": t.split_k == 1}
        elif name == "dequant":
            fn, consts = kernels.dequant, {"BLOCK_N": t.block_n, "BLOCK_G": t.block_g}
        else:
            fn, consts = kernels.gemm, {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n,
                                        "BLOCK_G": max(2, t.block_g), "GROUP_M": t.group_m}
        assert compile_for(fn, types, consts, t.num_warps, t.num_stages) is not None, (name, t)


def test_default_tiles_compile_for_the_h100():
    """Each bucket's default kernel and tiles built for sm_90 in bfloat16 here (no GPU needed:
    Triton's own ptxas): what the interpreter cannot see (a layout or tile the compiler
    refuses, bfloat16 bit tricks the interpreter does not model)."""
    compile_tiles("bf16", sorted(set(cuda_q6k.default_plan(4096).values()), key=str))


@pytest.mark.slow
def test_default_tiles_compile_in_float32():
    """A float32 model's kernels (IEEE products, the float32 unpack)."""
    compile_tiles("fp32", sorted(set(cuda_q6k.default_plan(4096).values()), key=str))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_every_candidate_compiles_for_the_h100(dtype):
    from pensieve.backends import cuda_q6k_tune as tune

    choices = [("gemv", t) for t in tune.GEMV_CANDIDATES]
    choices += [("skinny", t) for ts in tune.SKINNY_CANDIDATES.values() for t in ts]
    choices += [("gemm", t) for ts in tune.GEMM_CANDIDATES.values() for t in ts]
    choices += [("dequant", t) for t in tune.DEQUANT_CANDIDATES]
    compile_tiles(dtype, choices)
