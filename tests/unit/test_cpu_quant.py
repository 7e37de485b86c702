"""The compiled q4/q8 CPU kernels against float matmuls, and the layers built on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pensieve.backends.cpu_quant import (
    KernelBuildError, Q4Linear, Q8Embedding, Q8Linear, build_kernels, load_kernels, pack_q8,
)
from pensieve.backends.kernel_choice import WeightChoice, choose
from pensieve.backends.quantize import int8_lm_head, swap_in
from pensieve.models.args import ModelArgs
from pensieve.models.forward_context import ForwardContext, SequenceSlice
from pensieve.models.llama import LlamaForCausalLM
from pensieve.models.quant_linear import Int4Groups
from tests.helpers.integer_gemm import integer_gemm  # noqa: F401  (autouse)


KERNELS = load_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")


def groups(n: int, k: int, seed: int = 0) -> Int4Groups:
    """Random Q4_1-like groups: float16-exact scales and offsets."""
    gen = torch.Generator().manual_seed(seed)
    return Int4Groups(
        torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen),
        (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half().float(),
        (torch.randn(n, k // 32, generator=gen) * 0.1).half().float(),
        32,
    )


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (96, 7), (32, 40)])
def test_q4_linear_matches_float(k, n, threads):
    g = groups(n, k, seed=k + n)
    weight = g.dequantize()
    layer = Q4Linear(KERNELS, g, threads=threads)
    assert torch.equal(layer.dequantize(), weight)  # packing is exact
    for m in (1, 2, 3, 4, 5, 9, 47, 64):  # every row tiling, and the many-row GEMM
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        x[:, 3] *= 40  # an outlier channel, as RMSNorm outputs have
        # int16 activations: within ~1e-4 of float
        assert rel_err(layer(x), x @ weight.T) < 1e-4, m
    dense = Q4Linear(KERNELS, g, threads=threads, dense_from=48)  # the float path, if asked
    x = torch.randn(64, k)
    assert rel_err(dense(x), x @ weight.T) < 1e-6


@needs_kernels
def test_q4_linear_bias_shapes_and_dtypes():
    g, bias = groups(64, 128), torch.randn(64)
    layer = Q4Linear(KERNELS, g, bias)
    x = torch.randn(2, 3, 128)
    ref = x @ g.dequantize().T + bias
    assert layer(x).shape == (2, 3, 64)
    assert rel_err(layer(x), ref) < 1e-4
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert rel_err(layer(x.bfloat16()).float(), ref) < 2e-2


@needs_kernels
def test_q8_round_trips_q8_0_weights_and_matches_float():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-127, 128, (300, 576), generator=gen, dtype=torch.int8)
    codes[:, 0] = 127  # every block of a real Q8_0 tensor reaches ±127 somewhere
    codes[:, 32::32] = -127
    scale = (torch.rand(300, 18, generator=gen) * 1e-3 + 1e-4).half().float()
    weight = codes.float() * scale.repeat_interleave(32, dim=1)  # what a Q8_0 loader gives
    packed, scales = pack_q8(KERNELS, weight)
    assert torch.equal(packed, codes)
    assert torch.equal(scales.view(torch.float16).float(), scale)
    head = Q8Linear(KERNELS, packed, scales)
    assert torch.equal(head.dequantize(), weight)
    for m in (1, 3, 6):
        x = torch.randn(m, 576, generator=gen)
        assert rel_err(head(x), x @ weight.T) < 1e-4


@needs_kernels
def test_q8_embedding_reads_the_same_rows():
    weight = torch.randn(50, 64)
    codes, scales = pack_q8(KERNELS, weight)
    emb = Q8Embedding(KERNELS, codes, scales)
    ids = torch.tensor([[0, 49, 7], [7, 7, 1]])
    expected = Q8Linear(KERNELS, codes, scales).dequantize()[ids]
    assert torch.equal(emb(ids), expected)
    assert emb.to(torch.bfloat16)(ids).dtype == torch.bfloat16
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))


def tiny_llama() -> tuple[LlamaForCausalLM, ModelArgs]:
    args = ModelArgs(
        architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=96,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(args).eval(), args


def logits(model: nn.Module, args: ModelArgs, ids: list[int]) -> torch.Tensor:
    n, block = len(ids), 16
    blocks = (n + block - 1) // block
    shape = (blocks, block, args.num_kv_heads, args.head_dim)
    kv = [torch.zeros(shape) for _ in range(args.num_layers)]
    ctx = ForwardContext(kv, [torch.zeros(shape) for _ in kv], torch.arange(n),
                         [SequenceSlice(0, n, n, torch.arange(blocks))], torch.arange(n))
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.arange(n), ctx)


@needs_kernels
def test_swap_in_and_int8_head_keep_the_model_output():
    model, args = tiny_llama()
    paths = [f"model.layers.{i}.{m}" for i in range(2) for m in
             ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    int4 = {}
    for i, path in enumerate(paths):  # make the float model hold exactly int4-able weights
        layer = model.get_submodule(path)
        int4[path] = groups(layer.out_features, layer.in_features, seed=i)
        layer.weight.data = int4[path].dequantize()
    embed = model.model.embed_tokens.weight  # tied; make it Q8_0-exact, as a GGUF's is
    embed.data = Q8Linear(KERNELS, *pack_q8(KERNELS, embed.data)).dequantize()
    ids = list(range(3, 40))
    reference = logits(model, args, ids)
    swap_in(model, int4)
    int8_lm_head(model)
    assert all(isinstance(model.get_submodule(p), Q4Linear) for p in paths)
    assert all(type(layer.mlp).__name__ == "Q4MLP" for layer in model.model.layers)
    assert isinstance(model.lm_head, Q8Linear)
    assert isinstance(model.model.embed_tokens, Q8Embedding)  # tied: shares the head's codes
    for m in model.modules():  # one row at a time: the integer path, as in decode
        if isinstance(m, (Q4Linear, Q8Linear)):
            m.dense_from = 1 << 30
    out = logits(model, args, ids)
    assert rel_err(out, reference) < 1e-4
    assert torch.equal(out.argmax(-1), reference.argmax(-1))


def test_swap_in_float_kernel_dequantises():
    model, _ = tiny_llama()
    g = groups(64, 64)
    swap_in(model, {"model.layers.0.self_attn.o_proj": g}, kernel="float")
    layer = model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, nn.Linear) and torch.equal(layer.weight, g.dequantize())
    with pytest.raises(ValueError):
        swap_in(model, {}, kernel="fastest")


def test_choose_resolves_weights_values():
    assert choose("float") == WeightChoice(False, False, "float")
    assert choose("auto", device="cuda").kernel == "float"
    with pytest.raises(ValueError):
        choose("int3")
    auto = choose("auto")
    assert auto.keep_int4 == (auto.kernel != "float")
    if KERNELS is not None:
        forced = choose("int4")
        assert forced.keep_int4 and forced.int8_lm_head and forced.kernel == "cpu_quant"
        # decided from the machine, not a timing: the same answer every time
        assert auto == forced and all(choose("auto") == auto for _ in range(3))
        assert "avx2" in auto.reason


@needs_kernels
def test_build_is_cached_and_a_broken_compiler_is_an_error(tmp_path):
    with pytest.raises(KernelBuildError):
        build_kernels(cache=tmp_path, compiler="false")
    first = build_kernels(cache=tmp_path)
    again = build_kernels(cache=tmp_path)
    assert first.build_seconds > 0 and again.build_seconds == 0 and again.path == first.path


@needs_kernels
def test_fused_mlp_matches_the_modules():
    from pensieve.backends.cpu_quant.mlp import Q4MLP

    gate_up, down = Q4Linear(KERNELS, groups(192, 64, seed=1)), Q4Linear(KERNELS, groups(64, 96, seed=2))
    mlp = Q4MLP(gate_up, down)
    for m in (1, 3, 5, 60):  # fused in C (row tiles, then the GEMM from a few rows)
        x = torch.randn(m, 64)
        g, u = (x @ gate_up.dequantize().T).chunk(2, dim=-1)
        expected = (torch.nn.functional.silu(g) * u) @ down.dequantize().T
        assert rel_err(mlp(x), expected) < 1e-4, m
    assert set(mlp.state_dict()) == {f"{p}.{b}" for p in ("gate_up_proj", "down_proj")
                                     for b in ("codes", "scales", "mins")}


@needs_kernels
def test_concurrent_callers_share_the_pool_safely():
    from concurrent.futures import ThreadPoolExecutor

    g = groups(512, 256, seed=5)
    layer, weight = Q4Linear(KERNELS, g, threads=2), g.dequantize()
    xs = [torch.randn(1 + i % 3, 256) for i in range(64)]

    def check(x: torch.Tensor) -> float:
        return rel_err(layer(x), x @ weight.T)

    with ThreadPoolExecutor(4) as pool:  # ctypes drops the GIL: the calls really overlap
        assert max(pool.map(check, xs)) < 1e-4


@needs_kernels
def test_packed_q4_groups_pack_as_their_unpacked_codes():
    """A Q4_1 GGUF's bytes (Int4Groups.from_nibbles) give the kernels the same buffers as
    the same weights as unpacked codes, also stacked as a fused projection's parts."""
    from pensieve.backends.cpu_quant import pack_q4

    parts = []
    for seed in (0, 1):
        g = groups(64, 96, seed)
        packed, s16, m16 = pack_q4(KERNELS, g)
        parts.append((g, Int4Groups.from_nibbles(packed, s16.view(torch.float16),
                                                 m16.view(torch.float16))))
    plain, fast = pack_q4(KERNELS, [p[0] for p in parts]), pack_q4(KERNELS, [p[1] for p in parts])
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    assert torch.equal(parts[0][1].codes, parts[0][0].codes)
