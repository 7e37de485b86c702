"""Prefill on AMX: many rows through a codes projection as one bf16 matmul.

From ``BF16_FROM`` rows a step is compute-bound, and where the CPU has AMX (``amx_bf16`` and
``amx_tile`` in ``/proc/cpuinfo``, tile state granted by the kernel) oneDNN's bf16 matmul
(``brg_matmul:..._amx``) runs an order of magnitude more multiply-adds a cycle than the
integer panel GEMM. So ``CodesLinear``/``Q4Linear``/``Q8Linear``/``Q4MLP`` dequantise the
weight (each row block in its own format) into a per-process bf16 scratch buffer
(``pqx_dequant_bf16``: one pass, the kernels' thread pool) and run ``torch.mm`` in bf16;
the result is converted back to float32 (the layers' dtype). Fewer rows keep the integer
kernels.

The path is on by default where ``amx_bf16`` says the CPU runs it on AMX (see ``bf16_from``;
``PENSIEVE_BF16_PREFILL=0`` off, ``=1`` on anywhere). On the 2-core AMX VM, quiet
(2026-12-07): a 1000-token Qwen2.5-Coder-1.5B Q4_K_M prefill 139 → 338 tok/s, the projections
2.5-3.7× the integer GEMM from 512 rows. Without AMX, oneDNN's AVX-512 BF16 matmul
(``avx512_core_bf16``) was *slower* than the integer GEMM (512×1536 by 17920: 379 ms against
330 ms), so it stays off there. What it costs: bf16 rounding of activations and weights (~3e-3
relative error on a layer, ~5× the integer path's) and row-count invariance — a prompt's
last tokens give slightly different logits prefilled in a chunk of ≥ ``BF16_FROM`` rows than
in a shorter one (after a prefix-cache hit), so a greedy answer may change with what was
cached; ``PENSIEVE_BF16_PREFILL=0`` keeps the integer kernels' chunk-independent numbers.

The weight scratch holds at most ``TILE_ELEMS`` weights (16 MiB of bf16); a larger
projection runs in tiles of output rows, each product written in place into its columns of the
output (no temporaries). The fused MLP computes gate as one product (8960×1536 for
Qwen2.5-1.5B: two tiles) and up tile by tile into a tile-wide scratch, multiplied into
SiLU(gate) as each lands. At 512 rows of Qwen2.5-1.5B that is 34 MiB of scratch where whole
26 MiB tiles and a full-width up took 52 (the served peak, VmHWM, is reached while it is held
at the end of a long prompt's last chunk), as fast at 512 rows, within 3% at 256.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

import torch

BF16_FROM = 64  # rows from which a step runs as a bf16 matmul (where enabled)
TILE_ELEMS = 8 << 20  # the weight scratch's capacity, in weights (16 MiB of bf16)
WIDE_BELOW = 192  # fewer rows than this: tiles of twice TILE_ELEMS (see _weights)

_lock = threading.Lock()
# the process's scratch buffers by use — "w" the dequantised weight tile, "x" the bf16 input,
# "gate"/"up" the MLP's halves — each grown to the largest call seen: a prefill step allocates no
# large temporaries (under ``cpu_memory.bound_heap`` each would be a fresh mmap, page-faulted in
# and unmapped again, call after call)
_scratch: dict[str, torch.Tensor] = {}


@functools.cache
def amx_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls on AMX: the flags, oneDNN, and the tile state grant."""
    from pensieve.backends.cpu_quant.build import cpu_features

    feats = cpu_features()
    if "amx_bf16" not in feats or "amx_tile" not in feats:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)  # arch_prctl(XTILEDATA)
    return bool(init()) if init is not None else True


def bf16_from() -> int:
    """Rows from which the layers take the bf16 path: ``BF16_FROM`` where this CPU runs bf16
    matmuls on AMX, else never (the integer GEMM); ``PENSIEVE_BF16_PREFILL=0`` never, ``=1``
    ``BF16_FROM`` on any CPU."""
    flag = os.environ.get("PENSIEVE_BF16_PREFILL", "")
    if flag == "0":
        return sys.maxsize
    return BF16_FROM if flag == "1" or amx_bf16() else sys.maxsize


def _buffer(use: str, numel: int) -> torch.Tensor:
    buf = _scratch.get(use)
    if buf is None or buf.numel() < numel:
        _scratch.pop(use, None)  # free the old one first
        buf = _scratch[use] = torch.empty(numel, dtype=torch.bfloat16)
    return buf[:numel]


def release() -> None:
    """Hand the scratch buffers back (after a prefill; the next one allocates them again)."""
    with _lock:
        _scratch.clear()


def dequant_bf16(kernels, address: int, K: int, n0: int, n1: int, threads: int,  # noqa: ANN001
                 out: torch.Tensor | None = None, isa: int = -1) -> torch.Tensor:
    """Rows [n0, n1) of the projection at ``address`` (a ``Proj``) as bf16 [n1 - n0, K], into
    ``out`` (else a new tensor). ``isa``: -1 the best here, 0 AVX2."""
    if out is None:
        out = torch.empty(n1 - n0, K, dtype=torch.bfloat16)
    kernels.pqx_dequant_bf16(address, n0, n1, out.data_ptr(), threads, isa)
    return out


def _weights(layer, n0: int, n1: int, m: int):  # noqa: ANN001, ANN202
    """Rows [n0, n1) of ``layer``'s weight as bf16 tiles ``(a, b, W[a:b])``, each dequantised
    into the weight scratch (so each tile is gone once the next is asked for): as few as fit
    ``TILE_ELEMS``, of equal height (16-row multiples). For ``m`` < ``WIDE_BELOW`` input rows
    twice that: the narrower products of half tiles were ~15% slower at 128 rows (+2% at 256,
    none at 512), and the activations' scratch that small leaves the total below a 512-row
    chunk's."""
    K = layer.in_features
    address = layer._proj_address()
    tiles = -(-(n1 - n0) * K // (TILE_ELEMS if m >= WIDE_BELOW else 2 * TILE_ELEMS))
    per = -(-(-(-(n1 - n0) // tiles)) // 16) * 16
    buf = _buffer("w", min(n1 - n0, per) * K)
    for a in range(n0, n1, per):
        b = min(a + per, n1)
        w = buf[:(b - a) * K].view(b - a, K)
        dequant_bf16(layer.kernels, address, K, a, b, layer.threads, w)
        yield a, b, w


def project(layer, xb: torch.Tensor, n0: int, n1: int,  # noqa: ANN001
            out: torch.Tensor | None = None) -> torch.Tensor:
    """xb [M, K] bf16 @ W[n0:n1].T → bf16 [M, n1 - n0] (no bias; into ``out`` if given), W
    dequantised tile by tile into the weight scratch. Each tile's product goes straight into
    its columns of ``out`` (``torch.mm`` writes a column slice in place: its row stride is the
    GEMM's leading dimension), so tiling allocates nothing. Call with ``_lock`` held."""
    if out is None:
        out = torch.empty(xb.shape[0], n1 - n0, dtype=torch.bfloat16)
    for a, b, w in _weights(layer, n0, n1, xb.shape[0]):
        torch.mm(xb, w.t(), out=out if b - a == n1 - n0 else out[:, a - n0:b - n0])
    return out


def _input(rows: torch.Tensor) -> torch.Tensor:
    xb = _buffer("x", rows.numel()).view(rows.shape)
    xb.copy_(rows)
    return xb


def _output(layer, y: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """bf16 [M, N] → a new float32 [M, N] with the layer's bias."""
    out = y.float()
    if layer._bias is not None:
        out += layer._bias
    return out


def linear(layer, rows: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """rows [M, K] float32 @ W.T (+ bias) → float32 [M, N] on the bf16 path."""
    with _lock:
        return _output(layer, project(layer, _input(rows), 0, layer.out_features))


def mlp(gate_up, down, rows: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """down(silu(gate) · up) on the bf16 path: gate as one matmul into its scratch (no [M, 2I]
    copy), SiLU in place, then up tile by tile into a tile-sized scratch, each tile multiplied
    into its columns of the activations as it lands (in bf16, the down projection's input
    dtype); then down."""
    inner = down.in_features
    m = rows.shape[0]
    with _lock:
        xb = _input(rows)
        gate = project(gate_up, xb, 0, inner, _buffer("gate", m * inner).view(m, inner))
        if gate_up._bias is not None:  # no family's MLP has one today: in float32, as before
            up = project(gate_up, xb, inner, 2 * inner)
            act = torch.nn.functional.silu(gate.float() + gate_up._bias[:inner])
            act = act.mul_(up.float() + gate_up._bias[inner:]).to(torch.bfloat16)
        else:
            act = torch.nn.functional.silu(gate, inplace=True)
            for a, b, w in _weights(gate_up, inner, 2 * inner, m):
                up = _buffer("up", m * (b - a)).view(m, b - a)
                act[:, a - inner:b - inner].mul_(torch.mm(xb, w.t(), out=up))
        return _output(down, project(down, act, 0, down.out_features))
