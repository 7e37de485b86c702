"""``gemv2`` (``backends/cuda_int8_gemv2_kernels.py``): the int8-code decode GEMV whose codes
and x come as 16-byte word loads in one layout, a start-time race candidate beside ``gemv``.

Compiled for sm_90 here (no GPU; Triton's own ptxas) with the arguments the runtime JIT
specialises (pointers, N, K and the strides divisible by 16), at every start-time tile, 1, 2
and 4 rows a program, Q8_0 (no offsets), offsets (Q5_1/Q5_K/IQ4...) and Q6_K's 16-column
groups, a masked tail step and not: in the K loop the code words and x come as
``ld.global.v4.b32`` only (a thread's quad of code words, x's 16 columns as two quads of int32
words a row), one 16-bit scale (and offset) load a quad, no shared-memory exchange
(``gemv``'s broadcast x paid 2-4 ``bar.sync`` a step on some tiles), no register spills.

In Triton's interpreter: against float64 at gpt-oss's K = 2880 (90 groups, no power-of-two
step: the tail masked) and the odd test shapes, rows 1-5 a call, float32 and float16 x;
bfloat16 x gives exactly what the same values in float32 give (x's words unpacked right); x
rows that are not 16-byte aligned are copied by the launcher; a gemv2 plan serves a fused
layer's row blocks (column slices of one output) and round-trips through the plan JSON.
"""

from __future__ import annotations

import pytest
import torch

from pensieve.backends.cuda_int8 import GEMV2, Tiles
from pensieve.backends.cuda_int8_tune import GEMV2_CANDIDATES
from tests.helpers.triton_interpreter import run_in_triton_interpreter
from tests.unit.test_cuda_moe_loads import loop_bodies, ops

TYPES = {"X": "*bf16", "C": "*u8", "S": "*i16", "MN": "*i16", "Y": "*bf16", "M": "i32",
         "N": "i32", "K": "i32", "stride_x": "i32", "stride_y": "i32"}
ALIGNED = ["X", "C", "S", "MN", "Y", "N", "K", "stride_x", "stride_y"]
FORMATS = {"q8_0": dict(GS=32, HAS_MIN=False), "offsets": dict(GS=32, HAS_MIN=True),
           "q6_k": dict(GS=16, HAS_MIN=False)}


def k_loop(ptx: str) -> dict:
    """Load widths and shared-memory instructions of the K loop (the loop with most loads)."""
    return max((ops(body) for body in loop_bodies(ptx)),
               key=lambda n: sum(v for k, v in n.items() if k.startswith("ld.")))


@pytest.mark.parametrize("t", GEMV2_CANDIDATES, ids=str)
def test_gemv2_loads_codes_and_x_16_bytes_wide_with_no_exchange(t):
    from pensieve.backends import cuda_int8_gemv2_kernels as kernels
    from tests.helpers.triton_compile import compile_for
    from tests.unit.test_cuda_gdn import _resources

    quads = t.block_n * (t.block_k // 16) // (32 * t.num_warps)  # a thread's code quads
    assert quads >= 1
    for name, fmt in FORMATS.items():
        for rows in (1, 2, 4):
            for even in (False, True):
                consts = dict(fmt, ROWS=rows, BLOCK_N=t.block_n, BLOCK_H=t.block_k // 16,
                              EVEN=even)
                built = compile_for(kernels.gemv2, TYPES, consts, t.num_warps, t.num_stages,
                                    aligned=ALIGNED)
                where = (str(t), name, rows, even)
                n = k_loop(built.asm["ptx"])
                assert n["st.shared"] + n["ld.shared"] + n["bar.sync"] == 0, (where, n)
                # a quad of code words and x's two quads a row, 16 bytes each
                assert n["ld.v4.b32"] == quads * (1 + 2 * rows), (where, n)
                assert n["ld.b16"] == quads * (2 if fmt["HAS_MIN"] else 1), (where, n)
                narrow = {k: v for k, v in n.items()
                          if k.startswith("ld.") and v and k not in ("ld.v4.b32", "ld.b16")}
                assert not narrow, (where, n)
                assert "STACK:0 " in _resources(built), (where, _resources(built))


def interpreter_check() -> None:
    """Run with TRITON_INTERPRET=1 (``run_in_triton_interpreter``)."""
    from gguf import GGMLQuantizationType as Q

    from pensieve.backends import cuda_int8
    from pensieve.backends.cuda_int8 import CudaInt8Linear, int8_linear
    from pensieve.backends.cuda_int8_tune import from_json, to_json, works
    from tests.unit.test_cuda_int8 import groups, rel

    tiles = (GEMV2, Tiles(4, 2, 256, 2, 1), Tiles(2, 8, 128, 4, 1))
    cases = ((Q.Q8_0, 2880), (Q.Q5_1, 896), (Q.Q5_K, 768), (Q.Q6_K, 768), (Q.IQ4_NL, 896))
    for i, (qtype, k) in enumerate(cases):
        layer = CudaInt8Linear(groups(qtype, 13, k, seed=20 + i))
        (block,) = layer.blocks()
        weight = layer.dequantize().double()
        gen = torch.Generator().manual_seed(i)
        for t in tiles:
            for rows in (1, 2, 3, 4, 5):
                x = torch.randn(rows, k, generator=gen)
                y = cuda_int8.gemv2(x, block, torch.empty(rows, 13), t)
                where = (qtype.name, k, str(t), rows)
                assert rel(y, x.double() @ weight.T) < 1e-5, where
                x16 = x.to(torch.float16)
                y = cuda_int8.gemv2(x16, block, torch.empty(rows, 13, dtype=torch.float16), t)
                assert rel(y, x16.double() @ weight.T) < 2e-3, where
                xb = x.to(torch.bfloat16)  # the same values through the word unpacking
                yb = cuda_int8.gemv2(xb, block, torch.empty(rows, 13), t)
                assert torch.equal(yb, cuda_int8.gemv2(xb.float(), block, torch.empty(rows, 13),
                                                       t)), where
        wide = torch.randn(3, k + 1, generator=gen)[:, 1:]  # rows 4 bytes off 16-byte alignment
        y = cuda_int8.gemv2(wide, block, torch.empty(3, 13))
        assert rel(y, wide.double() @ weight.T) < 1e-5, (qtype.name, "unaligned")
    # a fused layer (row blocks of Q5_0, Q6_K, Q5_K) on a gemv2 plan: every bucket, a JSON trip
    k = 768
    layer = CudaInt8Linear([groups(Q.Q5_0, 16, k, 1), groups(Q.Q6_K, 21, k, 2),
                            groups(Q.Q5_K, 8, k, 3)])
    weight = layer.dequantize().double()
    plan = from_json(to_json({b: ("gemv2", GEMV2) for b in (1, 2, 4, 8, 16)}))
    assert plan[1] == ("gemv2", GEMV2) and works(plan, layer, torch.float32)
    for rows in (1, 2, 3, 7, 16):
        x = torch.randn(rows, k)
        y = int8_linear(x, layer.blocks(), layer.out_features, plan)
        assert rel(y, x.double() @ weight.T) < 1e-5, rows
    print("ok")


def test_gemv2_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.unit.test_cuda_int8_gemv2 import interpreter_check "
                              "as c; c()")


def test_gemv2_rows_a_program():
    from pensieve.backends.cuda_int8 import gemv2_rows

    assert [gemv2_rows(m, 4) for m in (1, 2, 3, 4, 5, 16)] == [1, 2, 4, 4, 4, 4]
    assert [gemv2_rows(m, 2) for m in (1, 2, 3)] == [1, 2, 2]
    assert gemv2_rows(3, 1) == 1


def test_gemv2_refuses_misaligned_codes():
    """Codes read as int32 words must start 16-byte aligned: a view off that raises (the
    start-time race leaves gemv2 out) before any launch."""
    from pensieve.backends import cuda_int8
    from pensieve.backends.cuda_int8 import Block

    codes = torch.zeros(2 * 64 + 1, dtype=torch.int8)[1:].view(2, 64)
    b = Block(codes, torch.zeros(2, 2, dtype=torch.int16), None, 32)
    with pytest.raises(ValueError, match="aligned"):
        cuda_int8.gemv2(torch.zeros(1, 64), b, torch.empty(1, 2))
