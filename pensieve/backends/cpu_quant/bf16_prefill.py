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

The scratch holds at most ``TILE_ELEMS`` weights (32 MiB of bf16); a larger projection runs
in tiles of output rows. The fused MLP computes gate and up as two matmuls (each half of
gate_up fits: 8960×1536 for Qwen2.5-1.5B, 26 MiB) and needs no output copies.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

import torch

BF16_FROM = 64  # rows from which a step runs as a bf16 matmul (where enabled)
TILE_ELEMS = 16 << 20  # the scratch's capacity, in weights

_lock = threading.Lock()
_scratch: list[torch.Tensor] = []  # the process's buffer, grown to the largest tile needed


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


def _buffer(numel: int) -> torch.Tensor:
    if not _scratch or _scratch[0].numel() < numel:
        _scratch[:] = []  # free the old one first
        _scratch.append(torch.empty(numel, dtype=torch.bfloat16))
    return _scratch[0]


def dequant_bf16(kernels, address: int, K: int, n0: int, n1: int, threads: int,  # noqa: ANN001
                 out: torch.Tensor | None = None, isa: int = -1) -> torch.Tensor:
    """Rows [n0, n1) of the projection at ``address`` (a ``Proj``) as bf16 [n1 - n0, K], into
    ``out`` (else a new tensor). ``isa``: -1 the best here, 0 AVX2."""
    if out is None:
        out = torch.empty(n1 - n0, K, dtype=torch.bfloat16)
    kernels.pqx_dequant_bf16(address, n0, n1, out.data_ptr(), threads, isa)
    return out


def project(layer, xb: torch.Tensor, n0: int, n1: int) -> torch.Tensor:  # noqa: ANN001
    """xb [M, K] bf16 @ W[n0:n1].T → bf16 [M, n1 - n0] (no bias), W dequantised tile by tile
    into the scratch buffer."""
    K = layer.in_features
    address = layer._proj_address()
    per = max(16, TILE_ELEMS // K // 16 * 16)
    with _lock:
        buf = _buffer(min(n1 - n0, per) * K)
        if n1 - n0 <= per:
            w = buf[:(n1 - n0) * K].view(n1 - n0, K)
            dequant_bf16(layer.kernels, address, K, n0, n1, layer.threads, w)
            return torch.mm(xb, w.t())
        y = torch.empty(xb.shape[0], n1 - n0, dtype=torch.bfloat16)
        for a in range(n0, n1, per):
            b = min(a + per, n1)
            w = buf[:(b - a) * K].view(b - a, K)
            dequant_bf16(layer.kernels, address, K, a, b, layer.threads, w)
            y[:, a - n0:b - n0] = torch.mm(xb, w.t())
        return y


def linear(layer, rows: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """rows [M, K] float32 @ W.T (+ bias) → float32 [M, N] on the bf16 path."""
    y = project(layer, rows.to(torch.bfloat16), 0, layer.out_features).float()
    if layer._bias is not None:
        y += layer._bias
    return y


def mlp(gate_up, down, rows: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """down(silu(gate) · up) on the bf16 path, gate and up as two matmuls (no [M, 2I] copy)."""
    inner = down.in_features
    xb = rows.to(torch.bfloat16)
    gate = project(gate_up, xb, 0, inner).float()
    up = project(gate_up, xb, inner, 2 * inner)
    if gate_up._bias is not None:
        gate += gate_up._bias[:inner]
        up = up.float() + gate_up._bias[inner:]
    act = torch.nn.functional.silu(gate).mul_(up)
    return linear(down, act)
