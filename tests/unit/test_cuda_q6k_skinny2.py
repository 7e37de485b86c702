"""Q6_K ``skinny2`` (``backends/cuda_q6k_skinny2.py``): the 6-bit codes made mma.sync operands.

On CPU: tiles in Triton's interpreter (a fresh process; the codes unpacked by Triton ops there,
``ASM=False``) against the float64 product of the dequantised weight — N = 45 (no tile divides
it), K of 16 and 24 groups, float32 and float16 x (bfloat16 on the GPU: the interpreter has
none), 1, 3, 8 rows (the 8-row dot) and 9, 16 (the 16-row one), split-K and not, each call
twice (the counters reset), a strided y, the route through ``cuda_q6k.launch``; the tuner's
race with a priced timer; the PTX unpacking in a small PTX interpreter on every byte value;
each start-time candidate compiled for sm_90 (no spill, mma.sync, the unpacked codes never
through shared memory). With a GPU: every candidate in bfloat16 (and float16) at Qwen3-8B's
ffn_down / attn_v shapes and a head-sized N against float64, a CUDA-graph replay, the tuner's
plan.
"""

from __future__ import annotations

import os

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends import cuda_q6k, cuda_q6k_skinny2
from pensieve.backends.cuda_q6k import CudaQ6KLinear
from pensieve.backends.cuda_q6k_skinny2 import CANDIDATES, Skinny2, fits, gemm_skinny2, split_of
from tests.helpers.cuda_graph_check import assert_replays_as_eager
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.helpers.tune_race import few_q6k_tiles, first_q6k_tiles, kept_warnings
from tests.unit.test_cuda_int8 import groups, rel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def layer_of(n: int, k: int, seed: int) -> CudaQ6KLinear:
    return CudaQ6KLinear([groups(Q.Q6_K, n // 2, k, seed=seed),
                          groups(Q.Q6_K, n - n // 2, k, seed=seed + 1)])


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float64 product, x rounded as the kernel multiplies it (float32 x → float16)."""
    xr = x.to(torch.float16) if x.dtype == torch.float32 else x
    return xr.double() @ weight.T


def kernels_check() -> None:
    cases = (  # (K, tile, rows, dtype)
        (512, Skinny2(16, 2, 4, 1, 2), 3, torch.float32),  # 8 steps over 4 splits
        (512, Skinny2(32, 4, 1), 9, torch.float16),  # one split: y directly, 16-row dot
        (512, Skinny2(64, 1, 16), 8, torch.float32),  # 16 splits of one group
        (768, Skinny2(16, 2, 16, 1), 16, torch.float32),  # 12 steps: split cut to 12
        (768, Skinny2(32, 4, 5), 1, torch.float16),  # 6 steps: split cut to 3
        (768, CANDIDATES[0], 5, torch.float32),
        (512, CANDIDATES[3], 8, torch.float16),
    )
    for k, t, rows, dtype in cases:
        layer = layer_of(45, k, seed=k + rows)
        w = layer.weight_buffers()
        ref = reference(x := torch.randn(rows, k).to(dtype), layer.dequantize().double())
        first = gemm_skinny2(x, w, torch.empty(rows, 45, dtype=dtype), t)
        again = gemm_skinny2(x, w, torch.empty(rows, 45, dtype=dtype), t)
        assert torch.equal(first, again), t  # the counters were put back to 0
        # float32 sums of exact products; float16 y's own rounding
        tol = 2e-3 if dtype == torch.float16 else 1e-5
        assert rel(first, ref) < tol, (k, t, rows, dtype, rel(first, ref))
    # a strided y (a column slice of a wider output) and the route through cuda_q6k.launch
    layer = layer_of(48, 512, 7)
    w, weight = layer.weight_buffers(), layer.dequantize().double()
    x = torch.randn(6, 512)
    wide = torch.full((6, 96), 7.0)
    gemm_skinny2(x, w, wide[:, :48], CANDIDATES[1])
    assert rel(wide[:, :48], reference(x, weight)) < 1e-5 and torch.all(wide[:, 48:] == 7.0)
    y = cuda_q6k.launch(("skinny2", CANDIDATES[1]), x, w)
    assert y.shape == (6, 48) and torch.equal(y, wide[:, :48])
    print("ok")


def tuner_check() -> None:
    """``skinny2`` in the tuner's race: priced cheapest it wins buckets 4-16 (never 1, 2, 32+),
    a wrong tile is left out with a warning, the planned routes give the product, and
    PENSIEVE_Q6K_SKINNY2=0 leaves it out."""
    from pensieve.backends import cuda_q6k_tune as tune
    from pensieve.backends.cuda_q6k_rows import Rows

    warnings = kept_warnings(tune.log)
    few_q6k_tiles(tune)  # the interpreter is slow
    tune.SPLIT_CANDIDATES = {b: (tune.SPLIT_CANDIDATES[b][0],) for b in (1, 2, 4, 8, 16)}
    tune.ROWS_CANDIDATES = (Rows(16, 16, 2, 4, 4, 1, 1),)
    cheap, other = Skinny2(16, 2, 4, 1, 2), Skinny2(32, 4, 2, 1, 2)
    cuda_q6k_skinny2.CANDIDATES = (other, cheap)
    price = {"gemv": 2.0, "split": 1.5, "rows": 1.2, "skinny2": 1.0, "skinny": 1.8,
             "gemm": 5.0, "dequant": 3.0}

    def timer(run, sample, reps):  # noqa: ANN001, ANN202
        run(sample[0])
        name, t = run.choice
        return price[name] + 0.01 * t.block_n / 16

    k = 512
    rows = {1: 1, 2: 2, 4: 3, 8: 5, 16: 16, 32: 17, 256: 18, 2048: 19}
    model = torch.nn.Sequential(layer_of(45, k, 1))
    tune.prepare(model, torch.float32, timer=timer, rows=rows)
    plan = model[0].plan
    assert all(plan[b] == ("skinny2", cheap) for b in (4, 8, 16)), plan
    assert plan[1][0] != "skinny2" and plan[2][0] != "skinny2" and plan[32][0] == "skinny"
    assert not warnings, warnings
    assert tune.describe(plan[16]) == "skinny2 16x2/4 w1 s2"
    weight = model[0].dequantize().double()
    for r in (3, 7, 16):  # the planned routes give the product
        x = torch.randn(r, k)
        assert rel(cuda_q6k.q6k_linear(x, model[0].weight_buffers(), plan),
                   reference(x, weight)) < 1e-5, r

    real = cuda_q6k_skinny2.gemm_skinny2

    def broken(x, w, y, t):  # noqa: ANN001, ANN202
        return y.zero_() if t == cheap else real(x, w, y, t)

    cuda_q6k_skinny2.gemm_skinny2 = broken
    try:
        tune.prepare(model, torch.float32, timer=timer, rows=rows)
    finally:
        cuda_q6k_skinny2.gemm_skinny2 = real
    assert all(model[0].plan[b] == ("skinny2", other) for b in (4, 8, 16)), model[0].plan
    assert any("relative error" in m and "skinny2" in m for m in warnings)
    os.environ[cuda_q6k_skinny2.ENV] = "0"
    tune.prepare(model, torch.float32, timer=timer, rows=rows)
    assert all(model[0].plan[b][0] == "rows" for b in (4, 8, 16)), model[0].plan
    print("ok")


@pytest.mark.slow
def test_skinny2_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k_skinny2 import kernels_check as c; "
                              "c()")


@pytest.mark.slow
def test_tuner_races_skinny2_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_q6k_skinny2 import tuner_check as c; "
                              "c()")


def test_fits_splits_and_refusals():
    for t in CANDIDATES:
        for k in (4096, 12288):
            for r in (1, 4, 8, 9, 16):
                assert fits(t, r, k), (t, r, k)
        for n, k in ((1024, 4096), (4096, 12288), (151936, 4096), (45, 768), (45, 512)):
            s = split_of(t, n, k // 32)
            assert (k // 32) % (t.block_g * s) == 0 and 1 <= s <= t.split_k, (t, n, k)
            assert s == 1 or n < cuda_q6k_skinny2.SPLIT_MAX_N
    assert split_of(Skinny2(64, 2, 16, 1), 1024, 128) == 16  # attn_v: 16 × 4 steps
    assert split_of(Skinny2(128, 2, 8), 4096, 384) == 8  # ffn_down: 8 × 24 steps
    assert split_of(Skinny2(128, 2, 8), 49152, 128) == 1  # a head: no split
    assert split_of(Skinny2(16, 2, 16), 45, 24) == 12
    t = CANDIDATES[0]
    assert not fits(t, 17, 4096) and not fits(t, 0, 4096)
    assert not fits(Skinny2(64, 4, 4), 8, 32 * 20)  # 20 groups: not whole super-blocks/steps
    assert not fits(Skinny2(64, 3, 4), 8, 32 * 24)  # a step must divide a super-block
    assert not fits(Skinny2(64, 8, 4), 8, 4096)  # 1, 2 or 4 groups a step
    assert not fits(Skinny2(8, 2, 4), 8, 4096)  # 16+ outputs a tile
    layer = layer_of(16, 512, 3)
    with pytest.raises(ValueError):
        gemm_skinny2(torch.zeros(17, 512), layer.weight_buffers(), torch.empty(17, 16), t)
    with pytest.raises(ValueError):  # through the router too
        cuda_q6k.launch(("skinny2", Skinny2(64, 3, 4)), torch.zeros(4, 512),
                        layer.weight_buffers())
    assert cuda_q6k_skinny2.block_m(8) == 8 and cuda_q6k_skinny2.block_m(9) == 16


def test_candidates_can_be_left_out(monkeypatch):
    assert cuda_q6k_skinny2.candidates() == CANDIDATES
    monkeypatch.setenv(cuda_q6k_skinny2.ENV, "0")
    assert cuda_q6k_skinny2.candidates() == ()


def test_the_plan_cache_keeps_skinny2():
    from pensieve.backends import cuda_q6k_plan_cache as plan_cache

    plan = cuda_q6k.default_plan(4096)
    plan[8] = ("skinny2", CANDIDATES[1])
    plan[16] = ("skinny2", CANDIDATES[0])
    assert plan_cache.from_json(plan_cache.to_json(plan)) == plan


# -- the PTX unpacking, by a small interpreter of the instructions it uses ---------------------

def _lanes(word: int, dtype: torch.dtype) -> list[float]:
    pair = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
    return pair.view(dtype).float().tolist()


def _pack(values: list[float], dtype: torch.dtype) -> int:
    bits = torch.tensor(values).to(dtype).view(torch.int16).int() & 0xFFFF
    return int(bits[0]) | int(bits[1]) << 16


def ptx_eval(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """Run ``asm`` (shr / shl / and / lop3 / prmt / mov on .b32, sub on packed bfloat16 or
    float16 pairs) over 32-bit registers; any other instruction fails the test."""
    regs = dict(regs)
    mask = 0xFFFFFFFF

    def arg(tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    body = asm.strip()
    assert body.startswith("{") and body.endswith("}")
    for stmt in body[1:-1].split(";"):
        stmt = " ".join(stmt.split())
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(" ", 1)
        dst, *src = [a.strip() for a in rest.split(",")]
        v = [arg(a) for a in src]
        if op == "shr.b32":
            out = v[0] >> v[1]
        elif op == "shl.b32":
            out = (v[0] << v[1]) & mask
        elif op == "and.b32":
            out = v[0] & v[1]
        elif op == "mov.b32":
            out = v[0]
        elif op == "lop3.b32":  # bit i: LUT[(a_i << 2) | (b_i << 1) | c_i]
            a, b, c, lut = v
            out = 0
            for i in range(32):
                idx = ((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1)
                out |= ((lut >> idx) & 1) << i
        elif op == "prmt.b32":  # default mode: byte i of d = byte sel_i of {b, a}
            a, b, sel = v
            pool = a | b << 32
            out = sum(((pool >> 8 * ((sel >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op in ("sub.rn.bf16x2", "sub.rn.f16x2"):
            dt = torch.bfloat16 if "bf16" in op else torch.float16
            out = _pack([p - q for p, q in zip(_lanes(v[0], dt), _lanes(v[1], dt))], dt)
        else:
            raise AssertionError(f"unexpected PTX: {stmt}")
        regs[dst] = out
    return regs


@pytest.mark.parametrize("name", ["ASM_BF16", "ASM_FP16"])
def test_the_ptx_unpacking_gives_each_code_its_lane(name):
    """Lane j of $0/$1 (bytes 0-1, 2-3) is byte j's low-half code − 32 — its low nibble and the
    hi byte's bits 0-1 (first half: ``ha``) or 2-3 (second: ``hb``) — and of $2/$3 its
    high-half code − 32 (high nibble, bits 4-5 or 6-7); every byte value in every position."""
    from pensieve.backends import cuda_q6k_skinny2_kernels as kernels

    asm = getattr(kernels, name).value
    dtype = torch.bfloat16 if name == "ASM_BF16" else torch.float16
    gen = torch.Generator().manual_seed(0)
    rand = [int(v) for v in torch.randint(0, 2**32, (96,), generator=gen, dtype=torch.int64)]
    words = [0, 0xFFFFFFFF, 0x0F1E2D3C] + [b * 0x01010101 for b in range(256)] + rand
    for i, lo in enumerate(words):
        hi = words[(i * 7 + 3) % len(words)]
        for second in (False, True):
            regs = ptx_eval(asm, {"$4": lo, "$5": 0 if second else hi, "$6": hi if second else 0})
            got = [v for r in ("$0", "$1", "$2", "$3") for v in _lanes(regs[r], dtype)]
            shift = 2 if second else 0
            low = [((lo >> 8 * j) & 15) | (((hi >> 8 * j + shift) & 3) << 4) for j in range(4)]
            high = [((lo >> 8 * j + 4) & 15) | (((hi >> 8 * j + 4 + shift) & 3) << 4)
                    for j in range(4)]
            want = [float(q - 32) for q in low + high]
            assert got == want, (hex(lo), hex(hi), second, got, want)


# -- sm_90 builds ---------------------------------------------------------------------------

def compile_candidates(tiles, block_ms=(8, 16), dtypes=("bf16",)) -> list[tuple]:
    """Each tile built for sm_90 as a launch would be: no local memory (a spill), mma.sync (not
    wgmma), and no register tile stored to shared memory (the unpacked codes stay in the
    dot operand's layout). Returns (tile, block_m, dtype, registers)."""
    from pensieve.backends import cuda_q6k_skinny2_kernels as kernels
    from tests.unit.test_cuda_q6k_split import compile_sm90

    types = {"X": "*bf16", "LO": "*u8", "HI": "*u8", "SC": "*i16", "D": "*i16", "Y": "*bf16",
             "WS": "*fp32", "CNT": "*i32", "M": "i32", "N": "i32", "GROUPS": "i32",
             "G_PER": "i32", "stride_x": "i32", "stride_y": "i32"}
    built = []
    for t in tiles:
        for bm in block_ms:
            for dt in dtypes:
                consts = {"BLOCK_N": t.block_n, "BLOCK_G": t.block_g, "SPLIT_K": t.split_k,
                          "NUM_STAGES": t.num_stages, "ASM": True, "BLOCK_M": bm}
                c, regs, local = compile_sm90(kernels.skinny2, {**types, "X": f"*{dt}",
                                                                "Y": f"*{dt}"},
                                              consts, t.num_warps, 1, set(types) - {"M"})
                assert local in (0, None), (t, bm, dt, regs, local)
                assert "mma.sync" in c.asm["ptx"] and "wgmma" not in c.asm["ptx"], (t, bm, dt)
                assert "ttg.local_alloc %" not in c.asm["ttgir"], (t, bm, dt)
                built.append((t, bm, dt, regs))
    return built


def test_a_candidate_compiles_for_the_h100():
    """The first candidate, both paddings, bfloat16 and float16 (both PTX unpackings)."""
    compile_candidates(CANDIDATES[:1], dtypes=("bf16", "fp16"))


@pytest.mark.slow
def test_every_candidate_compiles_for_the_h100():
    compile_candidates(CANDIDATES[1:])


# -- on a GPU -------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("n,k", [(4096, 12288), (1024, 4096), (151936 // 4, 4096)])
def test_cuda_candidates_against_float64(n, k):
    """Every candidate in bfloat16 at 1, 4, 7, 8, 9, 16 rows (both paddings; float16 at 8),
    twice (the split-K reduction deterministic); a head-sized N never splits."""
    from pensieve.backends.cuda_q6k_rows import rows_workspace

    layer = CudaQ6KLinear(groups(Q.Q6_K, n, k, seed=n)).cuda()
    w = layer.weight_buffers()
    rows_workspace(torch.device("cuda"), n)
    weight = layer.dequantize().double()
    gen = torch.Generator().manual_seed(k)
    for t in CANDIDATES:
        for rows, dtype in ((1, torch.bfloat16), (4, torch.bfloat16), (7, torch.bfloat16),
                            (8, torch.bfloat16), (8, torch.float16), (9, torch.bfloat16),
                            (16, torch.bfloat16)):
            x = torch.randn(rows, k, generator=gen).to(dtype).cuda()
            ref = (x.double() @ weight.T).cpu()
            y = gemm_skinny2(x, w, torch.empty(rows, n, device="cuda", dtype=dtype), t)
            again = gemm_skinny2(x, w, torch.empty_like(y), t)
            assert torch.equal(y, again), t
            assert not torch.isnan(y).any()
            r = rel(y.cpu(), ref)
            assert r < 1e-2, (n, k, t, rows, dtype, r)


@needs_cuda
@pytest.mark.parametrize("rows", [4, 8, 16])
def test_skinny2_in_a_cuda_graph(rows):
    from pensieve.backends.cuda_q6k_rows import rows_workspace

    layer = CudaQ6KLinear(groups(Q.Q6_K, 1024, 4096, 5)).to(device="cuda", dtype=torch.bfloat16)
    rows_workspace(torch.device("cuda"), 1024)
    for t in CANDIDATES:  # K over 8 or 16 programs
        layer.plan = {b: ("skinny2", t) for b in cuda_q6k.BUCKETS}
        assert_replays_as_eager(layer, torch.randn(rows, 4096, device="cuda",
                                                   dtype=torch.bfloat16))


@needs_cuda
def test_tuner_races_skinny2_on_the_gpu(monkeypatch):
    """The real race (bf16, the GPU timer) with every skinny2 tile and each other family's
    first: each bucket's choice is right; which one wins is the GPU's (printed)."""
    from pensieve.backends import cuda_q6k_tune as tune

    first_q6k_tiles(monkeypatch, tune)
    monkeypatch.setattr(tune, "ROWS_CANDIDATES", tune.ROWS_CANDIDATES[:2])
    model = torch.nn.Sequential(layer_of(4096, 12288, 9)).to(device="cuda",
                                                             dtype=torch.bfloat16)
    from pensieve.backends.cuda_int4_tune import gpu_us

    tune.prepare(model, torch.bfloat16, reps=3, timer=gpu_us)  # no plan cache: timed afresh
    plan = model[0].plan
    print({b: tune.describe(c) for b, c in plan.items()})
    weight = model[0].dequantize().double()
    for r in (4, 8, 16):
        x = torch.randn(r, 12288, device="cuda", dtype=torch.bfloat16)
        assert plan[cuda_q6k.bucket(r)][0] != "torch"
        y = cuda_q6k.q6k_linear(x, model[0].weight_buffers(), plan)
        assert rel(y.cpu(), (x.double() @ weight.T).cpu()) < 1e-2, r
