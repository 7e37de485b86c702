"""Latent-attention blocks (GLM-4.7-Flash, DeepSeek-V3) in the fused CUDA body
(``backends/cuda_layers.py``: ``CudaMLADecoderLayer`` under ``CudaLlamaBody``).

On CPU, in Triton's interpreter: a tiny GLM-4.7-Flash's family declares the fused layers, fusing
switches every block, the dense and shared MLPs and the body, and the fused model's logits over a
paged latent cache (whole prefill; chunks then decodes) are the unfused model's; ``add_rms_norm``
with an MoE's unsummed picks and a shared expert's output (``Picks``) against the sum then the
add. With a GPU: a tiny GLM-4.7-Flash GGUF with Q4_0 experts served by the engine on CUDA (the
expert kernels, their picks and the shared expert summed in the fused add + norm, the hybrid
decode graphs) gives the same file's float path's greedy tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pensieve.backends import cuda_layers
from tests.helpers.triton_interpreter import run_in_triton_interpreter

transformers = pytest.importorskip("transformers")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _glm(**overrides):  # noqa: ANN003, ANN202
    from tests.unit.test_mla_families import CASES, DIMS

    cls, extra = CASES["glm4_moe_lite"]
    return getattr(transformers, cls)(**{**DIMS, **extra, "first_k_dense_replace": 1,
                                         **overrides})


def check_picks_add_rms_norm(device: str, dtype: torch.dtype) -> None:
    """``Picks`` (k weighted rows a token + a shared row) summed and added in one launch: the
    same numbers as the block's own ``picks.sum(1) + shared`` then ``x + that`` + the norm."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(4)
    t, k, h = 5, 4, 300
    x = torch.randn(t, h, generator=gen).to(device, dtype)
    rows = torch.randn(t, k, h, generator=gen).to(device, dtype)
    shared = torch.randn(t, h, generator=gen).to(device, dtype)
    w = torch.rand(h, generator=gen).to(device, dtype)
    picks = cuda_layers.Picks(rows, shared)
    total, normed = cuda_layers.add_rms_norm(x, picks, w, 1e-5)
    want = x + (rows.sum(1) + shared)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(picks.total(), rows.sum(1) + shared, atol=0, rtol=0)
    assert ((total.float() - want.float()).norm() / want.float().norm()).item() < tol
    ref = F.rms_norm(want, (h,), w, 1e-5).float()
    assert ((normed.float() - ref).norm() / ref.norm()).item() < tol
    # the shared row counts: without it the sum differs
    alone = cuda_layers.add_rms_norm(x, cuda_layers.Picks(rows, None), w, 1e-5)[0]
    assert not torch.allclose(alone.float(), total.float(), atol=1e-3)


def check_fused_mla_model() -> None:
    from pensieve.engine.config import EngineConfig
    from pensieve.backends.torch_backend import build_model
    from pensieve.loaders.registry import load_checkpoint
    from pensieve.models.deepseek_mla import MLADecoderLayer, latent_layout
    from pensieve.models.moe import GLMMoE
    from tests.helpers.paged_run import paged_logits, prompt
    from tests.helpers.tiny_families import VOCAB, save_hf
    from tests.helpers.tiny_moe import moe_model
    import tempfile
    from pathlib import Path

    ckpt = load_checkpoint(save_hf(Path(tempfile.mkdtemp()) / "hf", moe_model(_glm())))
    model = build_model(ckpt, EngineConfig(context_length=64))
    assert model.fast_paths.cuda_fused_layers  # the family declares it
    assert all(type(layer) is MLADecoderLayer for layer in model.model.layers)
    fused = copy.deepcopy(model)
    assert cuda_layers.fuse_cuda_layers(fused) == 3
    layers = fused.model.layers
    assert all(type(layer) is cuda_layers.CudaMLADecoderLayer for layer in layers)
    assert type(layers[0].mlp) is cuda_layers.CudaMLP  # the dense first layer
    assert type(layers[1].mlp) is GLMMoE
    assert type(layers[1].mlp.shared_experts) is cuda_layers.CudaMLP
    assert type(fused.model) is cuda_layers.CudaLlamaBody
    # the norms no fused step absorbed: GLM's q_a_layernorm (and the latent one, which the MLA
    # RoPE kernel still takes)
    from pensieve.backends import cuda_hybrid_mla_rope

    assert type(layers[1].self_attn.q_a_layernorm) is cuda_layers.CudaRMSNorm
    assert cuda_hybrid_mla_rope.install(fused) == 3
    ids = prompt(19, VOCAB, seed=3)
    layout = latent_layout(ckpt.args)
    for a, b in zip(paged_logits(model, ckpt.args, ids, [4, 8], layout),
                    paged_logits(fused, ckpt.args, ids, [4, 8], layout)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_fused_mla_model_and_picks_in_the_triton_interpreter():
    run_in_triton_interpreter(
        "import torch; import tests.unit.test_cuda_fused_mla as t; "
        "t.check_picks_add_rms_norm('cpu', torch.float32); t.check_fused_mla_model(); "
        "print('ok')")


def test_gated_shared_experts_are_not_picked():
    """A sigmoid-gated shared expert (Qwen2-MoE) keeps the block's own forward: its gate is
    not in the fused add."""
    from pensieve.models.args import ModelArgs, MoEArgs
    from pensieve.models.moe import MoE

    args = ModelArgs(architecture="qwen2_moe", vocab_size=32, hidden_size=16,
                     intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                     head_dim=8, max_position_embeddings=64,
                     moe=MoEArgs(4, 2, 8, shared_size=8, shared_gate=True))
    block = MoE(args)
    torch.nn.init.normal_(block.gate.weight)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 16)
    out = cuda_layers.moe_picks(block, x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, block(x))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_picks_add_rms_norm_compiled(dtype):
    check_picks_add_rms_norm("cuda", dtype)


@needs_cuda
def test_glm_lite_gguf_fused_on_cuda_gives_the_float_paths_greedy_tokens(tmp_path):
    """Q4_0 experts as codes on the kernels, the picks and the shared expert summed in the
    fused add + norm, under the hybrid decode graphs; against the same file dequantised on
    load (float experts: no picks), float32 on the GPU: the same greedy tokens."""
    from gguf import GGMLQuantizationType as Q

    from pensieve.backends.cuda_moe import CudaMoEExperts
    from pensieve.backends.torch_backend import build_model
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.paged_run import prompt
    from tests.helpers.tiny_families import VOCAB
    from tests.helpers.tiny_mla import write_mla_gguf
    from tests.helpers.tiny_moe import moe_model, quantize_experts_like_gguf
    from tests.unit.test_cuda_moe import cuda_tokens

    ref = moe_model(_glm(hidden_size=256, intermediate_size=256, moe_intermediate_size=256))
    quantize_experts_like_gguf(ref, Q.Q4_0)
    path = write_mla_gguf(tmp_path / "glm-q4_0.gguf", ref, expert_qtype=Q.Q4_0)
    cfg = EngineConfig(context_length=64, device="cuda", dtype=torch.float32)
    codes_ckpt = load_checkpoint(path, keep_int4=True)
    codes = build_model(codes_ckpt, cfg)
    assert sum(isinstance(m, CudaMoEExperts) for m in codes.modules()) == 2
    assert type(codes.model) is cuda_layers.CudaLlamaBody
    picked = []
    real = cuda_layers.moe_picks

    def counting(mlp, x):  # noqa: ANN001, ANN202
        out = real(mlp, x)
        picked.append(isinstance(out, cuda_layers.Picks) and out.shared is not None)
        return out

    cuda_layers.moe_picks = counting
    try:
        float_ckpt = load_checkpoint(path)
        reference = build_model(float_ckpt, cfg)
        for seed in range(3):
            ids = prompt(20, VOCAB, seed=seed)
            ours, engine = cuda_tokens(codes, codes_ckpt, ids, 8)
            theirs, _ = cuda_tokens(reference, float_ckpt, ids, 8)
            assert ours == theirs, seed
    finally:
        cuda_layers.moe_picks = real
    assert any(picked)  # the codes model's sparse layers took the picks with the shared row
