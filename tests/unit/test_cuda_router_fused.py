"""``backends/cuda_router_fused``: a router's GEMM and selection in one launch equals today's two
launches (the GEMM, then ``cuda_router``'s selection kernel) and the torch forms of
``models/moe.Router`` (softmax: renormalised or not, scaled; sigmoid: correction bias, groups,
ties) and ``models/gpt_oss.Router`` (biased logits), at 1, 3, 8 and 40 tokens and the most the
fused launch takes (past it: None, the two launches), expert counts that are and are not powers
of two; the counter back at 0 after every launch; under the Triton interpreter, compiled for
sm_90 (registers, no spills), on a GPU (and under a CUDA graph replayed with new inputs).

Two kinds of input: dyadic values (x and the weight multiples of 1/8, so every order of summing
gives the same logits exactly — ties galore): the fused router equals today's selection kernel
on those logits id for id (the lowest id among equals), weights within a rounding, and the
torch form by value; random normal values: equal to the torch form, ids exactly in float32, by
value where bfloat16 logits round apart.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOKENS = (1, 3, 8, 40)
# (experts, top_k, norm_topk, scale): Qwen3-30B-A3B 128/8; 64/4 scaled; uneven; Qwen3-Next
# 512/10 (2 tokens at most fused); Mixtral 8/2 (64)
SOFTMAX = [(128, 8, True, 1.0), (64, 4, False, 2.5), (60, 4, True, 1.0), (512, 10, True, 1.0),
           (8, 2, True, 1.0)]
# (experts, top_k, n_group, topk_group, norm, scale, bias): GLM-4.7-Flash 64/4 (1 group, 1.8);
# DeepSeek-V3 256/8 in 8 groups keeping 4; uneven groups; no bias; 3 groups keeping 1
SIGMOID = [(64, 4, 1, 1, True, 1.8, True), (256, 8, 8, 4, True, 2.5, True),
           (24, 3, 4, 2, False, 1.0, True), (20, 2, 1, 1, True, 1.0, False),
           (48, 6, 3, 1, True, 1.0, True)]
GPT_OSS = [(32, 4), (20, 3)]  # gpt-oss-20b, uneven
# columns: several splits a block of experts, the last one partial (1000: no multiple of 16)
HIDDEN = {"softmax": 1280, "sigmoid": 1280, "gpt-oss": 1000}


def make(gating: str, case: tuple, hidden: int, g: torch.Generator,
         dyadic: bool) -> torch.nn.Module:
    from pensieve.models import gpt_oss
    from pensieve.models.args import MoEArgs
    from pensieve.models.moe import Router

    def values(*shape: int) -> torch.Tensor:
        if dyadic:
            return torch.randint(-2, 3, shape, generator=g).float() / 8
        return torch.randn(*shape, generator=g) * 2 / hidden ** 0.5  # logits ~ N(0, 4)

    experts = case[0]
    if gating == "gpt-oss":
        moe = MoEArgs(num_experts=experts, top_k=case[1], expert_size=8)
        args = SimpleNamespace(moe=moe, hidden_size=hidden)
        router = gpt_oss.Router(args)  # type: ignore[arg-type]
        with torch.no_grad():
            router.bias.copy_(values(experts))
    elif gating == "softmax":
        _, k, norm, scale = case
        moe = MoEArgs(num_experts=experts, top_k=k, expert_size=8, norm_topk=norm, scale=scale)
        router = Router(SimpleNamespace(moe=moe, hidden_size=hidden))  # type: ignore[arg-type]
    else:
        _, k, n_group, topk_group, norm, scale, bias = case
        moe = MoEArgs(num_experts=experts, top_k=k, expert_size=8, gating="sigmoid",
                      norm_topk=norm, scale=scale, correction_bias=bias, n_group=n_group,
                      topk_group=topk_group)
        router = Router(SimpleNamespace(moe=moe, hidden_size=hidden))  # type: ignore[arg-type]
        if bias:
            router.e_score_correction_bias.copy_(values(experts))
    with torch.no_grad():
        router.weight.copy_(values(experts, hidden))
    return router


def sparse_dyadic(t: int, hidden: int, g: torch.Generator) -> torch.Tensor:
    """x whose logits against a dyadic weight are multiples of 1/64 below 4 in magnitude (a
    fifth of x nonzero, ±1/8: ~8 standard deviations below): exact in bfloat16, whatever the
    order of summing and the rounding (Triton's interpreter truncates to bfloat16)."""
    sign = torch.randint(0, 2, (t, hidden), generator=g) * 2 - 1
    return (sign * (torch.randint(0, 5, (t, hidden), generator=g) == 0)).float() / 8


def torch_form(router: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kernel, fused = router.kernel, router.fused
    sigmoid = getattr(router, "sigmoid_kernel", None)
    router.kernel = router.fused = None
    if sigmoid is not None:
        router.sigmoid_kernel = None
    try:
        return router(x)
    finally:
        router.kernel, router.fused = kernel, fused
        if sigmoid is not None:
            router.sigmoid_kernel = sigmoid


def selection_on_exact_logits(router: torch.nn.Module, x: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Today's selection kernel on the logits summed exactly (float64) and rounded once to the
    torch form's logits dtype — what the fused launch computes on dyadic inputs, where
    float32 sums are exact (a bfloat16 GEMM on the CPU may round partial sums)."""
    bias = getattr(router, "bias", None)
    logits = torch.nn.functional.linear(x.double(), router.weight.double(),
                                        bias.double() if isinstance(bias, torch.Tensor) else None)
    moe = getattr(router, "moe", None)
    if moe is not None and moe.gating == "sigmoid":
        return router.sigmoid_kernel(logits.float())
    logits = logits.to(x.dtype)
    if moe is None:
        return router.kernel(logits, router.top_k)
    return router.kernel(logits, moe.top_k, moe.norm_topk, moe.scale, x.dtype)


def by_id(w: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(sorted=False)`` (sigmoid's torch form) orders picks its own way."""
    ids, order = ids.sort(dim=1)
    return w.gather(1, order), ids


def ranked(router: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the torch form ranks experts by, float32: the logits (softmax, gpt-oss: biased), or
    the biased sigmoid scores."""
    bias = getattr(router, "bias", None)
    if getattr(router, "moe", None) is not None and router.moe.gating == "sigmoid":
        scores = torch.nn.functional.linear(x.float(), router.weight.float()).sigmoid()
        if router.moe.correction_bias:
            scores = scores + router.e_score_correction_bias.float()
        return scores
    return torch.nn.functional.linear(x, router.weight, bias).float()


def check_case(gating: str, case: tuple, device: str, dtype: torch.dtype, dyadic: bool,
               g: torch.Generator) -> None:
    from pensieve.backends import cuda_router

    hidden = HIDDEN[gating]
    router = make(gating, case, hidden, g, dyadic).to(device=device, dtype=dtype)
    assert cuda_router.install(router, fused=True) == 1 and router.fused is not None
    fused = router.fused
    if gating == "sigmoid":
        assert router.weight.dtype == torch.float32  # the torch form's GEMM dtype, kept
    for t in sorted({*TOKENS, fused.max_tokens}):
        x = (sparse_dyadic(t, hidden, g) if dyadic
             else torch.randn(t, hidden, generator=g)).to(device=device, dtype=dtype)
        got = fused(x)
        assert int(fused.counter.item()) == 0, (case, t)  # left at 0 for the next launch
        if t > fused.max_tokens:
            assert got is None
            continue
        got_w, got_ids = got
        via_forward = router(x)  # Router.forward takes the fused launch
        assert torch.equal(via_forward[0], got_w) and torch.equal(via_forward[1], got_ids)
        assert got_ids.dtype == torch.int64 and got_ids.shape == (t, case[1])
        want_w, want_ids = torch_form(router, x)
        assert got_w.dtype == want_w.dtype
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 and gating != "sigmoid" else 2e-6
        if dyadic:  # the same logits exactly: today's selection's picks, id for id
            two_w, two_ids = selection_on_exact_logits(router, x)
            assert torch.equal(got_ids, two_ids), (gating, case, t)
            torch.testing.assert_close(got_w, two_w, rtol=ulp, atol=ulp)
        if gating == "sigmoid":
            got_w, got_ids = by_id(got_w, got_ids)
            want_w, want_ids = by_id(want_w, want_ids)
        if not dyadic and (dtype == torch.float32 or gating == "sigmoid"):
            assert torch.equal(got_ids, want_ids), (gating, case, t)
        if torch.equal(got_ids, want_ids):
            err = (got_w.float() - want_w.float()).abs().max().item()
            # bfloat16 logits may round apart by a unit: the weights by as much relatively
            spread = ranked(router, x).abs().max().item() if ulp > 2e-6 and not dyadic else 0
            bound = ulp * max(1.0, want_w.float().abs().max().item()) * (2 + spread)
            assert err <= bound, (case, t, err, bound)
        else:  # ties (torch.topk takes its own members), bfloat16 logits rounded apart: the
            # same picks by value
            values = ranked(router, x)
            picked = values.gather(1, got_ids).sort(1)[0]
            wanted = values.gather(1, want_ids).sort(1)[0]
            torch.testing.assert_close(picked, wanted, rtol=0,
                                       atol=2 * ulp * values.abs().max().item())
    # a padding row's NaN x still picks experts in range, the other rows as without it
    t = min(3, fused.max_tokens)
    x = torch.randn(t, hidden, generator=g).to(device=device, dtype=dtype)
    clean = fused(x)
    x[-1] = float("nan")
    w, ids = fused(x)
    assert 0 <= int(ids.min()) and int(ids.max()) < case[0]
    assert torch.equal(ids[:-1], clean[1][:-1]) and torch.equal(w[:-1], clean[0][:-1])
    assert int(fused.counter.item()) == 0


def check(gating: str, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    cases = {"softmax": SOFTMAX, "sigmoid": SIGMOID, "gpt-oss": GPT_OSS}[gating]
    for case in cases:
        for dtype in (torch.float32, torch.bfloat16):
            for dyadic in (True, False):
                check_case(gating, case, device, dtype, dyadic, g)


@pytest.mark.parametrize("gating", ["softmax", "sigmoid", "gpt-oss"])
def test_fused_router_equals_two_launches_and_the_torch_form_in_the_triton_interpreter(gating):
    run_in_triton_interpreter("from tests.unit.test_cuda_router_fused import check; "
                              f"check({gating!r}, 'cpu'); print('ok')")


@needs_cuda
@pytest.mark.parametrize("gating", ["softmax", "sigmoid", "gpt-oss"])
def test_fused_router_equals_two_launches_and_the_torch_form_on_cuda(gating):
    check(gating, "cuda")


# the real shapes: (gating, case, hidden) — Qwen3-30B-A3B, GLM-4.7-Flash, DeepSeek-V3,
# gpt-oss-20b
REAL = [("softmax", (128, 8, True, 1.0), 2048), ("sigmoid", (64, 4, 1, 1, True, 1.8, True), 2048),
        ("sigmoid", (256, 8, 8, 4, True, 2.5, True), 7168), ("gpt-oss", (32, 4), 2880)]


@needs_cuda
@pytest.mark.parametrize("gating,case,hidden", REAL)
def test_fused_router_under_a_cuda_graph_replayed_with_new_inputs(gating, case, hidden):
    """Captured once, replayed with changing x: each replay's ids and weights equal today's
    selection on that x's exact logits (a counter left past 0 would leave a replay
    unselected)."""
    from pensieve.backends import cuda_router

    g = torch.Generator().manual_seed(1)
    router = make(gating, case, hidden, g, dyadic=True).to(device="cuda", dtype=torch.bfloat16)
    cuda_router.install(router, fused=True)
    for t in sorted({1, 3, router.fused.max_tokens}):
        x = torch.zeros(t, hidden, device="cuda", dtype=torch.bfloat16)
        router(x)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            w, ids = router(x)
        for _ in range(5):
            x.copy_(sparse_dyadic(t, hidden, g))
            graph.replay()
            want_w, want_ids = selection_on_exact_logits(router, x)
            assert torch.equal(ids, want_ids), (gating, t)
            torch.testing.assert_close(w.float(), want_w.float(), rtol=2 ** -7, atol=2 ** -7)
        assert int(router.fused.counter.item()) == 0


def test_plan_spreads_the_weight_over_programs_of_16_to_64_kb():
    from pensieve.backends.cuda_router_fused import Plan, max_tokens, plan

    assert plan(128, 2048, 2) == Plan(blocks=8, split=4, span=512)  # Qwen3-30B-A3B
    assert plan(64, 2048, 4) == Plan(blocks=4, split=8, span=256)  # GLM-4.7-Flash
    assert plan(512, 2048, 2) == Plan(blocks=32, split=4, span=512)  # Qwen3-Next
    assert plan(256, 7168, 4) == Plan(blocks=16, split=7, span=1024)  # DeepSeek-V3
    assert plan(32, 2880, 2) == Plan(blocks=2, split=6, span=512)  # gpt-oss-20b
    for experts in (8, 64, 128, 256, 512):
        for hidden in (2048, 2880, 4096, 7168):
            for size in (2, 4):
                p = plan(experts, hidden, size)
                assert p.split * p.span >= hidden > (p.split - 1) * p.span
                size_kb = p.span * min(16, experts) * size >> 10
                assert size_kb <= 80 and (size_kb >= 8 or p.split == 1), (experts, hidden)
    assert [max_tokens(e) for e in (8, 32, 64, 128, 256, 512)] == [64, 32, 16, 8, 4, 2]


def test_the_env_switch_keeps_two_launches(monkeypatch):
    from pensieve.backends import cuda_router, cuda_router_fused

    g = torch.Generator().manual_seed(0)
    monkeypatch.setenv("PENSIEVE_ROUTER_FUSED", "0")
    assert not cuda_router_fused.enabled()
    router = make("softmax", SOFTMAX[0], 64, g, dyadic=True)
    cuda_router.install(router)
    assert router.kernel is not None and router.fused is None
    monkeypatch.setenv("PENSIEVE_ROUTER_FUSED", "1")
    cuda_router.install(router)
    assert router.fused is not None and router.fused.counter.device == router.weight.device


def test_fused_router_kernels_compile_for_the_h100_without_spills():
    """sm_90 at the real shapes and every token bucket: registers, no local-memory spills."""
    from tests.helpers.triton_compile import compile_for
    from tests.unit.test_cuda_gdn import _resources

    pytest.importorskip("triton")
    from pensieve.backends import cuda_router, cuda_router_kernels as k

    g = torch.Generator().manual_seed(0)
    common = {"X": "*bf16", "WS": "*fp32", "CNT": "*i32", "IDS": "*i64", "T": "i32",
              "s_x": "i32", "scale": "fp32"}
    for gating, case, hidden in REAL + [("softmax", (512, 10, True, 1.0), 2048)]:
        router = make(gating, case, hidden, g, dyadic=True).to(torch.bfloat16)
        cuda_router.install(router, fused=True)
        w = "*fp32" if gating == "sigmoid" else "*bf16"
        types = {**common, "W": w, "BIAS": w, "WEIGHTS": w}
        kernel = {"softmax": k.fused_softmax, "sigmoid": k.fused_sigmoid,
                  "gpt-oss": k.fused_topk_softmax}[gating]
        for t in (1, 2, 4, 8, 16, 32, 64):
            if t <= router.fused.max_tokens:
                res = _resources(compile_for(kernel, types, router.fused.constexprs(t), 4, 1,
                                                aligned=True))
                assert "STACK:0 " in res, (gating, case, t, res)
