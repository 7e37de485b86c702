"""MoE experts kept as their GGUF codes on the CPU kernels (``backends/cpu_quant/expert_linear.py``):
each routed expert runs on its slice of one stacked code buffer per projection.

Against the same experts dequantised and run in float (``models.moe.Experts``): the expert MLP
output for decode-sized and prefill-sized batches (row tiles and panel GEMM) in each code type,
at the tolerance the dense ``CodesLinear`` tests use; through the loader and the engine, a tiny
Qwen3-MoE GGUF with Q4_0 / Q8_0 / Q4_K experts gives the greedy tokens of the dequantised
path; the experts' bytes held are the codes' (no float copy), within the formats' overhead of
the file's own bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from pensieve.backends.cpu_quant import load_kernels
from pensieve.backends.cpu_quant import build
from pensieve.backends.cpu_quant.codes_linear import CodesLinear
from pensieve.backends.cpu_quant.expert_linear import SlicedExperts
from pensieve.backends.cpu_quant.linear import Q4Linear
from pensieve.backends.torch_backend import build_model
from pensieve.engine.config import EngineConfig
from pensieve.loaders.gguf_file import GGUFFile
from pensieve.loaders.int4_codes import ExpertCodes, Int8Groups, quant_groups
from pensieve.loaders.quants import reference_dequantize
from pensieve.loaders.registry import load_checkpoint
from pensieve.models.moe import Experts
from tests.helpers.paged_run import engine_tokens, prompt
from tests.helpers.tiny_families import VOCAB

transformers = pytest.importorskip("transformers")

from tests.helpers.tiny_moe import moe_model, quantize_experts_like_gguf, write_moe_gguf  # noqa: E402

KERNELS = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")

# byte offsets of each type's float16 scales, and their range: weights ~ ±0.1-0.5
SCALES = {Q.Q4_0: ((0,), 0.01), Q.Q8_0: ((0,), 0.002), Q.Q4_K: ((0, 2), 5e-4),
          Q.Q5_K: ((0, 2), 2.5e-4), Q.Q6_K: ((208,), 5e-4)}


def random_blocks(qtype: Q, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random ``qtype`` blocks for a float tensor of ``shape`` (uint8 [..., bytes a row]) with
    float16 scales in a sane range."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    rows = int(np.prod(shape[:-1]))
    raw = rng.integers(0, 256, size=(rows * shape[-1] // block, size), dtype=np.uint8)
    at_list, top = SCALES[qtype]
    for at in at_list:
        d = rng.uniform(top / 4, top, size=(raw.shape[0], 1)).astype(np.float16)
        raw[:, at:at + 2] = d.view(np.uint8)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def stacked(qtype: Q, e: int, n: int, k: int, seed: int) -> tuple[ExpertCodes, torch.Tensor]:
    raw = torch.from_numpy(random_blocks(qtype, (e, n, k), seed)).reshape(-1)
    codes = quant_groups(raw, qtype, (e, n, k))
    assert isinstance(codes, ExpertCodes) and codes.shape == (e, n, k)
    return codes, reference_dequantize(raw, qtype, (e * n, k)).view(e, n, k)


def sliced_and_reference(qtypes: tuple[Q, Q, Q], e: int = 4, h: int = 256, i: int = 256,
                         act=F.silu):  # noqa: ANN001
    (gate, g), (up, u), (down, d) = (stacked(t, e, n, kk, seed) for seed, (t, n, kk) in
                                     enumerate(zip(qtypes, (i, i, h), (h, h, i))))
    gu_layer = (Q4Linear if all(t in (Q.Q4_0, Q.Q4_K) for t in qtypes[:2]) else CodesLinear)(
        KERNELS, [gate.groups, up.groups])
    layer = SlicedExperts(gu_layer, CodesLinear(KERNELS, down.groups), e, act, act is F.silu)
    ref = Experts.__new__(Experts)
    torch.nn.Module.__init__(ref)
    ref.num_experts, ref.act = e, act
    ref.gate_up_proj = torch.nn.Module()
    ref.gate_up_proj.weight = torch.cat([g, u], dim=1)
    ref.down_proj = torch.nn.Module()
    ref.down_proj.weight = d
    return layer, ref


def routing(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.softmax(torch.randn(t, k, generator=g), dim=-1)
    return weights, ids


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("qtypes", [
    (Q.Q4_0, Q.Q4_0, Q.Q4_0), (Q.Q8_0, Q.Q8_0, Q.Q8_0), (Q.Q4_K, Q.Q4_K, Q.Q6_K),
    (Q.Q5_K, Q.Q5_K, Q.Q5_K), (Q.Q4_K, Q.Q6_K, Q.Q8_0)])
def test_sliced_experts_match_dequantised_float(qtypes):
    """Decode (1-3 tokens: the row tiles) and prefill (96 tokens × top-2 over 4 experts: ~48
    rows an expert, the panel GEMM); the dense CodesLinear tests' 1e-3."""
    layer, ref = sliced_and_reference(qtypes)
    for t in (1, 3, 96):
        x = torch.randn(t, 256, generator=torch.Generator().manual_seed(t))
        x[:, 3] *= 40  # an outlier channel, as RMSNorm outputs have
        weights, ids = routing(t, 4, 2, seed=t)
        want = Experts.forward(ref, x, weights, ids)
        assert rel_err(layer(x, weights, ids), want) < 1e-3, t


@pytest.mark.parametrize("act", [F.silu, F.gelu])
def test_one_token_takes_its_picks_in_order_bitwise_as_the_grouped_path(act):
    """A decode step's one token skips the grouping (argsort, bincount, gathers): the same
    kernel calls and the same weighted sum, so the same bits as the grouped path gives it
    where each expert there gets that one row too (disjoint picks: the kernels' row tiles differ
    with the rows)."""
    layer, _ = sliced_and_reference((Q.Q4_K, Q.Q4_K, Q.Q6_K), act=act)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(5))
    weights, _ = routing(2, 4, 2, seed=5)
    ids = torch.tensor([[3, 0], [1, 2]])  # picks out of expert order
    both = layer(x, weights, ids)  # two tokens: the grouped path
    grouped = torch.bincount
    torch.bincount = None  # the one-token path never groups
    try:
        for t in range(2):
            one = layer(x[t:t + 1], weights[t:t + 1], ids[t:t + 1])
            assert torch.equal(one, both[t:t + 1]), t
    finally:
        torch.bincount = grouped


def g16_experts(e: int, n: int, k: int, seed: int) -> Int8Groups:
    """Stacked experts [E·N, K] as int8 codes with a float16 scale per 16 (``F_Q8G16``)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (e * n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(e * n, k // 16, generator=g) * 2e-3 + 5e-4).half()
    return Int8Groups(codes, scales, None, 16, "test")


def experts_of(kinds: tuple, e: int = 8, h: int = 256, i: int = 256) -> SlicedExperts:
    """A SiLU SlicedExperts whose gate, up and down are ``kinds`` (a GGUF type, or "G16")."""
    def codes(kind, n: int, k: int, seed: int):  # noqa: ANN001, ANN202
        if kind == "G16":
            return g16_experts(e, n, k, seed)
        return stacked(kind, e, n, k, seed)[0].groups
    gate, up, down = (codes(t, n, kk, seed) for seed, (t, n, kk) in
                      enumerate(zip(kinds, (i, i, h), (h, h, i))))
    gu_layer = (Q4Linear if all(t in (Q.Q4_0, Q.Q4_K) for t in kinds[:2]) else CodesLinear)(
        KERNELS, [gate, up])
    return SlicedExperts(gu_layer, CodesLinear(KERNELS, down), e, F.silu, True)


@pytest.mark.parametrize("isa", ["avx2", "avx512_vnni"])
@pytest.mark.parametrize("kinds, h, i", [
    ((Q.Q4_0, Q.Q4_0, Q.Q8_0), 160, 96), ((Q.Q4_K, Q.Q6_K, Q.Q8_0), 256, 256),
    ((Q.Q4_K, Q.Q4_K, Q.Q6_K), 256, 256), ((Q.Q5_K, "G16", Q.Q5_K), 256, 256),
    ((Q.Q8_0, Q.Q4_K, "G16"), 256, 256)])
def test_one_call_picks_are_bitwise_one_pqx_mlp_a_pick(kinds, h, i, isa):
    """pqx_moe_rows (a token's k picks in one call: every pick's gate_up rows in one pass over
    the threads, SiLU·up, every down in one more) against one pqx_mlp call a pick: the same
    bits for k = 1, 2, 8 on 1 and 2 threads, in each format (gate and up in differing ones:
    two parts), on both instruction sets; and a bad id is refused."""
    if KERNELS.set_isa(isa) != isa:
        pytest.skip(f"no {isa} here")
    try:
        layer = experts_of(kinds, 8, h, i)
        x = torch.randn(1, h, generator=torch.Generator().manual_seed(h))
        x[:, 3] *= 40
        g = torch.Generator().manual_seed(1)
        for k in (1, 2, 8):
            ids = torch.randperm(8, generator=g)[:k]
            want = torch.empty(k, h)
            got = {}
            for threads in (1, 2):
                layer.gate_up_proj.threads = layer.down_proj.threads = threads
                for j, e in enumerate(ids.tolist()):
                    layer.expert_mlp(e, x, want[j:j + 1])
                got[threads] = torch.full((k, h), float("nan"))
                layer.picks_mlp(x, ids, got[threads])
                assert torch.equal(got[threads], want), (k, threads)
        with pytest.raises(IndexError):
            layer.picks_mlp(x, torch.tensor([0, 8]), torch.empty(2, h))
    finally:
        KERNELS.set_isa(build.default_isa())


def test_one_token_forward_takes_the_one_call_unless_switched_off(monkeypatch):
    """A one-token SiLU forward runs pqx_moe_rows; PENSIEVE_CPU_MOE_ONE_CALL=0 keeps one
    pqx_mlp call a pick (A/B benches); both give the same bits."""
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(2))
    weights, ids = routing(1, 8, 2, seed=2)
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("PENSIEVE_CPU_MOE_ONE_CALL", flag)
        layer = experts_of((Q.Q4_K, Q.Q4_K, Q.Q6_K))
        assert layer.one_call == (flag == "1")
        out[flag] = layer(x, weights, ids)
    assert torch.equal(out["1"], out["0"])


def test_another_activation_runs_between_the_projections():
    layer, ref = sliced_and_reference((Q.Q8_0,) * 3, act=F.gelu)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(0))
    weights, ids = routing(20, 4, 3, seed=0)
    assert rel_err(layer(x, weights, ids), Experts.forward(ref, x, weights, ids)) < 1e-3


def test_an_expert_reads_its_own_slice_of_the_stacked_buffer():
    """Expert e's parts point into the one stacked buffer at its rows: no per-expert copy."""
    layer, _ = sliced_and_reference((Q.Q4_K, Q.Q4_K, Q.Q6_K))
    codes, row_bytes = layer.gate_up_proj.codes, layer.gate_up_proj.codes.stride(0)
    down = layer.down_proj.codes0
    for e in range(4):
        assert layer._gu[e].part[0].codes == codes.data_ptr() + e * 256 * row_bytes
        assert layer._gu[e].part[1].codes == codes.data_ptr() + (4 + e) * 256 * row_bytes
        assert layer._down[e].part[0].codes == down.data_ptr() + e * 256 * down.stride(0)


# --- through the loader and the engine --------------------------------------------------------

DIMS = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, head_dim=64,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True,
            tie_word_embeddings=False)
CONTEXT = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe_codes")


def moe_gguf(root: Path, qtype: Q) -> Path:
    model = moe_model(transformers.Qwen3MoeConfig(**DIMS))
    if qtype in (Q.Q4_0, Q.Q8_0):
        quantize_experts_like_gguf(model, qtype)
        return write_moe_gguf(root / f"{qtype.name}.gguf", model, "qwen3moe", expert_qtype=qtype)
    seeds = iter(range(100))
    return write_moe_gguf(root / f"{qtype.name}.gguf", model, "qwen3moe", expert_qtype=qtype,
                          expert_blocks=lambda shape: random_blocks(qtype, shape, next(seeds)))


def expert_bytes(model: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for m in model.modules()
               if isinstance(m, SlicedExperts) for b in m.buffers())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q4_K])
def test_engine_greedy_tokens_equal_the_dequantised_path(root, qtype):
    path = moe_gguf(root, qtype)
    codes_ckpt = load_checkpoint(path, keep_int4=True)
    codes = build_model(codes_ckpt, EngineConfig(context_length=CONTEXT))
    float_ckpt = load_checkpoint(path)  # every weight dequantised on load
    reference = build_model(float_ckpt, EngineConfig(context_length=CONTEXT))
    sliced = [m for m in codes.modules() if isinstance(m, SlicedExperts)]
    assert len(sliced) == 2 and not any(isinstance(m, SlicedExperts) for m in reference.modules())
    assert not any(isinstance(m, Experts) for m in codes.modules())
    # the experts' bytes are the codes': no float [E, N, K] copy anywhere in the model
    e, h, i = 8, 256, 256
    assert not any(t.is_floating_point() and t.numel() >= e * h * i
                   for t in [*codes.parameters(), *codes.buffers()])
    gf = GGUFFile(path)
    file_bytes = sum(gf.raw(n).numel() for n in gf.tensors if "_exps" in n)
    assert file_bytes <= expert_bytes(codes) <= 1.12 * file_bytes
    for seed in range(2):
        ids = prompt(20, VOCAB, seed=seed)
        assert engine_tokens(codes, codes_ckpt, CONTEXT, ids, 8) == engine_tokens(
            reference, float_ckpt, CONTEXT, ids, 8)


def test_a_family_without_the_path_dequantises(root, monkeypatch):
    """``cpu_moe_codes`` is the family's promise: without it the experts are float again."""
    from types import SimpleNamespace

    from pensieve.backends import torch_backend
    from pensieve.models.family import FastPaths

    path = moe_gguf(root, Q.Q8_0)
    ckpt = load_checkpoint(path, keep_int4=True)
    monkeypatch.setattr(torch_backend, "family_of",
                        lambda args: SimpleNamespace(fast_paths=lambda a, c: FastPaths()))
    model = build_model(ckpt, EngineConfig(context_length=CONTEXT))
    assert not any(isinstance(m, SlicedExperts) for m in model.modules())
    assert sum(isinstance(m, Experts) for m in model.modules()) == 2


def test_packed_cache_maps_the_expert_codes(root, tmp_path, monkeypatch):
    """serve's load path: the first start writes the packed copy (the stacked expert layers are
    ordinary code layers to it), the second maps it, slices the experts again and computes the
    same logits bit for bit; the expert codes are the copy's pages."""
    import argparse

    from pensieve.backends.kernel_choice import choose
    from pensieve.cli import serve, serve_torch
    from pensieve.cli.settings import settings_from_args
    from tests.helpers.paged_run import paged_logits
    from tests.unit.test_packed_cache import mapping_of

    monkeypatch.setenv("PENSIEVE_PACKED_CACHE", str(tmp_path / "packed"))
    path = moe_gguf(root, Q.Q4_K)
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    settings = settings_from_args(parser.parse_args(
        ["serve", "--model", str(path), "--context-length", str(CONTEXT)]), {})
    choice = choose("auto", device="cpu")
    runs = []
    for _ in range(2):
        entry = serve_torch.packed_entry(settings, choice)
        ckpt, _, model, write = serve_torch.load_model(settings, choice, entry)
        if write is not None:
            write().join()
        runs.append((ckpt, model, write is None))
    (ckpt, fresh, fresh_hit), (_, cached, cached_hit) = runs
    assert not fresh_hit and cached_hit
    ids = prompt(20, VOCAB, seed=5)
    assert torch.equal(paged_logits(fresh, ckpt.args, ids, [12])[1],
                       paged_logits(cached, ckpt.args, ids, [12])[1])
    sliced = next(m for m in cached.modules() if isinstance(m, SlicedExperts))
    assert mapping_of(sliced.gate_up_proj.codes.data_ptr()) == str(entry.path)
