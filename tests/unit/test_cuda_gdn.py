"""The fused Gated DeltaNet kernels (``backends/cuda_gdn.py``) equal the layer's torch path
(``models/qwen3_next.GatedDeltaNet`` without a ``step_kernel``): outputs and the conv and
recurrent states left in the slots, for a step mixing decode rows and chunks, cached and fresh
sequences, a chunk over ``max_tokens`` (left to the torch path), both value-head orders and
both projection layouts, the gated norm fused and not (``block_v``); and a static decode step (``RecurrentStates.cached``).

Under the Triton interpreter on the CPU (tiny shapes), compiled for sm_90 ahead of time at the
real Qwen3.5/3.6 shapes, and on a GPU where there is one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HK, HV, DK, DV, KERNEL, HIDDEN = 2, 4, 16, 12, 4, 32
# (query_len, context_len): decode cached; chunk cached; fresh chunk; fresh decode; long chunk
# cached (over max_tokens: the torch path); a chunk shorter than the conv window, cached
STEP = [(1, 9), (5, 12), (3, 3), (1, 1), (9, 20), (2, 7)]
MAX_TOKENS = 6


def _layer(order: str, layout: str, dtype: torch.dtype, device: str, g: torch.Generator):
    from pensieve.models.hybrid_config import GatedDeltaArgs
    from pensieve.models.qwen3_next import GatedDeltaNet

    d = GatedDeltaArgs(HK, HV, DK, DV, KERNEL, qkvz=layout, ba=layout, order=order)
    args = SimpleNamespace(hidden_size=HIDDEN, rms_norm_eps=1e-6, extra={"gated_delta": d})
    m = GatedDeltaNet(args, 0)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        m.norm.weight.add_(1.0)
    return m.to(device=device, dtype=dtype)


def _states(slots: int, dtype: torch.dtype, device: str, g: torch.Generator):
    c = 2 * HK * DK + HV * DV
    conv = torch.randn(slots + 1, c, KERNEL - 1, generator=g).to(device)
    ssm = (torch.randn(slots + 1, HV, DK, DV, generator=g) * 0.3).to(device)
    return conv, ssm


def check(device: str, dtype: torch.dtype, tol: float) -> None:
    from pensieve.backends.cuda_gdn import GatedDeltaKernel
    from pensieve.models.forward_context import ForwardContext, RecurrentStates, SequenceSlice

    g = torch.Generator().manual_seed(0)
    # Qwen3.5's flat projections (split views, no copies) in both head orders; Qwen3-Next's
    # interleaved groups
    for order, layout in (("grouped", "flat"), ("tiled", "flat"), ("grouped", "interleaved")):
        m = _layer(order, layout, dtype, device, g)
        seqs, start = [], 0
        for q, c in STEP:
            seqs.append(SequenceSlice(start, q, c, torch.zeros(1, dtype=torch.int64)))
            start += q
        x = torch.randn(start, HIDDEN, generator=g).to(device=device, dtype=dtype)
        conv, ssm = _states(len(STEP) + 2, dtype, device, g)
        slots = torch.tensor([3, 0, 5, 1, 2, 7], device=device)

        def run(kernel, x=x, seqs=seqs, slots=slots, cached=None):
            c, s = conv.clone(), ssm.clone()
            states = RecurrentStates([c], [s], slots, cached=cached)
            ctx = ForwardContext([], [], torch.zeros(0), seqs, torch.zeros(0), states=states)
            m.step_kernel = kernel
            with torch.no_grad():
                return m(x, ctx).float(), c, s

        want, conv_w, ssm_w = run(None)
        for block_v in (None, 4):
            got, conv_g, ssm_g = run(GatedDeltaKernel(max_tokens=MAX_TOKENS, block_v=block_v))
            for name, a, b in (("out", got, want), ("conv", conv_g, conv_w), ("ssm", ssm_g, ssm_w)):
                err = (a - b).abs().max().item()
                assert err <= tol * max(1.0, b.abs().max().item()), (order, block_v, name, err)
        # a static decode step: row i is sequence i's token, cached read off the device
        n = 3
        dec = [SequenceSlice(i, 1, 2, torch.zeros(1, dtype=torch.int64)) for i in range(n)]
        cached = torch.tensor([True, False, True], device=device)
        xs, sl = x[:n], slots[:n]
        want, conv_w, ssm_w = run(None, xs, dec, sl, cached)
        got, conv_g, ssm_g = run(GatedDeltaKernel(), xs, dec, sl, cached)
        for name, a, b in (("out", got, want), ("conv", conv_g, conv_w), ("ssm", ssm_g, ssm_w)):
            err = (a - b).abs().max().item()
            assert err <= tol * max(1.0, b.abs().max().item()), (order, "static", name, err)
    print("ok")


def test_fused_gated_delta_equals_the_torch_path_in_the_triton_interpreter():
    run_in_triton_interpreter("import torch; from tests.unit.test_cuda_gdn import check; "
                              "check('cpu', torch.float32, 2e-5)")


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_fused_gated_delta_equals_the_torch_path_on_cuda(dtype, tol, monkeypatch):
    # the reference is the plain torch delta rule: on CUDA the layer's torch path would otherwise
    # take fla-core's chunked kernels, whose TF32 dots are ~3e-4 relative off in float32 (H100,
    # 2026-12-07: 0.0108 on outputs of ~30) — the fused kernel walks tokens in exact float32
    from pensieve.models import gated_delta
    monkeypatch.setattr(gated_delta, "_fla", lambda: None)
    check("cuda", dtype, tol)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_the_h100_at_the_real_shapes(dtype):
    """Qwen3.5/3.6's layer (16 key heads, 32 value heads, 128 dims, conv 4): both kernels
    built for sm_90 (Triton's own ptxas, no GPU), the state tile held without spilling; a
    static decode step's ``cached`` flags are a bool tensor."""
    from tests.helpers.triton_compile import compile_for

    pytest.importorskip("triton")
    from pensieve.backends.cuda_gdn_kernels import conv_step, delta_step

    conv = compile_for(conv_step, {
        "X": f"*{dtype}", "Y": f"*{dtype}", "W": f"*{dtype}", "CONV": "*fp32", "STARTS": "*i64",
        "LENS": "*i64", "SLOTS": "*i64", "CACHED": "*i64", "C": "i32", "sx": "i32", "sy": "i32",
        "sc_slot": "i32", "sc_ch": "i32"}, {"K": 4, "BC": 256, "DECODE": False}, 4, 1)
    assert conv is not None
    for bv, norm, warps in ((128, True, 8), (32, False, 4)):
        for decode in (True, False):
            k = compile_for(delta_step, {
                "Y": f"*{dtype}", "A": f"*{dtype}", "B": f"*{dtype}", "Z": f"*{dtype}",
                "A_LOG": f"*{dtype}", "DT_BIAS": f"*{dtype}", "NORM_W": f"*{dtype}",
                "SSM": "*fp32", "OUT": f"*{dtype}", "STARTS": "*i64", "LENS": "*i64",
                "SLOTS": "*i64", "CACHED": "*i1" if decode else "*i64", "sy": "i32", "sab": "i32", "sz_row": "i32",
                "so_row": "i32", "ss_slot": "i32", "ss_head": "i32", "eps": "fp32"},
                {"HK": 16, "DK": 128, "DK_PAD": 128, "HV": 32, "DV": 128, "BV": bv,
                 "TILED": True, "NORM": norm, "DECODE": decode}, warps, 1)
            assert "STACK:0 " in _resources(k), (bv, decode, _resources(k))


def _resources(kernel) -> str:
    """cuobjdump's resource line for a compiled kernel (``STACK:n``: bytes of spills)."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("this Triton ships no cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        done = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    return next((line for line in done.stdout.splitlines() if "REG:" in line), done.stdout)
