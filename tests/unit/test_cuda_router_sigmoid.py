"""``backends/cuda_router``'s one-launch sigmoid selection (GLM-4.5/4.7-Flash, DeepSeek-V3)
equals ``models/moe.Router``'s torch form: the correction bias, grouped top-k (n_group /
topk_group), renormalised or not, scaled; tied scores; NaN padding rows in range; under the
Triton interpreter, compiled for sm_90, on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (experts, top_k, n_group, topk_group, norm, scale, bias): GLM-4.7-Flash 64/4 (1 group, 1.8);
# DeepSeek-V3 256/8 in 8 groups keeping 4 (2.5); GLM-4.5 128/8; uneven group sizes
CASES = [(64, 4, 1, 1, True, 1.8, True), (256, 8, 8, 4, True, 2.5, True),
         (128, 8, 1, 1, True, 2.5, True), (24, 3, 4, 2, False, 1.0, True),
         (20, 2, 1, 1, True, 1.0, False), (48, 6, 3, 1, True, 1.0, True)]


def _router(experts, k, n_group, topk_group, norm, scale, bias, g):
    from pensieve.models.args import MoEArgs
    from pensieve.models.moe import Router

    moe = MoEArgs(num_experts=experts, top_k=k, expert_size=8, gating="sigmoid",
                  norm_topk=norm, scale=scale, correction_bias=bias, n_group=n_group,
                  topk_group=topk_group)
    router = Router(SimpleNamespace(moe=moe, hidden_size=32))  # type: ignore[arg-type]
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, 32, generator=g))
        if bias:
            router.e_score_correction_bias.copy_(torch.randn(experts, generator=g) * 0.3)
    return router


def _by_id(w: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, order = ids.sort(dim=1)
    return w.gather(1, order), ids


def check(device: str) -> None:
    from pensieve.backends import cuda_router

    g = torch.Generator().manual_seed(0)
    for case in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            router = _router(*case, g).to(device=device, dtype=dtype)
            x = torch.randn(9, 32, generator=g).to(device=device, dtype=dtype)
            x[3] = x[2]  # two equal rows
            want_w, want_ids = router(x)
            # the standalone kernel (``test_cuda_router_fused``: the fused launch)
            assert cuda_router.install(router, fused=False) == 1
            assert router.sigmoid_kernel is not None
            assert router.weight.dtype == torch.float32  # kept float32: no cast a step
            got_w, got_ids = router(x)
            assert got_ids.dtype == torch.int64 and got_w.dtype == torch.float32
            # torch.topk(sorted=False) orders its picks its own way: compare by expert id
            want_w, want_ids = _by_id(want_w, want_ids)
            got_w, got_ids = _by_id(got_w, got_ids)
            assert torch.equal(got_ids, want_ids), case
            err = (got_w - want_w).abs().max().item()
            assert err <= 2e-6 * max(1.0, want_w.abs().max().item()), (case, err)
    # ties: experts of equal logits and bias (groups 0-2 tie on their two best too). torch.topk
    # takes its own members of a tie (on this CPU not the lowest ids); the kernel the lowest:
    # the same selection by value (scores and weights), the kernel's rule deterministic
    router = _router(32, 4, 4, 2, True, 1.0, True, g).to(device)
    with torch.no_grad():
        router.weight[8:16] = router.weight[0]
        router.weight[16:24] = router.weight[0]
        router.weight[0:8] = router.weight[0]
        router.e_score_correction_bias.zero_()
    x = torch.randn(5, 32, generator=g).to(device)
    logits = torch.nn.functional.linear(x, router.weight)
    want_w, want_ids = router(x)
    cuda_router.install(router, fused=False)
    got_w, got_ids = router(x)
    assert torch.equal(logits.gather(1, got_ids).sort(1)[0], logits.gather(1, want_ids).sort(1)[0])
    assert torch.allclose(got_w.sort(1)[0], want_w.sort(1)[0], atol=1e-6)
    tied = got_ids[logits.gather(1, got_ids) == logits[:, :1]]  # picks tied with expert 0
    assert tied.numel() and (tied < 24).all()
    for row, ids in zip(logits, got_ids):  # among equals the lowest ids
        for v in row[ids].unique():
            members = (row == v).nonzero().flatten()
            n = int((row[ids] == v).sum())
            assert torch.equal(ids[row[ids] == v].sort()[0], members[:n]), (row, ids)
    # a padding row's NaN logits still pick experts in range (the expert kernels index by them)
    _, ids = cuda_router.sigmoid_topk(torch.full((2, 256), float("nan"), device=device), None,
                                      8, 8, 4, True, 1.0)
    assert 0 <= int(ids.min()) and int(ids.max()) < 256


def test_sigmoid_selection_equals_the_torch_form_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_router_sigmoid import check; "
                              "check('cpu'); print('ok')")


@needs_cuda
def test_sigmoid_selection_equals_the_torch_form_on_cuda():
    check("cuda")


def test_sigmoid_router_kernel_compiles_for_the_h100():
    from tests.helpers.triton_compile import compile_for

    pytest.importorskip("triton")
    from pensieve.backends.cuda_router import _sigmoid_kernel

    # GLM-4.7-Flash (64 experts, 1 group), DeepSeek-V3 (8 groups of 32, 4 kept)
    for g, s, kg, k, warps in ((1, 64, 1, 4, 1), (8, 32, 4, 8, 2)):
        assert compile_for(_sigmoid_kernel(), {"LOGITS": "*fp32", "BIAS": "*fp32",
                                               "WEIGHTS": "*fp32", "IDS": "*i64",
                                               "s_row": "i32", "scale": "fp32"},
                           {"G": g, "G_PAD": g, "S": s, "S_PAD": s, "KG": kg, "K": k,
                            "K_PAD": k, "HAS_BIAS": True, "NORM": True}, warps,
                           1) is not None
