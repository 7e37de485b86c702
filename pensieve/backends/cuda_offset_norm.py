"""Qwen3.5/3.6 and Qwen3-Next's ``OffsetRMSNorm`` (RMSNorm × (1 + w) in float32, then the
input's dtype) as one Triton kernel on CUDA.

The torch form is six launches in bfloat16 (to float32, rms_norm, w to float32, 1 + w, the
product, back to bfloat16) and a layer has two of them (the gated attention layers four: q and
k norms); on Qwen3.6-35B-A3B that is ~600 launches a decode step (``bench/hybrid_op_count.py``).
Here one program normalises one row (any leading dims, strided rows: the q norm reads the
query half of each head's ``[q | gate]`` as it lies). Float32 inputs keep the module's one
fused op. Installed on each ``OffsetRMSNorm`` as ``kernel`` at a CUDA runner's start
(``install``); ``PENSIEVE_OFFSET_NORM_KERNEL=0`` leaves the torch form.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

ENV_SWITCH = "PENSIEVE_OFFSET_NORM_KERNEL"


def enabled(environ: dict[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(ENV_SWITCH, "1") != "0"


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def offset_rms_norm(X, W, OUT, n_inner, s_outer, s_inner, eps, D: tl.constexpr,
                        BLOCK: tl.constexpr):
        r = tl.program_id(0)
        base = (r // n_inner).to(tl.int64) * s_outer + (r % n_inner).to(tl.int64) * s_inner
        d = tl.arange(0, BLOCK)
        m = d < D
        x = tl.load(X + base + d, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + d, mask=m, other=0.0).to(tl.float32)
        normed = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps))
        tl.store(OUT + r.to(tl.int64) * D + d, (normed * (1.0 + w)).to(OUT.dtype.element_ty),
                 mask=m)

    return offset_rms_norm


def offset_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) × (1 + weight) over the last dim in float32, returned in x's dtype
    (contiguous). x: up to 3 dims, the last of unit stride."""
    d = x.shape[-1]
    assert x.stride(-1) == 1 and x.dim() <= 3
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = out.numel() // d
    if rows == 0:
        return out
    if x.dim() == 3:
        n_inner, s_outer, s_inner = x.shape[1], x.stride(0), x.stride(1)
    else:
        n_inner, s_outer, s_inner = 1, x.stride(0) if x.dim() == 2 else 0, 0
    block = 1 << max(0, (d - 1).bit_length())
    _kernel()[(rows,)](x, weight, out, n_inner, s_outer, s_inner, eps, D=d, BLOCK=block,
                       num_warps=4 if block >= 1024 else 1)
    return out


def install(model: nn.Module) -> int:
    """Set ``kernel`` on every ``OffsetRMSNorm`` of ``model``; returns how many."""
    from pensieve.models.qwen3_next import OffsetRMSNorm

    norms = [m for m in model.modules() if isinstance(m, OffsetRMSNorm)]
    for m in norms:
        m.kernel = offset_rms_norm
    return len(norms)
