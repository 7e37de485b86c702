"""Fused SiLU·mul and add + RMSNorm (backends/cuda_layers.py) against PyTorch's own ops.

On CPU the kernels run in Triton's interpreter in a fresh process (float32); on a GPU the
compiled kernels are checked in bfloat16, and a tiny Llama with the fused layers gives the
unfused model's logits through the CUDA engine path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pensieve.backends import cuda_layers
from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check(device: str, dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    gu = torch.randn(5, 2 * 1100, generator=gen).to(device, dtype)
    gate, up = gu.chunk(2, dim=-1)
    ref = (F.silu(gate) * up).float()
    got = cuda_layers.silu_mul(gu).float()
    assert ((got - ref).norm() / ref.norm()).item() < tol
    x, y = (torch.randn(5, 300, generator=gen).to(device, dtype) for _ in range(2))
    w = torch.rand(300, generator=gen).to(device, dtype)
    total, normed = cuda_layers.add_rms_norm(x, y, w, 1e-5)
    assert torch.equal(total, x + y)
    ref = F.rms_norm(x + y, (300,), w, 1e-5).float()
    assert ((normed.float() - ref).norm() / ref.norm()).item() < tol
    # an MoE's weighted picks [T, k, H] summed in the same launch, as y.sum(1) then the add
    picks = torch.randn(5, 8, 300, generator=gen).to(device, dtype)
    total3, normed3 = cuda_layers.add_rms_norm(x, picks, w, 1e-5)
    total1, normed1 = cuda_layers.add_rms_norm(x, picks.sum(1), w, 1e-5)
    if dtype == torch.float32:  # summation order aside, the same numbers
        torch.testing.assert_close(total3, total1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(normed3, normed1, atol=1e-5, rtol=1e-5)
    else:  # bfloat16: the float32 sum rounded once, as torch's sum(1) rounds it
        assert ((total3.float() - total1.float()).norm() / total1.float().norm()).item() < tol
        assert ((normed3.float() - normed1.float()).norm() / normed1.float().norm()).item() < tol
    assert not torch.equal(total3, cuda_layers.add_rms_norm(x, picks[:, 0], w, 1e-5)[0])
    # the plain norm (no add) in the same kernel
    ref = F.rms_norm(x, (300,), w, 1e-5).float()
    assert ((cuda_layers.rms_norm(x, w, 1e-5).float() - ref).norm() / ref.norm()).item() < tol


def test_kernels_in_the_triton_interpreter():
    run_in_triton_interpreter("import torch; from tests.unit.test_cuda_layers import check; "
                              "check('cpu', torch.float32, 1e-5); print('ok')")


def test_fusing_keeps_children_and_state_dict():
    from tests.helpers.tiny_engine import tiny_model

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert cuda_layers.fuse_cuda_layers(model) == 2
    assert type(model.model.layers[0]).__name__ == "CudaDecoderLayer"
    assert type(model.model.layers[0].mlp).__name__ == "CudaMLP"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@needs_cuda
def test_compiled_kernels_bf16():
    check("cuda", torch.bfloat16, 1e-2)


@needs_cuda
def test_fused_tiny_model_matches_unfused_on_cuda():
    from pensieve.engine.config import EngineConfig
    from pensieve.backends.torch_backend import torch_engine
    from tests.helpers.tiny_engine import ByteTokenizer, tiny_args, tiny_model
    from tests.unit.test_cuda_attention import PREFIX, _run

    def engine(fused: bool) -> Engine:  # fused before the engine captures its CUDA graphs
        model = tiny_model().to("cuda", torch.bfloat16)
        if fused:
            cuda_layers.fuse_cuda_layers(model)
        cfg = EngineConfig(context_length=512, block_size=4, max_num_seqs=4,
                           max_num_batched_tokens=64, device="cuda", dtype=torch.bfloat16)
        return torch_engine(model, tiny_args(), ByteTokenizer(), cfg)

    prompts = {f"r{i}": PREFIX + f"q{i}" for i in range(3)}
    _, plain = _run(engine(False), prompts, False)
    fused_engine = engine(True)
    _, fused = _run(fused_engine, prompts, False)
    assert fused_engine.runner.graphs.replays > 0
    a, b = next((a, b) for a, b in zip(plain, fused) if a.numel())
    assert ((a - b).norm() / a.norm()).item() < 2e-2
