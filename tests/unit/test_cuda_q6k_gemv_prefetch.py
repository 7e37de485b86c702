"""The Q6_K 1-row GEMV's prefetching tiles (``cuda_q6k_kernels.gemv`` with PREFETCH: the next
step's code bytes loaded before this step's products): in Triton's interpreter equal to the
plain tiles bit for bit over several steps (K = 768 is 24 groups: 3 steps of 8, the last one
reloading itself) and against float64; compiled for sm_90 in bfloat16. On a GPU: equal to the
plain tiles at the Qwen3-8B ffn_down shape."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends import cuda_q6k
from pensieve.backends.cuda_q6k import CudaQ6KLinear, Tiles
from pensieve.backends.cuda_q6k_tune import GEMV_CANDIDATES
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.unit.test_cuda_int8 import groups, rel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PREFETCHING = [t for t in GEMV_CANDIDATES if t.prefetch]


def plain(t: Tiles) -> Tiles:
    return Tiles(t.block_m, t.block_n, t.block_g, t.num_warps, t.num_stages, t.group_m)


def check(device: str, n: int, k: int, dtype: torch.dtype) -> None:
    layer = CudaQ6KLinear([groups(Q.Q6_K, n, k, seed=3)]).to(device)
    w = layer.weight_buffers()
    weight = layer.dequantize().double().cpu()
    assert PREFETCHING
    for t in PREFETCHING:
        for rows in (1, 2):
            x = torch.randn(rows, k).to(device, dtype)
            y = cuda_q6k.gemv(x, w, torch.empty(rows, n, device=device, dtype=dtype), t)
            ref = cuda_q6k.gemv(x, w, torch.empty(rows, n, device=device, dtype=dtype), plain(t))
            assert torch.equal(y, ref), t
            assert rel(y.cpu(), x.double().cpu() @ weight.T) < (1e-5 if dtype == torch.float32
                                                                 else 1e-2), t


def test_prefetching_tiles_in_the_interpreter():
    run_in_triton_interpreter("import torch; from tests.unit.test_cuda_q6k_gemv_prefetch "
                              "import check; check('cpu', 45, 768, torch.float32); print('ok')")


def test_prefetching_tiles_compile_for_the_h100():
    from pensieve.backends import cuda_q6k_kernels as kernels
    from tests.helpers.triton_compile import compile_for

    types = {"X": "*bf16", "LO": "*u8", "HI": "*u8", "SC": "*i8", "D": "*i16", "Y": "*bf16",
             "N": "i32", "GROUPS": "i32", "stride_x": "i32", "stride_y": "i32"}
    for t in PREFETCHING:
        consts = {"BLOCK_N": t.block_n, "BLOCK_G": t.block_g, "PREFETCH": True}
        assert compile_for(kernels.gemv, types, consts, t.num_warps, t.num_stages) is not None


def test_describe_tells_the_prefetching_tiles_apart():
    from pensieve.backends.cuda_q6k_tune import describe

    t = PREFETCHING[0]
    assert describe(("gemv", t)) != describe(("gemv", plain(t)))


@needs_cuda
def test_prefetching_tiles_on_the_gpu():
    check("cuda", 4096, 12288, torch.bfloat16)
