"""The 4-16-row int4 tensor-core kernel ``skinny2`` (``backends/cuda_int4_skinny2.py``).

On CPU: tiles in Triton's interpreter (a fresh process; the codes made operands by Triton ops
there, ``ASM=False``) against the dequantised weight's float64 product — N = 45 (no tile
divides it), K of 14 groups (an odd split) and of 8, Q4_0's scales alone and affine pairs,
float32 and float16 x, 1, 3, 8 rows (the 8-row dot) and 9, 16 (the 16-row one), split-K and
not, each call twice (the counters reset); the route through ``int4_linear`` (and to ``skinny``
where a plan names ``skinny2`` without its tiles); the plan cache's round trip; each start-time
candidate compiled for sm_90 by Triton's own ptxas at both row paddings (the PTX unpacking).
With a GPU: every candidate in bfloat16 and float16 at model shapes and N = 45 against float64,
under a CUDA graph, and the tuner's plan.
"""

from __future__ import annotations

import pytest
import torch

from pensieve.backends import cuda_int4, cuda_int4_skinny2
from pensieve.backends.cuda_int4_skinny2 import CANDIDATES, Skinny2, fits, skinny2
from tests.helpers.cuda_graph_check import assert_replays_as_eager
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.unit.test_cuda_int4_gemv import rel, weight

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PREFETCHING = tuple(c for c in cuda_int4_skinny2.SWEEP if c.prefetch)


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The float64 product with x rounded as the kernel multiplies it (float32 x → float16)."""
    xr = x.to(torch.float16) if x.dtype == torch.float32 else x
    return xr.double() @ w.T


def interpreter_check() -> None:
    cases = (  # (K, sym, cfg, rows, dtype)
        (448, True, Skinny2(16, 1, 7), 8, torch.float32),  # 14 groups, 7 splits of 2 steps
        (448, False, Skinny2(32, 2, 7), 3, torch.float32),
        (448, False, Skinny2(64, 1, 2), 9, torch.float16),  # 16-row dot, 7 steps a split
        (256, True, Skinny2(32, 2, 4), 16, torch.float32),
        (256, False, Skinny2(16, 4, 1, 2, 2), 1, torch.float32),  # one split: y directly
        (256, True, Skinny2(64, 2, 2), 5, torch.float16),
        (448, True, Skinny2(32, 1, 2, prefetch=1), 3, torch.float32),  # by-hand prefetch
        (448, False, Skinny2(16, 1, 7, prefetch=1), 12, torch.float16),  # 2 groups a split
        (256, False, Skinny2(32, 1, 1, prefetch=1), 8, torch.float32),
    )
    for k, sym, cfg, rows, dtype in cases:
        packed, so, w = weight(45, k, sym, seed=k + rows)
        x = torch.randn(rows, k).to(dtype)
        ref = reference(x, w)
        first = skinny2(x, packed, so, cfg)
        again = skinny2(x, packed, so, cfg)  # the counters were put back to 0
        assert first.shape == (rows, 45) and first.dtype == dtype
        assert torch.equal(first, again), cfg
        # float32 sums of exact products, less the magic's 1024·Σx taken off a group's sum
        # (~1e-5 relative); float16 y's own rounding
        tol = 2e-3 if dtype == torch.float16 else 1e-4
        assert rel(first, ref) < tol, (k, sym, cfg, rows, rel(first, ref))
    # the route: a plan naming "skinny2" for a bucket runs that bucket's tiles
    packed, so, w = weight(45, 256, False)
    plan = cuda_int4.Plan({4: "skinny2", 8: "skinny2"}, skinny=cuda_int4.Skinny(16, 2, 2, 4, 1),
                          skinny2={4: Skinny2(32, 2, 2)})
    x = torch.randn(3, 256)
    y = cuda_int4.int4_linear(x, packed, so, plan=plan)
    assert torch.equal(y, skinny2(x, packed, so, plan.skinny2[4]))
    # a bucket routed to "skinny2" without its tiles (a plan from elsewhere): skinny instead
    x = torch.randn(6, 256)
    y = cuda_int4.int4_linear(x, packed, so, plan=plan)
    assert torch.equal(y, cuda_int4.skinny(x, packed, so, plan.skinny))
    print("ok")


@pytest.mark.slow
def test_tiles_in_the_triton_interpreter():
    run_in_triton_interpreter(
        "import tests.unit.test_cuda_int4_skinny2 as t; t.interpreter_check()")


def test_candidates_fit_the_model_shapes_and_limits_are_refused():
    for c in CANDIDATES:
        for k in (4096, 12288, 14336):
            for rows in (1, 4, 8, 16):
                assert fits(c, rows, k), (c, rows, k)
    assert not fits(CANDIDATES[0], 17, 4096)
    assert not fits(Skinny2(64, 4, 4), 8, 32 * 24)  # 24 groups: not a multiple of 16
    assert not Skinny2(64, 1, 16).fits(4096)  # past the workspace's 8 splits
    assert not Skinny2(64, 2, 4, prefetch=1).fits(4096)  # by hand: one group a step
    packed, so, _ = weight(8, 64, True)
    with pytest.raises(ValueError):
        skinny2(torch.zeros(17, 64), packed, so, Skinny2(16, 1, 1))
    assert cuda_int4_skinny2.block_m(8) == 8 and cuda_int4_skinny2.block_m(9) == 16


def test_candidates_can_be_left_out(monkeypatch):
    assert cuda_int4_skinny2.candidates() == CANDIDATES
    monkeypatch.setenv(cuda_int4_skinny2.ENV, "0")
    assert cuda_int4_skinny2.candidates() == ()


def test_the_plan_cache_keeps_the_skinny2_tiles():
    from pensieve.backends import cuda_int4_plan_cache as plan_cache

    plan = cuda_int4.default_plan(4096)
    plan.route[8] = "skinny2"
    plan.skinny2 = {8: CANDIDATES[1], 16: CANDIDATES[0]}
    assert plan_cache.from_json(plan_cache.to_json(plan)) == plan
    old = plan_cache.to_json(plan)
    del old["skinny2"]  # a plan written before this kernel
    assert plan_cache.from_json(old).skinny2 == {}


def compile_candidates(cfgs, block_ms=(8, 16), syms=(True, False), dtype: str = "bf16") -> None:
    from pensieve.backends import cuda_int4_skinny2_kernels as kernels
    from tests.helpers.triton_compile import compile_for

    for cfg in cfgs:
        for bm in block_ms:
            for sym in syms:
                types = {"X": f"*{dtype}", "W": "*u8", "SO": "*i16" if sym else "*i32",
                         "Y": f"*{dtype}", "WS": "*fp32", "CNT": "*i32", "M": "i32", "N": "i32",
                         "GROUPS": "i32", "stride_x": "i32", "stride_y": "i32",
                         "stride_w": "i32"}
                consts = {"BLOCK_N": cfg.block_n, "BLOCK_G": cfg.block_g,
                          "SPLIT_K": cfg.split_k, "NUM_STAGES": cfg.num_stages, "SYM": sym,
                          "ASM": True, "BLOCK_M": bm, "PREFETCH": bool(cfg.prefetch)}
                assert compile_for(kernels.skinny2, types, consts, cfg.num_warps, 1) is not None


def test_a_candidate_compiles_for_the_h100():
    """The first start-time candidate, bfloat16 and float16 (the four PTX unpackings), both
    paddings, both scale forms, built for sm_90 here; a by-hand prefetching one."""
    compile_candidates(CANDIDATES[:1])
    compile_candidates(CANDIDATES[:1], block_ms=(8,), dtype="fp16")
    compile_candidates(PREFETCHING[:1], block_ms=(8,), syms=(True,))


@pytest.mark.slow
def test_every_candidate_compiles_for_the_h100():
    compile_candidates(CANDIDATES)


@needs_cuda
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (45, 512)])
@pytest.mark.parametrize("sym", [True, False])
def test_cuda_candidates_against_float64(n, k, sym):
    """Every candidate (and a by-hand prefetching sweep tile) in bfloat16 at 1, 4, 7, 8, 9 and 16
    rows (both paddings; float16 x at 8), twice in a row; N = 45: no tile divides it."""
    packed, so, w = weight(n, k, sym, seed=n + k)
    packed, so = packed.cuda(), so.cuda()
    gen = torch.Generator().manual_seed(k)
    for cfg in CANDIDATES + PREFETCHING[:1]:
        assert fits(cfg, 16, k)
        for rows, dtype in ((1, torch.bfloat16), (4, torch.bfloat16), (7, torch.bfloat16),
                            (8, torch.bfloat16), (8, torch.float16), (9, torch.bfloat16),
                            (16, torch.bfloat16)):
            x = torch.randn(rows, k, generator=gen).to(dtype)
            ref = x.double() @ w.T
            for _ in range(2):
                y = skinny2(x.cuda(), packed, so, cfg)
                assert y.dtype == dtype and not torch.isnan(y).any()
                r = rel(y, ref)
                assert r < 1e-2, (cfg, rows, dtype, r)


@needs_cuda
@pytest.mark.parametrize("rows", [8, 16])
def test_split_k_in_a_cuda_graph(rows):
    packed, so, _ = weight(4096, 4096, True)
    packed, so = packed.cuda(), so.cuda()
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    for cfg in CANDIDATES:
        assert_replays_as_eager(lambda v, c=cfg: skinny2(v, packed, so, c), x)


@needs_cuda
def test_the_tuner_times_the_skinny2_candidates():
    from pensieve.backends.cuda_int4 import CudaInt4Linear
    from pensieve.backends.cuda_int4_tune import plan_shape
    from pensieve.models.quant_linear import Int4Groups

    scales = torch.rand(4096, 128, device="cuda") * 0.004 + 0.001
    codes = torch.randint(0, 16, (4096, 4096), dtype=torch.uint8, device="cuda")
    layers = [CudaInt4Linear([Int4Groups(codes, scales, -8 * scales, 32)]).cuda()
              for _ in range(2)]
    plan, note = plan_shape(layers, torch.bfloat16, 5)
    assert set(plan.skinny2) == {4, 8, 16} and "skinny2" in note
    for rows in (4, 8, 16):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ cuda_int4.dequantize(layers[0].packed, layers[0].scale_offset,
                                               torch.float32).T
        y = cuda_int4.int4_linear(x, layers[0].packed, layers[0].scale_offset, plan=plan)
        assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2


def run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """A tiny interpreter for the PTX the unpacking uses (prmt's default mode, and / or / shr /
    mov on .b32, sub on packed bfloat16 / float16 pairs) over 32-bit registers."""
    regs = dict(inputs)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    def sub_pairs(a: int, b: int, dtype: torch.dtype) -> int:
        pa = torch.tensor([a & 0xFFFF, a >> 16], dtype=torch.int32).to(torch.int16).view(dtype)
        pb = torch.tensor([b & 0xFFFF, b >> 16], dtype=torch.int32).to(torch.int16).view(dtype)
        bits = (pa.float() - pb.float()).to(dtype).view(torch.int16).int() & 0xFFFF
        return int(bits[0]) | int(bits[1]) << 16

    for line in asm.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "prmt.b32":
            a, b, sel = (val(x) for x in src)
            pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
            regs[d] = sum(pool[(sel >> 4 * i) & 7] << 8 * i for i in range(4))
        elif op == "and.b32":
            regs[d] = val(src[0]) & val(src[1])
        elif op == "or.b32":
            regs[d] = val(src[0]) | val(src[1])
        elif op == "shr.u32":
            regs[d] = val(src[0]) >> val(src[1])
        elif op == "mov.b32":
            regs[d] = val(src[0])
        elif op in ("sub.rn.bf16x2", "sub.rn.f16x2"):
            dtype = torch.bfloat16 if "bf16" in op else torch.float16
            regs[d] = sub_pairs(val(src[0]), val(src[1]), dtype)
        else:
            raise AssertionError(f"unexpected PTX: {line}")
    return regs


@pytest.mark.parametrize("name", ["ASM_BF16", "ASM_FP16", "ASM_BF16_SYM", "ASM_FP16_SYM"])
def test_the_ptx_unpacking_gives_each_byte_its_lane(name):
    """What the interpreter cannot run: the inline PTX, on every byte value in every position —
    lane j of the low outputs ($0: bytes 0, 1; $1: bytes 2, 3) is byte j's low nibble as
    ``M + code`` (or ``code − 8`` in the Q4_0 form), of the high outputs ($2, $3) its high one."""
    from pensieve.backends import cuda_int4_skinny2_kernels as kernels

    asm = getattr(kernels, name).value
    dtype = torch.bfloat16 if "BF16" in name else torch.float16
    magic = 128 if dtype == torch.bfloat16 else 1024
    gen = torch.Generator().manual_seed(0)
    words = [0, 0xFFFFFFFF, 0x0F1E2D3C] + [b * 0x01010101 for b in range(256)] + [
        int(v) for v in torch.randint(0, 2**32, (64,), generator=gen, dtype=torch.int64)]
    for w in words:
        regs = run_ptx(asm, {"$4": w})
        lanes = []
        for r in ("$0", "$1", "$2", "$3"):
            pair = torch.tensor([regs[r] & 0xFFFF, regs[r] >> 16], dtype=torch.int32)
            lanes += pair.to(torch.int16).view(dtype).float().tolist()
        data = [(w >> 8 * j) & 0xFF for j in range(4)]
        codes = [b & 15 for b in data] + [b >> 4 for b in data]
        want = [c - 8 if "SYM" in name else magic + c for c in codes]
        assert lanes == want, (hex(w), lanes, want)
