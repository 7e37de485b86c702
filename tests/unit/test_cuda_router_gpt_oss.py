"""``backends/cuda_router``'s one-launch gpt-oss selection (top-k of the biased logits, then a
softmax over those k) equals ``models/gpt_oss.Router``'s torch form: ids best first (float32),
tied bfloat16 logits picked by value, weights within a rounding; NaN rows in range; under the
Triton interpreter, compiled for sm_90, on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CASES = [(32, 4), (128, 4), (20, 3)]  # gpt-oss-20b, gpt-oss-120b, uneven


def check(device: str) -> None:
    from pensieve.backends import cuda_router
    from pensieve.models.args import MoEArgs
    from pensieve.models.gpt_oss import Router

    g = torch.Generator().manual_seed(0)
    for experts, k in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            moe = MoEArgs(num_experts=experts, top_k=k, expert_size=8)
            router = Router(SimpleNamespace(moe=moe, hidden_size=32))  # type: ignore[arg-type]
            with torch.no_grad():
                router.weight.copy_(torch.randn(experts, 32, generator=g))
                router.bias.copy_(torch.randn(experts, generator=g))
            router = router.to(device=device, dtype=dtype)
            x = torch.randn(7, 32, generator=g).to(device=device, dtype=dtype)
            want_w, want_ids = router(x)
            # the standalone kernel (``test_cuda_router_fused``: the fused launch)
            assert cuda_router.install(router, fused=False) == 1 and router.kernel is not None
            got_w, got_ids = router(x)
            assert got_ids.dtype == torch.int64 and got_w.dtype == want_w.dtype
            logits = torch.nn.functional.linear(x, router.weight, router.bias)
            if dtype == torch.float32:
                assert torch.equal(got_ids, want_ids), (experts, k)
            else:  # bfloat16 logits tie: the same picks by value
                assert torch.equal(logits.gather(1, got_ids), logits.gather(1, want_ids))
            ulp = 1e-6 if dtype == torch.float32 else 2.0 ** -7
            assert (got_w.float() - want_w.float()).abs().max().item() <= ulp, (experts, k)
    _, ids = cuda_router.topk_softmax(torch.full((2, 32), float("nan"), device=device), 4)
    assert 0 <= int(ids.min()) and int(ids.max()) < 32


def test_gpt_oss_selection_equals_the_torch_form_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_router_gpt_oss import check; "
                              "check('cpu'); print('ok')")


@needs_cuda
def test_gpt_oss_selection_equals_the_torch_form_on_cuda():
    check("cuda")


def test_gpt_oss_router_kernel_compiles_for_the_h100():
    from tests.helpers.triton_compile import compile_for

    pytest.importorskip("triton")
    from pensieve.backends.cuda_router import _topk_softmax_kernel

    for e in (32, 128):
        assert compile_for(_topk_softmax_kernel(), {"LOGITS": "*bf16", "WEIGHTS": "*bf16",
                                                    "IDS": "*i64", "s_row": "i32"},
                           {"E": e, "E_PAD": e, "K": 4, "K_PAD": 4}, 1, 1) is not None
