"""The fused MoE layer over expert codes on CUDA (``backends/cuda_moe.py``).

On CPU: the module's buffers dequantise to exactly the loader's codes (Q4_0, Q8_0, Q5_K) or the
file's own float32 values (Q4_K in its ``q4k`` layout — any finite d and dmin, bit for bit —
and Q6_K in its 6-bit layout), Q4_K's 144 bytes a 256 (160 in the int4 layout it falls back
to), the module's reference forward against ``models.moe.Experts`` on the same dequantised
weights, and every kernel (pick GEMV unpaired and paired, the one-program sort, the grouped
GEMM) in Triton's interpreter (a fresh process) against float64 for int4, q4k, 6-bit and int8
codes, both routes at 1-40 tokens, the pick GEMV with a tile a launch (``GemvTiles``: down in
one step wider than its K, masked, in every layout), the one-program sort against the
torch-ops one, a whole
Qwen3-MoE
``MoE`` block (router + kernels) against its float module, and a GGUF planned for CUDA giving the
dequantised file's logits. With a GPU: the compiled kernels at Qwen3-30B-A3B's expert shapes in
bfloat16 against float64, the layer under a CUDA graph, and a tiny Qwen3-MoE GGUF with Q4_0 /
Q8_0 / Q4_K experts served by ``torch_engine`` on CUDA (graphs) against the float path's greedy
tokens."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends import cuda_moe
from pensieve.backends.cuda_moe import CudaMoEExperts, reference_experts
from pensieve.loaders.int4_codes import quant_groups
from pensieve.loaders.quants import dequantize
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.unit.test_cuda_int8 import random_raw, rel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (gate/up type, down type, hidden, expert width): Q4_K_M's pair (q4k, 6-bit), the Q4_0/Q8_0
# pair (int4, int8) at odd widths, 6-bit gate/up with int8 codes with offsets (Q5_K) on down,
# Q4_K everywhere (q4k down: two super-blocks a row)
MIXES = [(Q.Q4_K, Q.Q6_K, 256, 256), (Q.Q4_0, Q.Q8_0, 96, 160), (Q.Q6_K, Q.Q5_K, 256, 256),
         (Q.Q4_K, Q.Q4_K, 256, 512)]


def expert_codes(qtype: Q, experts: int, rows: int, cols: int, seed: int):
    """Random codes of a stacked [E, rows, cols] expert tensor, as its 2-D view's groups."""
    return quant_groups(random_raw(qtype, experts * rows, cols, seed), qtype,
                        (experts * rows, cols))


def make_layer(gu: Q, dn: Q, hidden: int, inner: int, experts: int, seed: int = 0
               ) -> CudaMoEExperts:
    return CudaMoEExperts(expert_codes(gu, experts, inner, hidden, seed),
                          expert_codes(gu, experts, inner, hidden, seed + 1),
                          expert_codes(dn, experts, hidden, inner, seed + 2), experts)


def routing(tokens: int, experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    top, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return top / top.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("gu,dn,hidden,inner", MIXES)
def test_layer_holds_the_codes_exactly(gu, dn, hidden, inner):
    e = 3
    layer = make_layer(gu, dn, hidden, inner, e, seed=5)
    gate_up, down = layer.dequantize()
    def ref(qtype: Q, rows: int, cols: int, seed: int) -> torch.Tensor:
        if qtype in (Q.Q6_K, Q.Q4_K):  # held with the file's own factors: its values exactly
            raw = random_raw(qtype, e * rows, cols, seed)
            return dequantize(raw, qtype, (e * rows, cols)).view(e, rows, cols)
        return expert_codes(qtype, e, rows, cols, seed).dequantize().view(e, rows, cols)

    gate, up = ref(gu, inner, hidden, 5), ref(gu, inner, hidden, 6)
    ref_down = ref(dn, hidden, inner, 7)
    assert torch.equal(gate_up, torch.cat([gate, up], 1))
    assert torch.equal(down, ref_down)
    kinds = {Q.Q4_K: "q4k", Q.Q6_K: "six", Q.Q4_0: "int4"}  # Q6_K: 6 bits a code
    assert [f[0] for f in layer.formats] == [kinds.get(t, "int8") for t in (gu, dn)]
    layer = layer.to(torch.bfloat16)  # the model's cast leaves codes and float16 bits alone
    assert layer.gate_up_w.dtype in (torch.uint8, torch.int8) and layer.down_s.dtype in (
        torch.int8, torch.int16, torch.int32)


def test_reference_forward_is_the_float_experts():
    from pensieve.models.args import ModelArgs, MoEArgs
    from pensieve.models.moe import Experts

    e, hidden, inner, k = 5, 256, 256, 3
    layer = make_layer(Q.Q4_K, Q.Q6_K, hidden, inner, e, seed=3)
    args = ModelArgs(architecture="qwen3_moe", vocab_size=10, hidden_size=hidden,
                     intermediate_size=inner, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=64, max_position_embeddings=64,
                     moe=MoEArgs(num_experts=e, top_k=k, expert_size=inner))
    ref = Experts(args)
    gate_up, down = layer.dequantize()
    ref.gate_up_proj.weight.data, ref.down_proj.weight.data = gate_up, down
    x = torch.randn(7, hidden)
    w, ids = routing(7, e, k, 1)
    torch.testing.assert_close(layer(x, w, ids), ref(x, w, ids), atol=1e-4, rtol=1e-4)


def q4_k_raw(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random Q4_K blocks whose d and dmin are any finite float16 (subnormals, negatives, and
    ones whose d·sc or dmin·m overflow float16)."""
    import numpy as np

    raw = random_raw(Q.Q4_K, rows, cols, seed).view(-1, 144).clone()
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=(raw.shape[0], 2),
                                                dtype=np.uint16)
    bits[~np.isfinite(bits.view(np.float16))] = 0x3C00
    bits[0] = (0x7BFF, 0xFBFF)  # ±65504: products past float16
    bits[1] = (0x0001, 0x8001)  # the least subnormals
    raw[:, :4] = torch.from_numpy(bits.view(np.uint8).reshape(-1, 4))
    return raw.reshape(-1)


def test_q4_k_experts_are_the_files_float32_values_bit_for_bit():
    """The ``q4k`` layout's buffers dequantise (the reference path, each expert alone too) to
    ``loaders.quants.dequantize``'s float32 values exactly, at any d and dmin."""
    e, hidden, inner = 3, 512, 256
    raws = [q4_k_raw(e * inner, hidden, 1), q4_k_raw(e * inner, hidden, 2),
            q4_k_raw(e * hidden, inner, 3)]
    shapes = [(e * inner, hidden), (e * inner, hidden), (e * hidden, inner)]
    codes = [quant_groups(r, Q.Q4_K, s) for r, s in zip(raws, shapes)]
    assert codes[0].nibbles is None  # products past float16: the unpacked form, factors kept
    layer = CudaMoEExperts(*codes, e)
    assert layer.formats == (("q4k", 32, False),) * 2
    want = [dequantize(r, Q.Q4_K, s) for r, s in zip(raws, shapes)]
    gate_up, down = layer.dequantize()
    assert torch.equal(gate_up, torch.cat([want[0].view(e, inner, hidden),
                                           want[1].view(e, inner, hidden)], 1))
    assert torch.equal(down, want[2].view(e, hidden, inner))
    gu, dn = layer.stacks()
    assert torch.equal(cuda_moe.expert_weights(dn, 1), want[2].view(e, hidden, inner)[1])


def test_q4_k_experts_hold_the_files_144_bytes_a_256(monkeypatch):
    """The file's 144 bytes a 256 held as 144 (a 16-byte word quad a super-block: d/dmin and
    the 12 scale bytes, beside the 128 code bytes); ``PENSIEVE_MOE_Q4K_SUPER=0``: the int4
    layout's 160; Q4_K gate beside a Q4_0 up: both in the int4 layout (they fuse)."""
    from pensieve.backends.weight_bytes import cuda_bytes, held_bytes

    e, hidden, inner = 4, 512, 256
    layer = make_layer(Q.Q4_K, Q.Q4_K, hidden, inner, e)
    weights = 3 * e * hidden * inner
    file_bytes = weights // 256 * 144
    assert held_bytes(layer) == file_bytes
    assert held_bytes(layer) == 2 * cuda_bytes(Q.Q4_K, (e, inner, hidden)) + cuda_bytes(
        Q.Q4_K, (e, hidden, inner))
    assert {n: b.dtype for n, b in layer.named_buffers()} == {
        "gate_up_w": torch.uint8, "gate_up_s": torch.int32, "down_w": torch.uint8,
        "down_s": torch.int32}
    assert layer.gate_up_s.shape == (e * 2 * inner, hidden // 256 * 4)  # a quad a super-block
    assert layer.down_s.shape == (e * hidden, inner // 256 * 4)
    monkeypatch.setenv(cuda_moe.Q4K_SUPER_ENV, "0")
    old = make_layer(Q.Q4_K, Q.Q4_K, hidden, inner, e)
    assert old.formats == (("int4", 32, True),) * 2
    assert held_bytes(old) * 144 == file_bytes * 160
    assert held_bytes(old) == 3 * cuda_bytes(Q.Q4_K, (e, inner, hidden))
    monkeypatch.delenv(cuda_moe.Q4K_SUPER_ENV)
    mixed = CudaMoEExperts(expert_codes(Q.Q4_K, e, inner, hidden, 1),
                           expert_codes(Q.Q4_0, e, inner, hidden, 2),
                           expert_codes(Q.Q4_K, e, hidden, inner, 3), e)
    assert mixed.formats == (("int4", 32, True), ("q4k", 32, False))
    gate_up, _ = mixed.dequantize()
    up = expert_codes(Q.Q4_0, e, inner, hidden, 2).dequantize().view(e, inner, hidden)
    assert torch.equal(gate_up[:, inner:], up)


def test_unsupported_formats_are_refused():
    gate = expert_codes(Q.Q4_K, 2, 256, 256, 1)
    up = expert_codes(Q.Q8_0, 2, 256, 256, 2)  # gate and up must share a format to fuse
    with pytest.raises(ValueError):
        CudaMoEExperts(gate, up, expert_codes(Q.Q6_K, 2, 256, 256, 3), 2)


def test_max_blocks_bounds_every_routing():
    for p, e, m in ((8, 128, 16), (256, 128, 16), (300, 4, 64), (1, 1, 16)):
        ids = torch.randint(0, e, (p,))
        counts = torch.bincount(ids, minlength=e)
        assert int(((counts + m - 1) // m).sum()) <= cuda_moe.max_blocks(p, e, m)
        worst = torch.arange(p) % e  # picks spread over as many experts as possible
        counts = torch.bincount(worst, minlength=e)
        assert int(((counts + m - 1) // m).sum()) <= cuda_moe.max_blocks(p, e, m)


def check_align(ids: torch.Tensor, experts: int, block_m: int, sorted_ids, bexp) -> None:
    p = ids.numel()
    nb = cuda_moe.max_blocks(p, experts, block_m)
    slots = sorted_ids[: nb * block_m].view(nb, block_m).long()
    real = slots < p
    assert sorted(slots[real].tolist()) == list(range(p))  # every pick once
    assert (sorted_ids[nb * block_m:] == p).all()
    for b in range(nb):
        e = int(bexp[b])
        if e == experts:
            assert not real[b].any()
            continue
        picks = slots[b][real[b]]
        assert (ids[picks] == e).all() and picks.tolist() == sorted(picks.tolist())


def interpreter_check() -> None:
    """Run in a process started with TRITON_INTERPRET=1: the kernels on CPU tensors."""
    from pensieve.backends.cuda_moe import Tiles, align, align_torch, moe_experts

    # fewer programs: the interpreter runs each in turn
    cuda_moe.GEMV = cuda_moe.GEMV_FEW = Tiles(1, 64, 256, 4, 2)

    for p, e, m in ((4, 8, 16), (24, 6, 16), (160, 6, 16), (37, 128, 16), (100, 5, 64)):
        ids = torch.randint(0, e, (p,), generator=torch.Generator().manual_seed(p))
        s1, b1 = align(ids, e, m)
        s2, b2 = align_torch(ids, e, m)
        check_align(ids, e, m, s1, b1)
        check_align(ids, e, m, s2, b2)
        nb = cuda_moe.max_blocks(p, e, m)
        assert torch.equal(s1[: nb * m], s2) and torch.equal(b1, b2), (p, e, m)
    experts, k = 6, 4
    for i, (gu, dn, hidden, inner) in enumerate(MIXES):
        layer = make_layer(gu, dn, hidden, inner, experts, seed=20 + i)
        gate_up, down = (w.double() for w in layer.dequantize())
        for tokens in (1, 3, 40) if i == 0 else (3, 40):
            w, ids = routing(tokens, experts, k, tokens)
            x = torch.randn(tokens, hidden)
            ref = reference_experts(x.double(), w.double(), ids, gate_up, down)
            # the pick GEMV's tiles: as set above, and with the gate/up rows paired
            paired = Tiles(1, 16, 64, 4, 2, pair=True)
            routes = (("gemv", None), ("gemv", paired), ("grouped", None))
            for route, tiles in routes if tokens < 40 else (("grouped", None),):
                y = moe_experts(x, w, ids, *layer.stacks(), experts, route=route, tiles=tiles)
                r = rel(y, ref)
                assert r < 1e-5, (gu.name, dn.name, tokens, route, tiles, r)
                picks = moe_experts(x, w, ids, *layer.stacks(), experts, route=route,
                                    tiles=tiles, summed=False)  # for a fused add + norm
                assert picks.shape == (tokens, k, hidden) and torch.equal(picks.sum(1), y)
    # float16 activations through the tensor-core tiles (small: random_raw's weights reach ±50)
    xh = (torch.randn(5, 256) * 1e-3).half()
    layer = make_layer(Q.Q4_K, Q.Q6_K, 256, 256, experts, seed=9)
    gate_up, down = (t.double() for t in layer.dequantize())
    w, ids = routing(5, experts, k, 9)
    ref = reference_experts(xh.double(), w.double(), ids, gate_up, down)
    for route in ("gemv", "grouped"):
        r = rel(moe_experts(xh, w.half(), ids, *layer.stacks(), experts, route=route), ref)
        assert r < 3e-3, (route, r)
    gemv_pair_check()
    moe_block_check()


def gemv_pair_check() -> None:
    """The pick GEMV with its own tile a launch (``GemvTiles``): gate/up paired, down at 32
    rows a program, or its row whole in one step wider than K (768 in one 1024: the 6-bit and
    q4k layouts' ``MASK_K``; 96 in 128: int4's; 160 in 256: int8's masking) against float64;
    a tile pair is the pick GEMV's only."""
    from pensieve.backends.cuda_moe import GemvTiles, Tiles, moe_experts

    experts, k, tokens = 4, 2, 3
    gate_up = Tiles(1, 16, 128, 4, 2, pair=True)
    downs = (Tiles(1, 32, 1024, 8, 2), Tiles(1, 32, 128, 4, 2))
    for i, (gu, dn, hidden, inner) in enumerate(((Q.Q4_K, Q.Q6_K, 256, 768),
                                                 (Q.Q4_K, Q.Q4_K, 256, 768),
                                                 (Q.Q4_0, Q.Q4_0, 64, 96),
                                                 (Q.Q4_0, Q.Q8_0, 96, 160))):
        layer = make_layer(gu, dn, hidden, inner, experts, seed=40 + i)
        gate_up_w, down_w = (w.double() for w in layer.dequantize())
        w, ids = routing(tokens, experts, k, i)
        x = torch.randn(tokens, hidden)
        ref = reference_experts(x.double(), w.double(), ids, gate_up_w, down_w)
        for down in downs:
            y = moe_experts(x, w, ids, *layer.stacks(), experts, route="gemv",
                            tiles=GemvTiles(gate_up, down))
            assert rel(y, ref) < 1e-5, (gu.name, dn.name, inner, down, rel(y, ref))
    with pytest.raises(TypeError, match="pick GEMV"):
        moe_experts(x, w, ids, *layer.stacks(), experts, route="grouped",
                    tiles=GemvTiles(gate_up, downs[0]))


def moe_block_check() -> None:
    """A Qwen3-MoE ``MoE`` block (router + float experts) against the same block with its
    experts on the kernels over Q4_0 / Q8_0 codes of those weights."""
    import numpy as np
    from gguf.quants import quantize

    from pensieve.models.args import ModelArgs, MoEArgs
    from pensieve.models.moe import MoE

    e, k, hidden, inner = 8, 2, 256, 256
    args = ModelArgs(architecture="qwen3_moe", vocab_size=10, hidden_size=hidden,
                     intermediate_size=inner, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=64, max_position_embeddings=64,
                     moe=MoEArgs(num_experts=e, top_k=k, expert_size=inner, norm_topk=True))
    torch.manual_seed(0)
    block = MoE(args)
    codes = []
    for rows, cols, qtype in ((inner, hidden, Q.Q4_0), (inner, hidden, Q.Q4_0),
                              (hidden, inner, Q.Q8_0)):  # types gguf-py quantises
        a = (torch.randn(e * rows, cols) / cols ** 0.5).numpy().astype(np.float32)
        raw = torch.from_numpy(quantize(a, qtype).reshape(-1))
        codes.append(quant_groups(raw, qtype, (e * rows, cols)))
    layer = CudaMoEExperts(*codes, e)
    gate_up, down = layer.dequantize()
    with torch.no_grad():
        block.gate.weight.normal_()
        block.experts.gate_up_proj.weight.copy_(gate_up)
        block.experts.down_proj.weight.copy_(down)
    x = torch.randn(9, hidden)
    with torch.no_grad():
        ref = block(x).double()
        weights, ids = block.gate(x)
        for route in ("gemv", "grouped"):
            y = cuda_moe.moe_experts(x, weights, ids, *layer.stacks(), e, route=route)
            assert rel(y, ref) < 1e-5, route


def test_kernels_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_moe import interpreter_check as c; "
                              "c(); print('ok')")


def q4k_check() -> None:
    """The ``q4k`` layout's word quads (a super-block's d/dmin and the file's 12 scale bytes)
    in every kernel that reads them, against float64: Q4_K gate/up and down of two super-blocks
    a row; scale bytes all ones in some blocks (sc = m = 63 in all 8 sub-blocks, top bits
    set) and random elsewhere. The pick GEMV at steps of 128 (a quad's sub-blocks 4-7 in the
    second step of a super-block) and 512 (two quads a step) and down's 512 in one 1024-wide
    masked step; the grouped GEMM at steps of 64 and 512 (a row's quad once a step; per
    element past 256) and its swap-AB tile; the expert-major GEMV."""
    from pensieve.backends.cuda_moe import GemvTiles, Tiles, moe_experts

    experts, k, hidden, inner = 4, 2, 512, 512
    codes = []
    for rows, cols, seed in ((inner, hidden, 60), (inner, hidden, 61), (hidden, inner, 62)):
        raw = random_raw(Q.Q4_K, experts * rows, cols, seed)
        raw.view(-1, 144)[::3, 4:16] = 0xFF
        codes.append(quant_groups(raw, Q.Q4_K, (experts * rows, cols)))
    layer = CudaMoEExperts(*codes, experts)
    assert layer.formats == (("q4k", 32, False),) * 2
    gate_up, down = (w.double() for w in layer.dequantize())
    w, ids = routing(5, experts, k, 7)
    x = torch.randn(5, hidden) * 0.05
    ref = reference_experts(x.double(), w.double(), ids, gate_up, down)
    runs = [("gemv", GemvTiles(Tiles(1, 16, 128, 4, 2, pair=True), Tiles(1, 32, 128, 4, 2))),
            ("gemv", GemvTiles(Tiles(1, 8, 512, 4, 2), Tiles(1, 32, 1024, 8, 2))),
            ("grouped", Tiles(16, 32, 64, 4, 2)), ("grouped", Tiles(16, 32, 512, 4, 1)),
            ("grouped", Tiles(16, 32, 32, 4, 2, swap=True)),
            ("experts", Tiles(16, 32, 64, 4, 2, swap=True))]
    for route, tiles in runs:
        y = moe_experts(x, w, ids, *layer.stacks(), experts, route=route, tiles=tiles)
        assert rel(y, ref) < 1e-5, (route, tiles, rel(y, ref))


def test_q4k_word_quads_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_moe import q4k_check as c; "
                              "c(); print('ok')")


# --- on a GPU ----------------------------------------------------------------------------------

A3B = dict(experts=128, hidden=2048, inner=768, k=8)  # Qwen3-30B-A3B's expert shapes


@needs_cuda
@pytest.mark.parametrize("gu,dn", [(Q.Q4_K, Q.Q6_K), (Q.Q4_K, Q.Q4_K), (Q.Q8_0, Q.Q8_0),
                                   (Q.Q6_K, Q.Q5_K)])
def test_cuda_kernels_against_float64_at_30b_a3b_shapes(gu, dn):
    e, h, i, k = A3B["experts"], A3B["hidden"], A3B["inner"], A3B["k"]
    layer = make_layer(gu, dn, h, i, e, seed=1).cuda()
    gate_up, down = (w.cuda().double() for w in layer.dequantize())
    for tokens in (1, 3, 8, 32, 100, 300):
        w, ids = routing(tokens, e, k, tokens)
        x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(tokens))
        ref = reference_experts(x.cuda().double(), w.cuda().double(), ids.cuda(), gate_up, down)
        routes = ("gemv", "grouped") if tokens <= 32 else ("grouped",)
        for route in routes + (None,):
            y = cuda_moe.moe_experts(x.cuda().bfloat16(), w.cuda().bfloat16(), ids.cuda(),
                                     *layer.stacks(), e, route=route)
            assert y.dtype == torch.bfloat16 and not torch.isnan(y).any()
            r = rel(y, ref.cpu())
            assert r < 1e-2, (gu.name, dn.name, tokens, route, r)


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 4, 8, 40, 100])
def test_layer_in_a_cuda_graph(tokens):
    """The graph replays new activations and new routing (ids and weights changed in place):
    the same bits as eager calls (1-8 tokens: pick GEMV; 40: the one-program sort; 100 tokens
    × 8 picks: the torch-ops sort)."""
    e, h, i, k = 64, 512, 256, 8
    layer = make_layer(Q.Q4_K, Q.Q6_K, h, i, e, seed=2).cuda()
    x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
    w, ids = (t.cuda() for t in routing(tokens, e, k, 0))
    w = w.bfloat16()
    layer(x, w, ids)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x, w, ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x, w, ids)
    for seed in range(1, 4):
        x.normal_()
        nw, nids = routing(tokens, e, k, seed)
        w.copy_(nw)
        ids.copy_(nids)
        graph.replay()
        torch.testing.assert_close(y, layer(x, w, ids), atol=0, rtol=0)


@pytest.fixture(scope="module")
def gguf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_moe")


SANE_SCALES = {Q.Q4_0: ((0,), 0.01), Q.Q8_0: ((0,), 0.002), Q.Q4_K: ((0, 2), 5e-4),
               Q.Q6_K: ((208,), 5e-4)}  # byte offsets of float16 scales, their top: w ~ 0.1-0.5


def tiny_gguf(root, qtype: Q):  # noqa: ANN001, ANN201
    """A 2-layer Qwen3-MoE GGUF (8 experts, top-2, hidden 256) whose experts are random
    ``qtype`` blocks (Q4_0/Q8_0: the float model rounded through it)."""
    import numpy as np
    import transformers
    from gguf import GGML_QUANT_SIZES

    from tests.helpers.tiny_families import VOCAB
    from tests.helpers.tiny_moe import moe_model, quantize_experts_like_gguf, write_moe_gguf

    path = root / f"{qtype.name}.gguf"
    if path.exists():
        return path
    model = moe_model(transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, head_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True,
        tie_word_embeddings=False))
    if qtype in (Q.Q4_0, Q.Q8_0):
        quantize_experts_like_gguf(model, qtype)
        return write_moe_gguf(path, model, "qwen3moe", expert_qtype=qtype)
    rng = np.random.default_rng(0)

    def blocks(shape):  # noqa: ANN001, ANN202
        block, size = GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1]))
        raw = rng.integers(0, 256, size=(rows * shape[-1] // block, size), dtype=np.uint8)
        at_list, top = SANE_SCALES[qtype]
        for at in at_list:
            d = rng.uniform(top / 4, top, size=(raw.shape[0], 1)).astype(np.float16)
            raw[:, at:at + 2] = d.view(np.uint8)
        return raw.reshape(*shape[:-1], shape[-1] // block * size)

    return write_moe_gguf(path, model, "qwen3moe", expert_qtype=qtype, expert_blocks=blocks)


@pytest.mark.parametrize("qtype", [Q.Q4_K])
def test_gguf_experts_planned_for_cuda_give_the_float_models_logits(gguf_root, qtype):
    """The wiring, on CPU: planned for CUDA, the GGUF's expert codes become ``CudaMoEExperts``
    (no float expert weights planned, CUDA graphs allowed); run here on their reference
    path they give the logits of the same file dequantised on load."""
    from pensieve.backends.torch_backend import build_model, plan_weights
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.registry import load_checkpoint
    from pensieve.models.registry import model_class
    from tests.helpers.paged_run import paged_logits, prompt
    from tests.helpers.tiny_families import VOCAB

    path = tiny_gguf(gguf_root, qtype)
    ckpt = load_checkpoint(path, keep_int4=True)
    planned = plan_weights(ckpt, EngineConfig(context_length=64, device="cuda"),
                           packed=model_class(ckpt.args).PACKED)
    assert sorted(planned.experts) == [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    assert not [n for n in planned.floats if ".experts." in n]
    model = build_model(ckpt, EngineConfig(context_length=64), planned)
    assert sum(isinstance(m, CudaMoEExperts) for m in model.modules()) == 2
    assert model.fast_paths.cuda_graphs == model.fast_paths.paged_kernels
    float_ckpt = load_checkpoint(path)
    reference = build_model(float_ckpt, EngineConfig(context_length=64))
    ids = prompt(24, VOCAB)
    ours, _ = paged_logits(model, ckpt.args, ids, [8, 16])
    theirs, _ = paged_logits(reference, float_ckpt.args, ids, [8, 16])
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 1e-4 * scale  # Q4_K: the file's values


def cuda_tokens(model, ckpt, ids: list[int], steps: int):  # noqa: ANN001, ANN201
    from pensieve.backends.torch_backend import torch_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.types import SamplingParams

    engine = torch_engine(model, ckpt.args, ckpt.tokenizer, EngineConfig(
        context_length=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
        device="cuda", dtype=torch.float32))
    engine.add_request("r", ids, SamplingParams(max_tokens=steps, temperature=0.0,
                                                ignore_eos=True))
    out: list[int] = []
    while engine.has_work():
        for delta in engine.step():
            out.extend(delta.token_ids)
    return out, engine


@needs_cuda
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q4_K])
def test_qwen3_moe_gguf_on_cuda_gives_the_float_paths_greedy_tokens(gguf_root, qtype):
    """A tiny Qwen3-MoE GGUF whose experts are ``qtype``: loaded with its codes kept, the experts
    run on the kernels, under CUDA graphs; against the same file dequantised on load (the float
    expert loop, eager), both float32 on the GPU: the same tokens (Q4_K's ``q4k`` layout holds
    the file's values exactly; in the int4 layout its float16 scale products let a near tie
    part)."""
    from pensieve.backends.torch_backend import build_model
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.paged_run import prompt
    from tests.helpers.tiny_families import VOCAB

    path = tiny_gguf(gguf_root, qtype)
    cfg = EngineConfig(context_length=64, device="cuda", dtype=torch.float32)
    codes_ckpt = load_checkpoint(path, keep_int4=True)
    codes = build_model(codes_ckpt, cfg)
    assert sum(isinstance(m, CudaMoEExperts) for m in codes.modules()) == 2
    assert codes.fast_paths.cuda_graphs
    from pensieve.backends.cuda_layers import CudaLlamaBody, CudaMoEDecoderLayer
    from pensieve.models.moe import Router

    # the family's fused block (post-attention add + norm in one launch) on this engine
    assert all(type(layer) is CudaMoEDecoderLayer for layer in codes.model.layers)
    assert type(codes.model) is CudaLlamaBody  # the adds + norms fused, the picks' sum in them
    float_ckpt = load_checkpoint(path)
    reference = build_model(float_ckpt, cfg)
    assert not reference.fast_paths.cuda_graphs
    same = total = 0
    for seed in range(3):
        ids = prompt(20, VOCAB, seed=seed)
        ours, engine = cuda_tokens(codes, codes_ckpt, ids, 8)
        theirs, _ = cuda_tokens(reference, float_ckpt, ids, 8)
        assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
        # a uniform layout's runner selects on the router kernel too (not only hybrid ones)
        assert all(m.kernel is not None for m in codes.modules() if isinstance(m, Router))
        assert ours == theirs, seed
        same += sum(a == b for a, b in zip(ours, theirs))
        total += len(theirs)
    assert same >= 0.8 * total


def with_q4_0_attention(codes_ckpt, float_ckpt):  # noqa: ANN001, ANN201
    """Both checkpoints with every attention projection rounded through Q4_0: the codes one
    holds them as codes (they become the int4 CUDA layers ``prepare_for_cuda`` plans), the
    float one their dequantised values."""
    from dataclasses import replace

    import numpy as np
    from gguf.quants import quantize

    int4, floats, weights = dict(codes_ckpt.int4), dict(float_ckpt.weights), dict(
        codes_ckpt.weights)
    for name in [n for n in weights if ".self_attn." in n and n.endswith("_proj.weight")]:
        w = weights.pop(name).float()
        raw = torch.from_numpy(quantize(w.numpy().astype(np.float32), Q.Q4_0).reshape(-1))
        int4[name] = quant_groups(raw, Q.Q4_0, tuple(w.shape))
        floats[name] = int4[name].dequantize()
    return replace(codes_ckpt, int4=int4, weights=weights), replace(float_ckpt, weights=floats)


@needs_cuda
def test_moe_model_with_int4_attention_on_cuda(gguf_root):
    """Attention as int4 codes (planned by ``prepare_for_cuda``) beside Q8_0 experts on the
    kernels, under CUDA graphs: the greedy tokens of the same weights in float on the GPU."""
    from pensieve.backends.cuda_int4 import CudaInt4Linear
    from pensieve.backends.torch_backend import build_model
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.paged_run import prompt
    from tests.helpers.tiny_families import VOCAB

    path = tiny_gguf(gguf_root, Q.Q8_0)
    codes_ckpt, float_ckpt = with_q4_0_attention(load_checkpoint(path, keep_int4=True),
                                                 load_checkpoint(path))
    cfg = EngineConfig(context_length=64, device="cuda", dtype=torch.float32)
    codes = build_model(codes_ckpt, cfg)
    attn = [m for m in codes.modules() if isinstance(m, CudaInt4Linear)]
    assert attn and all(m.plan is not None for m in attn)
    reference = build_model(float_ckpt, cfg)
    for seed in range(2):
        ids = prompt(20, VOCAB, seed=seed)
        ours, engine = cuda_tokens(codes, codes_ckpt, ids, 8)
        assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
        assert ours == cuda_tokens(reference, float_ckpt, ids, 8)[0], seed


def test_q4k_kernels_compile_for_the_h100_without_spills():
    """The ``Q4K`` layout (Q4_K's own factors) built for sm_90 in bfloat16: the pick GEMV at
    the constant rule's tiles and the tuner's paired one (gate/up unpaired and paired, down
    routed), the grouped GEMM at its decode and prefill tiles; no register spills but the
    prefill tile's, as the int4 layout's there (Triton 3.9, this unaligned build: fused 200 vs
    int4's 240 bytes, routed 0 vs 8; 232 and 16 with the per-32 int16 factors before)."""
    from pensieve.backends import cuda_moe_kernels as kernels
    from pensieve.backends.cuda_moe_tune import GEMV_CANDIDATES
    from tests.helpers.triton_compile import compile_for
    from tests.unit.test_cuda_gdn import _resources

    types = {"X": "*bf16", "IDS": "*i32", "RW": "*bf16", "W": "*u8", "S": "*i32", "MN": "*i16",
             "D": "*i32", "B": "*i16", "Y": "*bf16", "N": "i32", "K": "i32", "stride_x": "i32",
             "stride_y": "i32", "SORTED": "*i32", "BEXP": "*i32", "P": "i32", "E": "i32"}
    q4k = dict(TOPK=8, INT4=False, SIX=False, Q4K=True, GS=32, HAS_MIN=False, HAS_BIAS=False,
               SWIGLU=False, ALPHA=0.0, LIMIT=0.0)
    for t in (cuda_moe.GEMV_FEW, cuda_moe.GEMV, *GEMV_CANDIDATES):
        for fuse, pair in ((True, False), (True, True), (False, False)):
            consts = dict(q4k, GATHER=fuse, FUSE=fuse, ROUTED=not fuse, BLOCK_N=t.block_n,
                          BLOCK_K=t.block_k, PAIR=pair)
            built = compile_for(kernels.pick_gemv, types, consts, t.num_warps, t.num_stages)
            assert "STACK:0 " in _resources(built), (t, fuse, pair, _resources(built))
    spills = lambda built: int(_resources(built).split("STACK:")[1].split()[0])  # noqa: E731
    for g in (cuda_moe.GROUPED_SMALL, cuda_moe.GROUPED):
        for fuse in (True, False):
            consts = dict(q4k, GATHER=fuse, FUSE=fuse, ROUTED=not fuse, BLOCK_M=g.block_m,
                          BLOCK_N=g.block_n, BLOCK_K=g.block_k)
            built = compile_for(kernels.grouped_gemm, types, consts, g.num_warps, g.num_stages)
            if g == cuda_moe.GROUPED:
                int4 = compile_for(kernels.grouped_gemm, dict(types, S="*i32"),
                                   dict(consts, INT4=True, Q4K=False), g.num_warps, g.num_stages)
                assert spills(built) <= spills(int4) + 16, (_resources(built), _resources(int4))
            else:
                assert spills(built) == 0, (g, fuse, _resources(built))


def test_six_bit_kernels_compile_for_the_h100():
    """The 6-bit (Q6_K: d·sc) path of both kernels built for sm_90 in bfloat16 here, no GPU
    needed (Triton's own ptxas): the decode pick GEMV fused and routed, the grouped GEMM."""
    from pensieve.backends import cuda_moe_kernels as kernels
    from tests.helpers.triton_compile import compile_for

    types = {"X": "*bf16", "IDS": "*i32", "RW": "*bf16", "W": "*u8", "S": "*i8", "MN": "*u8",
             "D": "*i16", "B": "*i8", "Y": "*bf16", "N": "i32", "K": "i32", "stride_x": "i32",
             "stride_y": "i32", "SORTED": "*i32", "BEXP": "*i32", "P": "i32", "E": "i32"}
    six = dict(TOPK=8, INT4=False, SIX=True, GS=16, HAS_MIN=False, HAS_BIAS=False, SWIGLU=False,
               ALPHA=0.0, LIMIT=0.0)
    t = cuda_moe.GEMV_FEW
    for fuse in (True, False):
        consts = dict(six, GATHER=fuse, FUSE=fuse, ROUTED=not fuse, BLOCK_N=t.block_n,
                      BLOCK_K=t.block_k)
        assert compile_for(kernels.pick_gemv, types, consts, t.num_warps, t.num_stages)
    g = cuda_moe.GROUPED_SMALL
    consts = dict(six, GATHER=True, FUSE=True, ROUTED=False, BLOCK_M=g.block_m,
                  BLOCK_N=g.block_n, BLOCK_K=g.block_k)
    assert compile_for(kernels.grouped_gemm, types, consts, g.num_warps, g.num_stages)
