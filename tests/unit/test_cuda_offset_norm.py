"""``backends/cuda_offset_norm``'s one-launch OffsetRMSNorm equals the module's torch form
(``models/qwen3_next.OffsetRMSNorm``) on 2-D rows, 3-D heads and the strided query half of the
gated attention's ``[q | gate]`` heads; under the Triton interpreter, compiled for sm_90, and on
a GPU where there is one."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check(device: str, dtype: torch.dtype) -> None:
    from pensieve.backends.cuda_offset_norm import offset_rms_norm
    from pensieve.models.qwen3_next import OffsetRMSNorm

    g = torch.Generator().manual_seed(0)
    for dim, shape in ((64, (5, 64)), (16, (3, 4, 16)), (24, (2, 3, 48)), (2048, (2, 2048))):
        norm = OffsetRMSNorm(dim, 1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(dim, generator=g) * 0.3)
        norm = norm.to(device)
        x = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
        if shape[-1] != dim:  # the query half of [q | gate] per head: a strided view
            x = x.chunk(2, dim=-1)[0]
        want = norm(x)
        got = offset_rms_norm(x, norm.weight, norm.eps)
        assert got.dtype == want.dtype and got.shape == want.shape
        err = (got.float() - want.float()).abs().max().item()
        # float32 math, one rounding to the dtype at the end in both: at most one ulp apart
        ulp = 0.0 if dtype == torch.float32 else 2.0 ** -7
        assert err <= max(1e-5, ulp * want.float().abs().max().item()), (shape, err)


def test_offset_norm_equals_the_module_in_the_triton_interpreter():
    run_in_triton_interpreter("import torch; from tests.unit.test_cuda_offset_norm import "
                              "check; check('cpu', torch.float32); check('cpu', torch.bfloat16); print('ok')")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_offset_norm_equals_the_module_on_cuda(dtype):
    check("cuda", dtype)


def test_offset_norm_compiles_for_the_h100():
    from tests.helpers.triton_compile import compile_for

    pytest.importorskip("triton")
    from pensieve.backends.cuda_offset_norm import _kernel

    for d, warps in ((128, 1), (2048, 4)):
        assert compile_for(_kernel(), {"X": "*bf16", "W": "*bf16", "OUT": "*bf16", "n_inner": "i32",
                                       "s_outer": "i32", "s_inner": "i32", "eps": "fp32"},
                           {"D": d, "BLOCK": d}, warps, 1) is not None
