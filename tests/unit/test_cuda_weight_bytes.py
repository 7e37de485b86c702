"""What a CUDA model's weights hold against the GGUF's tensor bytes (issue 11: ≤ 1.1×), on CPU.

A small random Qwen3 file in llama.cpp's Q4_K_M mix (``bench/make_random_gguf.py``: Q4_K
everywhere, the token table too, Q6_K ``attn_v``/``ffn_down`` on the ``use_more_bits`` layers
and a Q6_K output) is planned and placed for CUDA on the CPU (``torch_backend.place_weights``:
the CUDA layers' buffers are built before the move), cast to bfloat16 and counted
(``weight_bytes.held_bytes``). The count must equal ``weight_bytes.cuda_bytes`` summed over the
file's tensors — which then gives the Qwen3-8B shape's ratio from its tensor list alone — and
both must stay within 1.1× of the file. The tables must be codes (no bfloat16 copies) that look
up and project the file's own values.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from pensieve.backends.cuda_int4 import CudaInt4Linear
from pensieve.backends.cuda_int8 import CudaMixedLinear
from pensieve.backends.cuda_q6k import CudaQ6KLinear
from pensieve.backends.cuda_tables import CudaCodesEmbedding
from pensieve.backends.weight_bytes import cuda_bytes, gguf_tensor_bytes, held_bytes

VOCAB = "ggml-vocab-llama-spm.gguf"  # 32000 tokens


def small_args(**shape: int) -> list[str]:
    return ["--arch", "qwen3", "--dtype", "q4_k_m", "--device", "cpu",
            *[f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]]


SMALL = dict(hidden=256, layers=8, heads=4, kv_heads=2, head_dim=64, intermediate=768)
QWEN3_8B = dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    from bench.make_random_gguf import main
    from tests.helpers.assets import llama_cpp_models_dir

    path = tmp_path_factory.mktemp("q4km") / "qwen3-q4_k_m.gguf"
    main([str(path), "--tokenizer-from", str(llama_cpp_models_dir() / VOCAB),
          *small_args(**SMALL)])
    return path


def cuda_model_on_cpu(path) -> nn.Module:
    from pensieve.backends.torch_backend import place_weights, plan_weights
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.registry import load_checkpoint
    from pensieve.models.registry import model_class

    ckpt = load_checkpoint(path, keep_int4=True)
    config = EngineConfig(device="cuda", dtype=torch.bfloat16, context_length=256)
    with torch.device("meta"):
        model = model_class(ckpt.args)(ckpt.args, max_positions=256)
    planned = plan_weights(ckpt, config, packed=getattr(model, "PACKED", {}))
    place_weights(model, ckpt.args, config, planned)
    return model.to(dtype=torch.bfloat16)


def test_held_bytes_match_the_layout_sizes_and_stay_within_1_1x(small_file):
    from pensieve.loaders.gguf_file import GGUFFile

    model = cuda_model_on_cpu(small_file)
    infos = GGUFFile(small_file).tensors.values()
    held, stored = held_bytes(model), gguf_tensor_bytes(small_file)
    assert held == sum(cuda_bytes(i.ggml_type, i.shape) for i in infos)
    assert held <= 1.1 * stored, held / stored
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, CudaCodesEmbedding) and isinstance(embed.table, CudaInt4Linear)
    assert embed.table.lookup_only  # untied: cuda_int4_tune plans no kernels for it
    assert isinstance(head, CudaQ6KLinear)
    layer0 = model.model.layers[0]  # a use_more_bits layer: Q6_K v and down
    assert isinstance(layer0.self_attn.qkv_proj, CudaMixedLinear)
    assert isinstance(layer0.mlp.down_proj, CudaQ6KLinear)
    floats = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert not floats, floats  # no projection or table left as a float copy


def test_tables_hold_the_files_values(small_file):
    from pensieve.loaders.registry import load_checkpoint

    model = cuda_model_on_cpu(small_file)
    ref = load_checkpoint(small_file).weights  # every tensor dequantised by the loader
    ids = torch.tensor([[3, 31999], [0, 17]])
    rows = model.model.embed_tokens(ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (2, 2, 256)
    want = ref["model.embed_tokens.weight"][ids]
    assert ((rows.float() - want).norm() / want.norm()).item() < 5e-3  # bf16; Q4_K scales f16
    assert torch.equal(model.lm_head.dequantize(), ref["lm_head.weight"])


def test_q8_0_and_tied_tables_stay_codes():
    """A tied Q8_0 table (the loader's ``int8`` pair) is one CUDA table serving both ends; one
    in a layout no CUDA layer takes (groups of 16 4-bit codes) is dequantised."""
    from types import SimpleNamespace

    from pensieve.backends import cuda_tables
    from pensieve.backends.cuda_int8 import CudaInt8Linear
    from pensieve.models.quant_linear import Int4Groups
    from tests.unit.test_cuda_int8 import groups

    q8 = groups(Q.Q8_0, 40, 256, seed=4)
    int4, int8 = {}, {cuda_tables.EMBED: (q8.codes, q8.scales)}
    keep, floats = cuda_tables.plan(int4, int8, tied=True)
    assert not int8 and not floats and set(keep) == {cuda_tables.EMBED}
    model = SimpleNamespace(model=SimpleNamespace(embed_tokens=None), lm_head=None)
    cuda_tables.swap_in(model, keep, tied=True)
    assert isinstance(model.lm_head, CudaInt8Linear)
    assert model.model.embed_tokens.table is model.lm_head
    ids = torch.tensor([39, 0, 5])
    assert torch.equal(model.model.embed_tokens(ids), q8.dequantize()[ids])
    odd = groups(Q.Q4_K, 40, 256, seed=5)
    odd = Int4Groups(odd.codes[:, :80], torch.ones(40, 5), torch.zeros(40, 5), 16)  # groups of 16
    keep, floats = cuda_tables.plan({cuda_tables.HEAD: odd}, {}, tied=False)
    assert not keep and floats[cuda_tables.HEAD].shape == (40, 80)


def test_moe_experts_hold_the_computed_bytes():
    """A Q4_K_M MoE layer's experts (Q4_K gate/up, Q6_K down) as ``cuda_bytes`` counts them:
    the Q6_K down in the file's own 210 bytes a 256, the Q4_K gate/up (``q4k``) in its 144."""
    from pensieve.backends.cuda_moe import CudaMoEExperts
    from tests.unit.test_cuda_moe import expert_codes

    e, h, i = 4, 256, 512
    layer = CudaMoEExperts(expert_codes(Q.Q4_K, e, i, h, 1), expert_codes(Q.Q4_K, e, i, h, 2),
                           expert_codes(Q.Q6_K, e, h, i, 3), e)
    down = sum(b.nbytes for n, b in layer.named_buffers() if n.startswith("down_"))
    assert down == cuda_bytes(Q.Q6_K, (e, h, i)) == e * h * i // 256 * 210
    assert held_bytes(layer) == 2 * cuda_bytes(Q.Q4_K, (e, i, h)) + down
    assert cuda_bytes(Q.Q4_K, (e, i, h)) == e * i * h // 256 * 144
    gate_up = sum(b.nbytes for n, b in layer.named_buffers() if n.startswith("gate_up_"))
    assert gate_up == 2 * e * i * h // 256 * 144


def test_qwen3_8b_q4_k_m_shape_is_within_1_1x():
    """The Qwen3-8B shape's tensor list (no file written) by the layout sizes the test above
    ties to what a built model holds."""
    from bench.gpu_weight_bytes import ratio

    stored, held = ratio(argparse.Namespace(arch="qwen3", dtype="q4_k_m", vocab_size=151936,
                                            **QWEN3_8B))
    assert 4.4e9 < stored < 5.2e9
    assert held <= 1.1 * stored, held / stored


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_model_holds_what_was_counted_and_follows_the_cpu(small_file):
    """Built on the GPU: memory allocated for the model ≈ ``held_bytes`` (the rest: RoPE
    tables, kernel workspaces), and greedy decoding through ``torch_engine`` follows the same
    file dequantised into float32 on the CPU (bf16: a near tie of random logits may part)."""
    from pensieve.backends.torch_backend import build_model, torch_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.gguf_file import GGUFFile
    from pensieve.loaders.registry import load_checkpoint
    from tests.unit.test_cuda_attention import PREFIX, _run
    from tests.unit.test_cuda_int8 import rel

    def config(device, dtype):
        return EngineConfig(context_length=512, block_size=4, max_num_seqs=4,
                            max_num_batched_tokens=64, device=device, dtype=dtype)

    ckpt = load_checkpoint(small_file, keep_int4=True)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = build_model(ckpt, config("cuda", torch.bfloat16))
    used = torch.cuda.memory_allocated() - before
    held = held_bytes(model)
    assert held == sum(cuda_bytes(i.ggml_type, i.shape)
                       for i in GGUFFile(small_file).tensors.values())
    assert held <= used <= held + 64 * 2**20, (held, used)
    prompts = {f"r{i}": PREFIX + f"question {i} " * (i + 1) for i in range(5)}
    tokens, logits = _run(torch_engine(model, ckpt.args, ckpt.tokenizer,
                                       config("cuda", torch.bfloat16)), prompts, True)
    ref = load_checkpoint(small_file)
    cpu = build_model(ref, config("cpu", torch.float32))
    cpu_tokens, cpu_logits = _run(torch_engine(cpu, ref.args, ref.tokenizer,
                                               config("cpu", torch.float32)), prompts, True)
    a, b = next((a, b) for a, b in zip(cpu_logits, logits) if a.numel())
    assert rel(b, a.double()) < 3e-2
    assert sum(cpu_tokens[r][0] == tokens[r][0] for r in prompts) >= 4
