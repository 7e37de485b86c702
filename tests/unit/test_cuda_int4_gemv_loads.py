"""How the split-K int4 GEMV's V2 loop (``cuda_int4_gemv_kernels.gemv_split``, ``V2=True``: float
x and x rounded to int8 in the kernel) reads x, and that V2 and the loop before it agree.

Compiled for sm_90 here (no GPU; Triton's own ptxas) with the arguments the runtime JIT
specialises at model shapes (pointers, N, the group count and the strides divisible by 16),
for every start-time candidate V2 serves at 1 and 4 rows, Q4_0 scales and affine pairs: in the
K loop the weight words and x come as 16-byte loads (``ld.global.v4.b32``; x a group's four
quads of int32 words, two bfloat16 each), the scales one a (row, group), nothing else; no
shared-memory exchange (the old loop's x took another layout than the words and paid 4-36
``bar.sync`` a step; the pipelined tiles keep their ``cp.async`` buffers and barriers); no
register spills at 1 row, a few bytes at most at 4 rows (the old loop: 250-780). In Triton's
interpreter: bfloat16 x through V2 and through the old loop against float64, the two within a
rounding of each other (float x: the same exact products summed in another order) and
bit-equal for int8 x rounded in the kernel; the other suites under V2
(``PENSIEVE_INT4_GEMV_V2=1``; the default runs the old loop until a GPU has run V2). ``gemv_wide``'s V2 (the same step, a row a program) likewise
on every candidate, SwiGLU's two weights too (tiles with fewer groups a step than threads load
x a copy a weight row, one address: the PTX's loads, ptxas keeps one)."""

from __future__ import annotations

import pytest
import torch

from pensieve.backends import cuda_int4_gemv_wide
from pensieve.backends.cuda_int4_gemv import CANDIDATES, Split
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.unit.test_cuda_moe_loads import loop_bodies, ops

TYPES = {"X": "*bf16", "XD": "*fp32", "XS": "*fp32", "W": "*i32", "SO": "*i16", "Y": "*bf16",
         "WS": "*fp32", "CNT": "*i32", "M": "i32", "N": "i32", "GROUPS": "i32",
         "stride_x": "i32", "stride_y": "i32", "stride_w": "i32"}
ALIGNED = [n for n, t in TYPES.items() if t.startswith("*")] + ["N", "GROUPS", "stride_x",
                                                                 "stride_y", "stride_w"]
V2_TILES = [c for c in CANDIDATES if c.q8 != 1]  # q8=1 reads pre-rounded int8 words either way


def build(cfg: Split, rows: int, sym: bool):
    from pensieve.backends import cuda_int4_gemv_kernels as kernels
    from tests.helpers.triton_compile import compile_for

    consts = {"BLOCK_M": rows, "BLOCK_N": cfg.block_n, "BLOCK_G": cfg.block_g,
              "SPLIT_K": cfg.split_k, "NUM_STAGES": cfg.num_stages, "EVEN": True, "Q8": cfg.q8,
              "SYM": sym, "ASM": True, "V2": True}
    types = dict(TYPES, SO="*i16" if sym else "*i32")
    return compile_for(kernels.gemv_split, types, consts, cfg.num_warps, 1, aligned=ALIGNED)


def k_loop(ptx: str) -> dict:
    """Load widths and shared-memory instructions of the K loop (the loop with most loads)."""
    loops = [ops(body) for body in loop_bodies(ptx)]
    for n, body in zip(loops, loop_bodies(ptx)):
        n["stmatrix"] = sum("stmatrix" in line for line in body)
        n["cp.async"] = sum("cp.async.c" in line for line in body)
    return max(loops, key=lambda n: sum(v for k, v in n.items() if k.startswith("ld.")))


@pytest.mark.parametrize("cfg", V2_TILES, ids=str)
def test_v2_reads_x_as_the_words_do(cfg):
    from tests.unit.test_cuda_gdn import _resources

    threads = 32 * cfg.num_warps
    groups = max(1, cfg.block_g // threads)  # groups a thread holds
    for rows in (1, 4):
        for sym in (True, False):
            built = build(cfg, rows, sym)
            where = (str(cfg), rows, sym)
            n = k_loop(built.asm["ptx"])
            assert n["st.shared"] + n["stmatrix"] == 0, (where, n)  # no layout exchange
            if cfg.num_stages == 1:
                assert n["ld.shared"] + n["bar.sync"] == 0, (where, n)
                words = cfg.block_n * cfg.block_g // threads  # a word quad a (row, group)
                assert n["ld.v4.b32"] == words + 4 * rows * groups, (where, n)  # x: 4 quads
                scales = "ld.b16" if sym else "ld.b32"
                assert n[scales] == words, (where, n)  # one a (row, group)
                narrow = {k: v for k, v in n.items() if k.startswith("ld.") and v
                          and k not in ("ld.v4.b32", scales, "ld.shared")}
                assert not narrow, (where, n)
            else:  # the pipeliner's cp.async buffers: its wait, no exchange
                assert n["cp.async"] > 0 and n["bar.sync"] <= 2, (where, n)
            stack = int(_resources(built).split("STACK:")[1].split()[0])
            assert stack <= (64 if rows == 4 else 0), (where, _resources(built))


WIDE_TYPES = {"X2": "*i32", "W": "*i32", "SO": "*i16", "Y": "*bf16", "N": "i32", "GROUPS": "i32",
              "stride_x2": "i32", "stride_y": "i32", "stride_w": "i32"}
@pytest.mark.parametrize("t", cuda_int4_gemv_wide.CANDIDATES, ids=str)
def test_wide_v2_reads_x_as_the_words_do(t):
    from pensieve.backends import cuda_int4_gemv_wide_kernels as kernels
    from tests.helpers.triton_compile import compile_for
    from tests.unit.test_cuda_gdn import _resources

    words = t.block_n * t.block_g // (32 * t.num_warps)
    xn = cuda_int4_gemv_wide._x_per_row(t)
    quads = 4 * (words if xn else t.block_g // (32 * t.num_warps))  # x's loads in the PTX
    aligned = [n for n, v in WIDE_TYPES.items() if v.startswith("*")] + [
        "N", "GROUPS", "stride_x2", "stride_y", "stride_w"]
    for sym in (True, False):
        for swiglu in (False, True):
            consts = dict(BLOCK_N=t.block_n, BLOCK_G=t.block_g, EVEN=True, SYM=sym,
                          WORD_THREADS=t.word_threads, ASM=True, SWIGLU=swiglu,
                          PREFETCH=t.prefetch, V2=True, XN=xn)
            types = dict(WIDE_TYPES, SO="*i16" if sym else "*i32")
            built = compile_for(kernels.gemv_wide, types, consts, t.num_warps, t.num_stages,
                                aligned=aligned)
            where = (str(t), sym, swiglu)
            n = k_loop(built.asm["ptx"])
            mats = 2 if swiglu else 1
            assert n["st.shared"] + n["stmatrix"] + n["ld.shared"] + n["bar.sync"] == 0, (
                where, n)
            assert n["ld.v4.b32"] == mats * words + quads, (where, n)
            scales = "ld.b16" if sym else "ld.b32"
            assert n[scales] == mats * words, (where, n)
            assert "STACK:0 " in _resources(built), (where, _resources(built))


def interpreter_check() -> None:
    """Run with TRITON_INTERPRET=1: bfloat16 x through V2 and the old loop."""
    import os

    from pensieve.backends.cuda_int4_gemv import gemv_split
    from tests.unit.test_cuda_int4_gemv import rel, weight

    n, k = 45, 448  # 14 groups: the uneven tiles mask their last steps
    tiles = (Split(8, 32, 4, 1), Split(4, 32, 3, 1), Split(16, 64, 2, 2, 1, q8=2),
             Split(8, 32, 3, 1, q8=2))
    for sym in (True, False):
        packed, so, w = weight(n, k, sym, seed=7)
        for cfg in tiles:
            for rows in (1, 3):
                x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
                x = x.to(torch.bfloat16)
                ref = x.double() @ w.T
                out = {}
                for flag in ("1", "0"):
                    os.environ["PENSIEVE_INT4_GEMV_V2"] = flag
                    out[flag] = gemv_split(x, packed, so, cfg).float()
                    assert rel(out[flag], ref) < (2e-2 if cfg.q8 else 1e-2), (cfg, rows, flag)
                where = (sym, cfg, rows)
                if cfg.q8:  # the same int8 x and integer sums: the same floats
                    assert torch.equal(out["1"], out["0"]), where
                else:  # bfloat16 y of float32 sums in another order: within a rounding
                    torch.testing.assert_close(out["1"], out["0"], rtol=2 ** -7, atol=1e-3,
                                               msg=str(where))
    print("ok")


def test_v2_and_the_old_loop_on_bfloat16_x_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_int4_gemv_loads import "
                              "interpreter_check as c; c()")


def test_the_v2_loop_in_the_triton_interpreter():
    """``PENSIEVE_INT4_GEMV_V2=1`` (the default runs the old loop): the uneven tiles'
    float32/float16 suite on V2."""
    run_in_triton_interpreter("import os; os.environ['PENSIEVE_INT4_GEMV_V2'] = '1'; "
                              "from tests.unit.test_cuda_int4_gemv import interpreter_check "
                              "as c; c(False)")


def test_the_v2_wide_loop_in_the_triton_interpreter():
    """``PENSIEVE_INT4_GEMV_V2=1``: ``gemv_wide``'s candidates on V2."""
    run_in_triton_interpreter("import os; os.environ['PENSIEVE_INT4_GEMV_V2'] = '1'; "
                              "from tests.unit.test_cuda_int4_gemv_wide import "
                              "interpreter_check as c; c(); print('ok')")


def test_v2_tiles_are_race_candidates_and_the_switch_forces_one_loop(monkeypatch):
    """Unset: the V2 tiles race beside the old ones (the start's check keeps only a tile that
    agrees with the reference) and a launch follows its tile; "1"/"0": every tile on one loop
    and no V2 duplicates raced. A plan cached with a V2 tile round-trips."""
    from pensieve.backends import cuda_int4_gemv, cuda_int4_gemv_wide
    from pensieve.backends.cuda_int4 import Plan
    from pensieve.backends.cuda_int4_plan_cache import from_json, to_json

    monkeypatch.delenv("PENSIEVE_INT4_GEMV_V2", raising=False)
    splits, wides = cuda_int4_gemv.candidates(), cuda_int4_gemv_wide.candidates()
    assert {c for c in splits if c.v2} == set(cuda_int4_gemv.V2_CANDIDATES) != set()
    assert all(c.q8 != 1 for c in cuda_int4_gemv.V2_CANDIDATES)
    assert {c for c in wides if c.v2} == set(cuda_int4_gemv_wide.V2_CANDIDATES) != set()
    assert cuda_int4_gemv.v2(True) and not cuda_int4_gemv.v2(False)
    for flag, forced in (("1", True), ("0", False)):
        monkeypatch.setenv("PENSIEVE_INT4_GEMV_V2", flag)
        assert not any(c.v2 for c in cuda_int4_gemv.candidates())
        assert not any(c.v2 for c in cuda_int4_gemv_wide.candidates())
        assert cuda_int4_gemv.v2(True) is forced and cuda_int4_gemv.v2(False) is forced
    plan = Plan({1: "split"}, split=cuda_int4_gemv.V2_CANDIDATES[0],
                wide=cuda_int4_gemv_wide.V2_CANDIDATES[1])
    back = from_json(to_json(plan))
    assert back.split == plan.split and back.split.v2 and back.wide == plan.wide
    old = to_json(Plan({1: "split"}, split=cuda_int4_gemv.CANDIDATES[0]))
    del old["split"]["v2"]  # a plan stored before the field: the old loop
    assert from_json(old).split == cuda_int4_gemv.CANDIDATES[0]
