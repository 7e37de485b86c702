"""The CUDA int4 layer: packing against the GGUF dequantisation, and its Triton kernels.

On CPU the packing and the reference unpacking are checked exactly, and the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1``, a fresh copy of the kernels module) at small
shapes. With a GPU the compiled kernels are checked at the 8B shapes against a float64
reference, and a tiny int4 model on CUDA (eager and CUDA graphs) is checked against the same
model on CPU.
"""

from __future__ import annotations

import pytest
import torch

from pensieve.backends import cuda_int4
from pensieve.backends.cuda_int4 import (
    CudaInt4Linear, pack_codes, pack_scale_offset, unpack,
)
from pensieve.loaders.int4_codes import int4_groups
from pensieve.engine.config import EngineConfig
from pensieve.backends.torch_backend import torch_engine
from pensieve.loaders.quants import dequantize
from pensieve.models.quant_linear import Int4Groups
from tests.helpers.tiny_engine import ByteTokenizer, tiny_args, tiny_model
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.unit.test_int4_codes import random_blocks
from gguf import GGMLQuantizationType as Q

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _random_cuda_weight(n: int, k: int, gen: torch.Generator):
    """Random codes, scales and offsets around Q4_0's; their packed GPU form; the float64 weight."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // 32, generator=gen) * 0.01
    offsets = -8 * scales + torch.randn(n, k // 32, generator=gen) * 1e-3
    packed = pack_codes(codes).cuda()
    so = pack_scale_offset(scales, offsets).cuda()
    return codes, scales, offsets, packed, so, unpack(packed.cpu(), so.cpu()).double()


def _groups(qtype: Q, rows: int, cols: int, seed: int = 0):
    raw = random_blocks(qtype, rows, cols, seed)
    return int4_groups(raw, qtype, (rows, cols)), dequantize(raw, qtype, (rows, cols))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_packing_is_exact_for_float16_scaled_types(qtype):
    groups, weight = _groups(qtype, 24, 256)
    packed = pack_codes(groups.codes)
    so = pack_scale_offset(groups.scales, groups.offsets)
    assert packed.shape == (24, 128) and packed.dtype == torch.uint8
    assert so.shape == (24, 8) and so.dtype == torch.int32
    assert torch.equal(unpack(packed, so), weight)


def test_q4_k_packing_rounds_only_the_scales_to_float16():
    groups, weight = _groups(Q.Q4_K, 16, 512)
    got = unpack(pack_codes(groups.codes), pack_scale_offset(groups.scales, groups.offsets))
    rel = ((got - weight).norm() / weight.norm()).item()
    assert 0 < rel < 1e-3


def test_byte_layout_is_gguf_q4_0_order():
    """Byte i of a group: column i low nibble, column 16 + i high nibble (as a Q4_0 block)."""
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64)
    codes[0, 16:32] = 15 - codes[0, 16:32]
    packed = pack_codes(codes)
    assert packed[0, 0].item() == (0 | (15 << 4))
    assert packed[0, 5].item() == (5 | (10 << 4))


def test_layer_on_cpu_matches_float_and_fuses_parts():
    g1, w1 = _groups(Q.Q4_0, 32, 128, seed=1)
    g2, w2 = _groups(Q.Q4_1, 16, 128, seed=2)
    bias = torch.randn(48)
    layer = CudaInt4Linear([g1, g2], bias)
    x = torch.randn(2, 3, 128)
    ref = x @ torch.cat([w1, w2]).T + bias
    torch.testing.assert_close(layer(x), ref, atol=1e-4, rtol=1e-4)
    # model.to(dtype) must leave the codes and the float16 pairs alone
    layer = layer.to(torch.bfloat16)
    assert layer.packed.dtype == torch.uint8 and layer.scale_offset.dtype == torch.int32


def interpreter_check(k: int) -> None:
    """Run in a process started with TRITON_INTERPRET=1: the kernels on CPU tensors, float32
    (plain conversions) and float16 (the magic-number codes; the interpreter's bfloat16 is
    not faithful, so bfloat16 is checked on the GPU only)."""
    groups, weight = _groups(Q.Q4_1, 40, k, seed=3)
    packed = pack_codes(groups.codes)
    so = pack_scale_offset(groups.scales, groups.offsets)
    tiles = cuda_int4.Tiles(16, 16, 4, 4, 1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = torch.randn(5, k).to(dtype)
        ref = x.double() @ weight.double().T
        for name, y in (("gemv 1 row", cuda_int4.gemv(x[:1], packed, so, tiles)),
                        ("gemv", cuda_int4.gemv(x, packed, so, tiles)),
                        ("matmul", cuda_int4.matmul(x, packed, so, tiles))):
            r = ref[: y.shape[0]]
            rel = ((y.double() - r).norm() / r.norm()).item()
            assert rel < tol, (dtype, name, rel)
    torch.testing.assert_close(cuda_int4.dequantize(packed, so, torch.float32, tiles), weight)
    groups, weight = _groups(Q.Q4_1, 40, 256, seed=4)
    packed = pack_codes(groups.codes)
    so = pack_scale_offset(groups.scales, groups.offsets)
    for cfg in (cuda_int4.Skinny(16, 4, 1, 4, 1), cuda_int4.Skinny(32, 4, 2, 4, 1),
                cuda_int4.Skinny(16, 1, 8, 4, 1)):  # 8 splits: 4 past 16 rows (the workspace)
        for rows in (1, 5, 17, 32):
            k = 256
            x = torch.randn(rows, k)
            ref = x.double() @ weight.double().T
            for _ in range(2):  # the second call needs the counters the first one reset
                y = cuda_int4.skinny(x, packed, so, cfg)
                rel = ((y.double() - ref).norm() / ref.norm()).item()
                assert rel < 2e-3, ("skinny", cfg, rows, rel)


def test_kernels_in_the_triton_interpreter():
    """K of 128 and 448 (14 groups: not a power of two). A fresh process, because the
    interpreter is chosen when the kernels are decorated."""
    run_in_triton_interpreter("from tests.unit.test_cuda_int4 import interpreter_check as c; "
                              "c(128); c(448); print('ok')")


@needs_cuda
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 32, 64, 300])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (96, 4096)])
@pytest.mark.parametrize("copies", [False, True])
def test_cuda_kernels_against_float64(rows, n, k, copies):
    """Every default route of int4_linear: without copies (gemv_words, skinny, the
    dequantising gemm) and with the tinygemm and dense copies of ``keep_dense``."""
    from pensieve.backends import tinygemm

    gen = torch.Generator().manual_seed(rows + n)
    codes, scales, offsets, packed, so, weight = _random_cuda_weight(n, k, gen)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    ref = x.double() @ weight.T
    y = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    tiny = dense = None
    if copies:
        assert tinygemm.works()
        tiny = tinygemm.pack(codes.cuda(), scales.cuda(), offsets.cuda())
        dense = cuda_int4.dequantize(packed, so, torch.bfloat16)
    y.copy_(cuda_int4.int4_linear(x.cuda(), packed, so, dense, tiny))
    rel = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    assert not torch.isnan(y).any() and rel < 1e-2, rel


def test_skinny_configs_fit_the_8b_shapes():
    """Every shape of the 8B model has candidates that fit (else it would keep bf16 speed)."""
    for k in (4096, 14336):
        assert any(c.fits(k) for c in cuda_int4.SKINNY_CANDIDATES)
        assert all(c.split_k <= 8 for c in cuda_int4.SKINNY_SWEEP)
    assert not cuda_int4.Skinny(64, 8, 8, 4, 3).fits(32 * 96)  # 96 groups: not a multiple of 64
    # rows past 32 are not the kernel's
    with pytest.raises(ValueError):
        cuda_int4.skinny(torch.zeros(33, 64), torch.zeros(4, 32, dtype=torch.uint8),
                         torch.zeros(4, 2, dtype=torch.int32), cuda_int4.Skinny(64, 2, 1, 4, 3))


@needs_cuda
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (96, 4096)])
def test_skinny_against_float64_and_in_a_graph(n, k):
    """The tensor-core skinny kernel, every sweep config that fits, 2-32 rows, bf16 x,
    twice in a row (split-K counters reset) and replayed from a CUDA graph."""
    gen = torch.Generator().manual_seed(n + k)
    _, _, _, packed, so, weight = _random_cuda_weight(n, k, gen)
    cfgs = [c for c in cuda_int4.SKINNY_SWEEP
            if c.fits(k) and c.num_stages == 3 and c.num_warps == 4]
    for rows in (2, 8, 16, 24, 32):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        ref = x.double() @ weight.T
        xc = x.cuda()
        for cfg in cfgs if rows == 8 else cfgs[::7]:
            for _ in range(2):
                y = cuda_int4.skinny(xc, packed, so, cfg)
                rel = ((y.double().cpu() - ref).norm() / ref.norm()).item()
                assert rel < 4e-3, (cfg, rows, rel)
    cfg = next(c for c in cfgs if c.split_k > 1)
    x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
    cuda_int4.skinny(x, packed, so, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda_int4.skinny(x, packed, so, cfg)
    for _ in range(3):
        x.normal_()
        graph.replay()
        ref = x.double().cpu() @ weight.T
        rel = ((y.double().cpu() - ref).norm() / ref.norm()).item()
        assert rel < 4e-3, rel


def quantize_4bit(weight: torch.Tensor) -> Int4Groups:
    """Asymmetric 4-bit codes per 32 columns (min/max), as a GGUF Q4_1 file would hold."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // 32, 32)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
    lo = lo.half().float()
    codes = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Int4Groups(codes.view(n, k), scale, lo, 32)


def int4_tiny_model(device: str, dtype: torch.dtype) -> torch.nn.Module:
    model = tiny_model()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, CudaInt4Linear([quantize_4bit(mod.weight)]))
    return model.to(device=device, dtype=dtype)


@needs_cuda
@pytest.mark.parametrize("graphs,dense,force", [(True, None, None), (False, None, None),
                                                (True, False, None), (False, False, None),
                                                (True, True, None), (True, False, "skinny")])
def test_tiny_int4_model_on_cuda_matches_cpu(graphs, dense, force):
    """Greedy tokens of the int4 model: CUDA bf16 (untimed default plans; timed plans with
    one layout; or with the opt-in tinygemm + dense copies; with graphs or eager) against the
    same codes on CPU in float32."""
    from pensieve.backends.cuda_int4 import prepare_for_cuda

    from tests.unit.test_cuda_attention import PREFIX, _run

    def engine(device, dtype):
        cfg = EngineConfig(context_length=512, block_size=4, max_num_seqs=4,
                           max_num_batched_tokens=128, device=device, dtype=dtype)
        model = int4_tiny_model(device, dtype)
        if device == "cuda" and dense is not None:
            prepare_for_cuda(model, dtype, keep_dense=dense)
            if force:  # every layer's 2-16 row buckets on one kernel
                for m in model.modules():
                    if isinstance(m, CudaInt4Linear) and m.plan.skinny is not None:
                        m.plan.route.update({b: force for b in (2, 4, 8, 16)})
        eng = torch_engine(model, tiny_args(), ByteTokenizer(), cfg)
        if device == "cuda" and not graphs:
            eng.runner.graphs = eng.runner.chunk_graphs = None
        return eng

    prompts = {f"r{i}": PREFIX + f"question {i} " * (i + 1) for i in range(5)}
    cpu_tokens, cpu_logits = _run(engine("cpu", torch.float32), prompts, True)
    gpu = engine("cuda", torch.bfloat16)
    gpu_tokens, gpu_logits = _run(gpu, prompts, True)
    a, b = next((a, b) for a, b in zip(cpu_logits, gpu_logits) if a.numel())
    assert ((a - b.float().cpu()).norm() / a.norm()).item() < 3e-2
    same = sum(x == y for r in prompts for x, y in zip(cpu_tokens[r], gpu_tokens[r]))
    assert same >= 0.8 * sum(len(t) for t in cpu_tokens.values())  # bf16 vs float32 ties
    if graphs:
        assert gpu.runner.graphs.replays > 0


def test_skinny_compiles_for_the_h100_at_16_and_32_rows():
    """Every start-time skinny candidate, rows padded to 16 and to 32 (the workspace's 4 splits
    at most there), built for sm_90 here: the 32-row tile's registers and shared memory."""
    from pensieve.backends import cuda_int4_kernels as kernels
    from tests.helpers.triton_compile import compile_for

    types = {"X": "*bf16", "W": "*u8", "SO": "*i32", "Y": "*bf16", "WS": "*fp32", "CNT": "*i32",
             "M": "i32", "N": "i32", "K": "i32", "GROUPS": "i32", "stride_x": "i32",
             "stride_y": "i32", "stride_w": "i32"}
    for cfg in cuda_int4.SKINNY_CANDIDATES:
        for block_m in (16, 32):
            consts = {"BLOCK_N": cfg.block_n, "BLOCK_G": cfg.block_g, "BLOCK_M": block_m,
                      "SPLIT_K": min(cfg.split_k, 128 // block_m), "SYM": False}
            assert compile_for(kernels.skinny, types, consts, cfg.num_warps,
                               cfg.num_stages) is not None, (cfg, block_m)
