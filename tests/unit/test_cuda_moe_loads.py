"""How the MoE pick GEMV (``cuda_moe_kernels.pick_gemv``) reads its weights and x.

Compiled for sm_90 here (no GPU; Triton's own ptxas) with the arguments the runtime JIT
specialises at Qwen3-30B-A3B's shapes (pointers, N, K and the strides divisible by 16): in
the K loop of every layout — int4, q4k, 6-bit, MXFP4, int8 with 32- and 16-wide groups — at
the constant rule's and the tuner's tiles, fused (gate/up paired and not) and routed (down),
the codes come as 16-byte word loads (``ld.global.v4.b32``; the 6-bit layout's high bit
pairs 8 bytes, ``.v2.b32``, twice; q4k's super-block word quad — d, dmin and the file's 12
scale bytes — one more, and no other scale load), x as 16-byte loads of int64 words
(``.v2.b64``), no code byte alone (MXFP4's one byte a row: its E8M0 exponent), no
shared-memory exchange, no register spills; likewise the tuner's own tiles for each launch
(``cuda_moe_tune``'s
``GATE_UP_CANDIDATES`` paired, ``DOWN_CANDIDATES`` and ``DOWN_WHOLE_K`` routed — the whole-row
step with the 4-bit layouts' ``MASK_K``, as 30B-A3B's down K = 768 in one 1024 builds), a
(row, group) pair a thread. (An offline build without the specialisation loads the old byte-tensor
form one byte at a time — Triton cannot prove a row's alignment — while the GPU built it
8 bytes a load; the word form loads codes 16 bytes at a time either way.) In Triton's
interpreter: bfloat16 and float16 x through the kernel give what the same x in float32
gives, exactly (x's int64 words unpacked right), and x whose rows are not 8-byte aligned is
copied by the launcher first."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from pensieve.backends import cuda_moe
from pensieve.backends.cuda_moe import Tiles
from tests.helpers.triton_interpreter import run_in_triton_interpreter

TILES = (Tiles(1, 8, 512, 4, 2), Tiles(1, 16, 256, 4, 2), Tiles(1, 32, 128, 4, 2))
ROUTES = {"paired": (True, True), "fused": (True, False), "down": (False, False)}
# layout: (pointer types, constexprs, code loads a row: (v4.b32, v2.b32), bytes a row)
LAYOUTS = {
    "int4": (dict(S="*i32"), dict(INT4=True), (1, 0), 0),
    "q4k": (dict(S="*i32"), dict(Q4K=True), (2, 0), 0),  # codes + the super-block quad
    "six": (dict(S="*i8", MN="*u8", D="*i16"), dict(SIX=True, GS=16), (1, 2), 0),  # 8 B twice
    "fp4": (dict(S="*u8"), dict(FP4=True), (1, 0), 1),  # the byte: the E8M0 exponent
    "int8": (dict(S="*i16", MN="*i16"), dict(GS=32, HAS_MIN=True), (2, 0), 0),
    "int8/16": (dict(S="*i16"), dict(GS=16), (2, 0), 0),
}
TYPES = {"X": "*bf16", "IDS": "*i32", "RW": "*bf16", "W": "*u8", "S": "*i32", "MN": "*i32",
         "D": "*i32", "B": "*i16", "Y": "*bf16", "N": "i32", "K": "i32", "stride_x": "i32",
         "stride_y": "i32"}
CONSTS = dict(TOPK=8, INT4=False, SIX=False, Q4K=False, FP4=False, GS=32, HAS_MIN=False,
              HAS_BIAS=False, SWIGLU=False, ALPHA=0.0, LIMIT=0.0)


def loop_bodies(ptx: str) -> list[list[str]]:
    """The PTX lines of each loop (a label to the branch back to it)."""
    lines, seen, loops = ptx.splitlines(), {}, []
    for i, line in enumerate(lines):
        if m := re.match(r"\s*(\$L__BB\d+_\d+):", line):
            seen[m.group(1)] = i
        if (m := re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)) and m.group(1) in seen:
            loops.append(lines[seen[m.group(1)]:i + 1])
    return loops


def ops(body: list[str]) -> Counter:
    """Global loads by width (``ld.global.v4.b32``...; cache hints dropped) and shared-memory
    and barrier instructions in a loop body."""
    out: Counter = Counter()
    for line in body:
        if m := re.search(r"\bld\.global((?:\.[a-z0-9]+)+)", line):
            out["ld" + re.sub(r"\.(nc|ca|cg|cs|lu|cv|L1::\w+|L2::\w+)", "", m.group(1))] += 1
        for name in ("st.shared", "ld.shared", "bar.sync"):
            out[name] += name in line
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pick_gemv_reads_codes_and_x_in_16_byte_words(layout):
    from pensieve.backends import cuda_moe_kernels as kernels
    from tests.helpers.triton_compile import compile_for
    from tests.unit.test_cuda_gdn import _resources

    types, consts, (v4, v2), exps = LAYOUTS[layout]
    types = dict(TYPES, **types)
    aligned = [n for n, t in types.items() if t.startswith("*")] + ["N", "K", "stride_x",
                                                                      "stride_y"]
    for t in TILES:
        for route, (fuse, pair) in ROUTES.items():
            c = dict(CONSTS, **consts, GATHER=fuse, FUSE=fuse, ROUTED=not fuse,
                     BLOCK_N=t.block_n, BLOCK_K=t.block_k, PAIR=pair)
            built = compile_for(kernels.pick_gemv, types, c, t.num_warps, t.num_stages,
                                aligned=aligned)
            where = (layout, route, t)
            assert "STACK:0 " in _resources(built), (where, _resources(built))
            loops = [ops(body) for body in loop_bodies(built.asm["ptx"])]
            assert len(loops) == (2 if fuse and not pair else 1), where  # gate loop, up loop
            rows = 2 if pair else 1  # rows a thread holds of its group
            for n in loops:
                assert n["ld.b8"] + n["ld.u8"] == exps * rows, (where, n)  # no code byte alone
                assert n["ld.v4.b32"] == v4 * rows and n["ld.v2.b32"] == v2 * rows, (where, n)
                if layout == "q4k":  # d, dmin and the scales: the quad only
                    assert n["ld.b16"] + n["ld.b32"] == 0, (where, n)
                assert n["ld.v2.b64"] == 4 and n["ld.b64"] == 0, (where, n)  # x: 2 × 16 bytes
                assert n["st.shared"] + n["ld.shared"] + n["bar.sync"] == 0, (where, n)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_tuners_tiles_a_launch_read_16_byte_words_without_spills(layout):
    from pensieve.backends import cuda_moe_kernels as kernels
    from pensieve.backends import cuda_moe_tune as tune
    from tests.helpers.triton_compile import compile_for
    from tests.unit.test_cuda_gdn import _resources

    types, consts, (v4, v2), exps = LAYOUTS[layout]
    types = dict(TYPES, **types)
    aligned = [n for n, t in types.items() if t.startswith("*")] + ["N", "K", "stride_x",
                                                                      "stride_y"]
    nibbles = layout in ("int4", "q4k", "six")  # (int8 and fp4 steps are masked always)
    runs = [(t, True, False) for t in tune.GATE_UP_CANDIDATES]
    runs += [(t, False, False) for t in tune.DOWN_CANDIDATES]
    runs += [(tune.DOWN_WHOLE_K, False, nibbles)]  # 768 in one 1024-wide step
    for t, fuse, mask in runs:
        c = dict(CONSTS, **consts, GATHER=fuse, FUSE=fuse, ROUTED=not fuse, BLOCK_N=t.block_n,
                 BLOCK_K=t.block_k, PAIR=t.pair, **({"MASK_K": True} if mask else {}))
        built = compile_for(kernels.pick_gemv, types, c, t.num_warps, t.num_stages,
                            aligned=aligned)
        where = (layout, t, mask)
        assert "STACK:0 " in _resources(built), (where, _resources(built))
        loops = [ops(body) for body in loop_bodies(built.asm["ptx"])]
        assert len(loops) == 1, where  # (gate/up paired: one loop)
        for n in loops:  # one (row, group) pair a thread
            assert n["ld.b8"] + n["ld.u8"] == exps, (where, n)
            assert n["ld.v4.b32"] == v4 and n["ld.v2.b32"] == v2, (where, n)
            if layout == "q4k":
                assert n["ld.b16"] + n["ld.b32"] == 0, (where, n)
            assert n["ld.v2.b64"] == 4 and n["ld.b64"] == 0, (where, n)
            assert n["st.shared"] + n["ld.shared"] + n["bar.sync"] == 0, (where, n)


def pick(x: torch.Tensor, layer, st, fuse: bool, ids: torch.Tensor, rw: torch.Tensor,
         tiles: Tiles) -> torch.Tensor:
    """``cuda_moe.pick_gemv`` of one stack: gate/up fused (x a token a row, top-2) or down
    routed (x a pick a row); y in float32 (the interpreter rounds float32 to bfloat16 by
    truncation, not as a GPU does)."""
    y = torch.empty(ids.numel(), st.n // 2 if fuse else st.n)
    return cuda_moe.pick_gemv(x, ids, rw, st, y, topk=2, gather=fuse, fuse=fuse,
                              routed=not fuse, t=tiles, glu=layer.glu)


def interpreter_check() -> None:
    """Run with TRITON_INTERPRET=1: every layout's pick GEMV on 16-bit x against the same
    kernel on that x in float32: the same products summed in the same order, so equal."""
    from tests.unit.test_cuda_moe import MIXES, make_layer
    from tests.unit.test_cuda_moe_mxfp4 import random_layer

    # q4k + six, int4 + int8, six + int8 with offsets; MXFP4 packed and as int8 codes at
    # K = 96 (the GEMV's last step masked)
    layers = [make_layer(*mix, experts=3, seed=30 + i) for i, mix in enumerate(MIXES[:3])]
    layers += [random_layer(3, 96, 64, 5, packed=True), random_layer(3, 96, 64, 5)]
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        ids = torch.randperm(layer.num_experts, generator=g)[:2].repeat(2)  # 2 tokens, top-2
        rw = torch.rand(4, generator=g)
        for st, fuse in zip(layer.stacks(), (True, False)):
            x = torch.randn(2 if fuse else 4, st.k, generator=g) * (0.05 if fuse else 1)
            for tiles in (Tiles(1, 32, 64, 4, 2, pair=fuse), Tiles(1, 16, 128, 4, 2)):
                for dt in (torch.bfloat16, torch.float16):
                    x16 = x.to(dt)
                    want = pick(x16.float(), layer, st, fuse, ids, rw, tiles)
                    got = pick(x16, layer, st, fuse, ids, rw, tiles)
                    assert torch.equal(got, want), (layer.formats, fuse, tiles, dt)
            # rows 4 bytes off an 8-byte boundary: the launcher copies them first
            odd = torch.zeros(x.numel() + 1)[1:].view_as(x).copy_(x)
            assert odd.data_ptr() % 8 == 4
            assert torch.equal(pick(odd, layer, st, fuse, ids, rw, tiles),
                               pick(x, layer, st, fuse, ids, rw, tiles))


def test_sixteen_bit_x_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_moe_loads import interpreter_check as c; "
                              "c(); print('ok')")
