"""Fewer launches a decode layer (backends/cuda_layers.py): the end-of-layer residual add fused
with the next layer's input RMSNorm (``CudaLlamaBody``) and Qwen3's q/k RMSNorms inside
``rope_and_store`` (``cuda_rope_kernels.rope_norm``), each against the unfused path.

On CPU (Triton's interpreter, a fresh process): ``rope_and_store(qk_norm=...)`` against
``F.rms_norm`` then the unfused RoPE kernel on strided q/k/v views (float32 and bfloat16:
equal outputs and caches), tiny Llama and Qwen3 models with the fused body against the
unfused model over a paged cache (whole and chunked prefill, decodes), and the kernel
compiled for sm_90. With a GPU: the same checks compiled, and a tiny Qwen3 through the CUDA
engine (graphs on) fused vs unfused.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pensieve.backends import cuda_layers
from pensieve.models.args import ModelArgs
from pensieve.models.llama import LlamaForCausalLM
from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny(arch: str, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama-block model; ``qwen3``: q/k norms and a head_dim of its own."""
    args = ModelArgs(architecture=arch, vocab_size=257, hidden_size=64, intermediate_size=128,
                     num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=32 if arch == "qwen3" else 16, max_position_embeddings=512,
                     qk_norm=arch == "qwen3")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(args).eval()
    with torch.no_grad():  # norms away from 1, sharper logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(20)
    return model


def check_rope_norm(device: str, dtype: torch.dtype) -> None:
    from pensieve.backends.cuda_attention import rope_and_store
    from pensieve.models.rope import RotaryEmbedding

    gen = torch.Generator().manual_seed(0)
    t, hq, hk, d = 5, 6, 2, 64
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(device, dtype) * 3
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
    qw, kw = (torch.rand(d, generator=gen).add(0.5).to(device, dtype) for _ in range(2))
    cos_sin = tuple(c.to(device, dtype) for c in
                    RotaryEmbedding(d, 64, 10000.0, None).lookup(torch.arange(7, 7 + t)))
    slots = torch.tensor([9, 2, 30, 17, 4], device=device)
    caches = [torch.zeros(8, 4, hk, d, device=device, dtype=dtype) for _ in range(4)]
    fused = rope_and_store(q, k, v, cos_sin, slots, caches[0], caches[1], (qw, kw, 1e-6))
    ref = rope_and_store(F.rms_norm(q, (d,), qw, 1e-6), F.rms_norm(k, (d,), kw, 1e-6), v,
                         cos_sin, slots, caches[2], caches[3])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused, ref, **tol)
    torch.testing.assert_close(caches[0], caches[2], **tol)
    assert torch.equal(caches[1], caches[3])  # v copied as is
    assert caches[0].abs().sum() > 0
    # the same rounding points: (nearly) every value equal (Triton's interpreter truncates
    # float32 → bfloat16 instead of rounding, so only compiled kernels are held to it)
    if dtype == torch.bfloat16 and device == "cuda":
        assert (fused == ref).float().mean() > 0.99


def check_fused_models() -> None:
    from tests.helpers.paged_run import paged_logits, prompt

    for arch in ("llama", "qwen3"):
        model = tiny(arch)
        fused = copy.deepcopy(model)
        assert cuda_layers.fuse_cuda_layers(fused) == 3
        assert type(fused.model) is cuda_layers.CudaLlamaBody
        attn = type(fused.model.layers[0].self_attn)
        assert attn is (cuda_layers.CudaAttention if arch == "qwen3" else
                        type(model.model.layers[0].self_attn))
        ids = prompt(11, 257, seed=3)
        for a, b in zip(paged_logits(model, model.args, ids, [4, 8]),
                        paged_logits(fused, model.args, ids, [4, 8])):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def tiny_moe(seed: int = 0):  # noqa: ANN201
    """A 3-layer Qwen3-MoE-shaped model (q/k norms, 4 experts top-2 renormalised, a shared
    expert, layer 0 dense)."""
    from pensieve.models.args import MoEArgs
    from pensieve.models.moe import MoEForCausalLM

    args = ModelArgs(architecture="qwen3_moe", vocab_size=257, hidden_size=64,
                     intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=32, max_position_embeddings=512, qk_norm=True,
                     moe=MoEArgs(4, 2, 32, norm_topk=True, shared_size=48,
                                 dense_layers=frozenset({0})))
    torch.manual_seed(seed)
    model = MoEForCausalLM(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "experts" in name or name.endswith("mlp.gate.weight"):  # made as torch.empty
                p.normal_(0, 0.1)
        model.lm_head.weight.mul_(20)
    return model


def check_fused_moe_model() -> None:
    """A uniform MoE model fused (its declared ``cuda_fused_layers``): every block's
    post-attention add + norm in one launch, q/k-normed attentions and the dense / shared
    MLPs switched, the body's residual adds fused with the next norms; logits as before."""
    from pensieve.models.moe import MoE
    from tests.helpers.paged_run import paged_logits, prompt

    model = tiny_moe()
    assert model.fast_paths.cuda_fused_layers  # the family declares it
    fused = copy.deepcopy(model)
    assert cuda_layers.fuse_cuda_layers(fused) == 3
    assert all(type(layer) is cuda_layers.CudaMoEDecoderLayer for layer in fused.model.layers)
    assert all(type(layer.self_attn) is cuda_layers.CudaAttention for layer in fused.model.layers)
    assert type(fused.model.layers[0].mlp) is cuda_layers.CudaMLP
    assert isinstance(fused.model.layers[1].mlp, MoE)
    assert type(fused.model.layers[1].mlp.shared_expert) is cuda_layers.CudaMLP
    assert type(fused.model) is cuda_layers.CudaLlamaBody
    ids = prompt(11, 257, seed=3)
    for a, b in zip(paged_logits(model, model.args, ids, [4, 8]),
                    paged_logits(fused, model.args, ids, [4, 8])):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def check_swiglu_mlp() -> None:
    """A CudaMLP over an int4 gate/up weight: the one-launch SiLU·up form (``swiglu`` set, 1
    row) gives what the GEMV + silu_mul give (2 rows: the unfused path either way)."""
    from pensieve.backends.cuda_int4_gemv_wide import Wide, gemv_wide

    model = tiny("llama").to(torch.bfloat16)
    cuda_layers.fuse_cuda_layers(model)
    mlp = model.model.layers[0].mlp
    gu = int4_gate_up(mlp)
    k = gu.in_features
    gen = torch.Generator().manual_seed(6)
    tiles = Wide(8, 32, 1)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    mlp.swiglu = tiles
    ref = mlp.down_proj(cuda_layers.silu_mul(gemv_wide(x, gu.packed, gu.scale_offset, tiles)))
    torch.testing.assert_close(mlp(x), ref, atol=0, rtol=0)
    x = torch.randn(2, k, generator=gen).to(torch.bfloat16)  # 2 rows: the plain path
    fused_2 = mlp(x)
    mlp.swiglu = None
    torch.testing.assert_close(fused_2, mlp(x), atol=0, rtol=0)


def test_rope_norm_and_fused_models_in_the_interpreter():
    run_in_triton_interpreter(
        "import torch; import tests.unit.test_cuda_fused_decode as t; "
        "t.check_rope_norm('cpu', torch.float32); t.check_rope_norm('cpu', torch.bfloat16); "
        "t.check_fused_models(); t.check_fused_moe_model(); t.check_swiglu_mlp(); print('ok')")


def test_fusing_keeps_the_state_dict_and_leaves_other_bodies():
    for arch in ("llama", "qwen3"):
        model = tiny(arch)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        cuda_layers.fuse_cuda_layers(model)
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    model = tiny("llama")
    model.model.layers[1].__class__ = type("OtherLayer", (type(model.model.layers[1]),), {})
    cuda_layers.fuse_cuda_layers(model)  # one layer not a plain DecoderLayer: body unfused
    assert type(model.model) is not cuda_layers.CudaLlamaBody


def test_opt_out_keeps_only_the_per_layer_fusions(monkeypatch):  # noqa: ANN001
    monkeypatch.setenv("PENSIEVE_FUSED_DECODE", "0")
    model = tiny("qwen3")
    assert cuda_layers.fuse_cuda_layers(model) > 0
    assert type(model.model) is not cuda_layers.CudaLlamaBody
    assert not any(type(m) is cuda_layers.CudaAttention for m in model.modules())
    assert all(type(layer) is cuda_layers.CudaDecoderLayer for layer in model.model.layers)
    monkeypatch.delenv("PENSIEVE_FUSED_DECODE")
    model = tiny("qwen3")
    cuda_layers.fuse_cuda_layers(model)
    assert type(model.model) is cuda_layers.CudaLlamaBody
    assert any(type(m) is cuda_layers.CudaAttention for m in model.modules())


def test_rope_norm_compiles_for_the_h100():
    from pensieve.backends import cuda_rope_kernels
    from tests.helpers.triton_compile import compile_for

    names = ("Q", "K", "V", "COS", "SIN", "SLOTS", "QO", "KC", "VC", "QW", "KW")
    types = {n: "*bf16" for n in names} | {"SLOTS": "*i64", "eps": "fp32"}
    types |= {n: "i32" for n in ("sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h", "scos",
                                 "ssin", "sc_tok", "sc_head")}
    for hq, hk, d in ((32, 8, 128), (64, 4, 128), (40, 8, 128)):  # 8B / 32B-ish / padded
        consts = dict(HQ=hq, HK=hk, HQ_PAD=1 << (hq - 1).bit_length(),
                      HK_PAD=1 << (hk - 1).bit_length(), HALF=d // 2, HALF_PAD=d // 2)
        assert compile_for(cuda_rope_kernels.rope_norm, types, consts, 4, 1) is not None


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_norm_compiled(dtype):
    check_rope_norm("cuda", dtype)


@needs_cuda
def test_fused_qwen3_matches_unfused_through_the_cuda_engine():
    from pensieve.backends.torch_backend import torch_engine
    from pensieve.engine.config import EngineConfig
    from tests.helpers.tiny_engine import ByteTokenizer
    from tests.unit.test_cuda_attention import PREFIX, _run

    def engine(fused: bool):  # noqa: ANN202 - fused before the engine captures its graphs
        model = tiny("qwen3").to("cuda", torch.bfloat16)
        if fused:
            cuda_layers.fuse_cuda_layers(model)
        cfg = EngineConfig(context_length=512, block_size=4, max_num_seqs=4,
                           max_num_batched_tokens=64, device="cuda", dtype=torch.bfloat16)
        return torch_engine(model, model.args, ByteTokenizer(), cfg)

    prompts = {f"r{i}": PREFIX + f"q{i}" for i in range(3)}
    _, plain = _run(engine(False), prompts, False)
    fused_engine = engine(True)
    _, fused = _run(fused_engine, prompts, False)
    assert type(fused_engine.runner.model.model) is cuda_layers.CudaLlamaBody
    assert fused_engine.runner.graphs.replays > 0
    pairs = [(a, b) for a, b in zip(plain, fused) if a.numel()]
    assert pairs
    for a, b in pairs:
        assert ((a - b).norm() / a.norm()).item() < 2e-2


def int4_gate_up(mlp, seed: int = 5):  # noqa: ANN001, ANN201
    """``mlp.gate_up_proj`` replaced by random Q4_0 codes of its shape (a CudaInt4Linear)."""
    from pensieve.backends.cuda_int4 import CudaInt4Linear
    from pensieve.models.quant_linear import Int4Groups

    gen = torch.Generator().manual_seed(seed)
    n, k = mlp.gate_up_proj.out_features, mlp.gate_up_proj.in_features
    scales = torch.rand(n, k // 32, generator=gen) * 0.05 + 0.01
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    mlp.gate_up_proj = CudaInt4Linear([Int4Groups(codes, scales, -8 * scales, 32)])
    return mlp.gate_up_proj


def test_plan_fused_mlps_leaves_models_without_wide_tiles():
    model = tiny("llama")
    cuda_layers.fuse_cuda_layers(model)
    int4_gate_up(model.model.layers[0].mlp)  # no plan: nothing timed
    assert cuda_layers.plan_fused_mlps(model, torch.bfloat16) == ""
    assert cuda_layers.plan_fused_mlps(model, torch.float16) == ""
    assert all(layer.mlp.swiglu is None for layer in model.model.layers)


@needs_cuda
def test_plan_fused_mlps_on_the_gpu():
    from pensieve.backends.cuda_int4 import default_plan
    from pensieve.backends.cuda_int4_gemv_wide import Wide

    model = tiny("llama")
    cuda_layers.fuse_cuda_layers(model)
    for layer in model.model.layers:
        int4_gate_up(layer.mlp, seed=layer.self_attn.layer)
    model = model.to("cuda", torch.bfloat16)
    for layer in model.model.layers:
        layer.mlp.gate_up_proj.plan = default_plan(64)
        layer.mlp.gate_up_proj.plan.wide = Wide(8, 32, 1)
    note = cuda_layers.plan_fused_mlps(model, torch.bfloat16, reps=3)
    assert "fused" in note  # checked right and timed (kept or not)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 64, device="cuda").to(torch.bfloat16)
    fused = mlp(x)
    mlp.swiglu = None
    torch.testing.assert_close(fused, mlp(x), atol=2e-2, rtol=2e-2)
