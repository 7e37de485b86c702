"""``backends/cuda_router``'s one-launch softmax selection equals ``models/moe.Router``'s torch
form (weights and expert ids, best first): renormalised or not, scaled, expert counts that are
and are not powers of two; under the Triton interpreter, compiled for sm_90, on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (experts, top_k, norm_topk, scale): Qwen3.6-35B-A3B's 256/8; Qwen3-Next 512/10; others
CASES = [(256, 8, True, 1.0), (512, 10, True, 1.0), (60, 4, False, 2.5), (8, 2, True, 1.0)]


def check(device: str, dtype: torch.dtype) -> None:
    from pensieve.backends.cuda_router import softmax_topk
    from pensieve.models.args import MoEArgs
    from pensieve.models.moe import Router

    g = torch.Generator().manual_seed(0)
    for experts, k, norm, scale in CASES:
        moe = MoEArgs(num_experts=experts, top_k=k, expert_size=8, norm_topk=norm, scale=scale)
        router = Router(SimpleNamespace(moe=moe, hidden_size=32))  # type: ignore[arg-type]
        with torch.no_grad():
            router.weight.copy_(torch.randn(experts, 32, generator=g))
        router = router.to(device=device, dtype=dtype)
        x = torch.randn(7, 32, generator=g).to(device=device, dtype=dtype)
        want_w, want_ids = router(x)
        router.kernel = softmax_topk
        got_w, got_ids = router(x)
        assert got_ids.dtype == torch.int64 and got_w.dtype == want_w.dtype
        if dtype == torch.float32:
            assert torch.equal(got_ids, want_ids), (experts, k)
        else:  # bfloat16 logits tie: equal picks by value (torch.topk's order among ties is its own)
            logits = torch.nn.functional.linear(x, router.weight)
            assert torch.equal(logits.gather(1, got_ids), logits.gather(1, want_ids)), (experts, k)
        err = (got_w.float() - want_w.float()).abs().max().item()
        ulp = 1e-6 if dtype == torch.float32 else 2.0 ** -7  # one rounding to bfloat16 apart
        assert err <= ulp * max(1.0, want_w.float().abs().max().item()), (experts, k, err)
    # a padding row's NaN logits still pick experts in range (the expert kernels index by them)
    _, ids = softmax_topk(torch.full((2, 60), float("nan"), device=device, dtype=dtype), 4, True,
                          1.0, dtype)
    assert 0 <= int(ids.min()) and int(ids.max()) < 60


def test_router_selection_equals_the_torch_form_in_the_triton_interpreter():
    run_in_triton_interpreter("import torch; from tests.unit.test_cuda_router import check; "
                              "check('cpu', torch.float32); check('cpu', torch.bfloat16); "
                              "print('ok')")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_selection_equals_the_torch_form_on_cuda(dtype):
    check("cuda", dtype)


def test_router_kernel_compiles_for_the_h100():
    from tests.helpers.triton_compile import compile_for

    pytest.importorskip("triton")
    from pensieve.backends.cuda_router import _kernel

    for e, k, warps in ((256, 8, 1), (512, 10, 4)):
        kp = 1 << (k - 1).bit_length()
        assert compile_for(_kernel(), {"LOGITS": "*bf16", "WEIGHTS": "*bf16", "IDS": "*i64",
                                       "s_row": "i32", "scale": "fp32"},
                           {"E": e, "E_PAD": e, "K": k, "K_PAD": kp, "NORM": True}, warps,
                           1) is not None
