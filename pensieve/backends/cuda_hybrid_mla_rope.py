"""The MLA layer's head glue after its projections in one Triton launch (GLM-4.7-Flash,
DeepSeek-V2/V3): ``kv_a_layernorm`` on the latent, RoPE on the shared rotary key and on every
head's rotary query part, and the cache write of (latent, rotary key) at each token's slot.

The torch form (``models/deepseek_mla.MLAttention.forward``) is ~20 launches a layer: the
norm (on a strided split), RoPE as slices, four products, two sums and a concatenation for q
and again for k, the entry's concatenation and the ``index_copy_`` — at 47 layers a step ~900 of
GLM-4.7-Flash's ~1000 small kernels. One program here takes one token: the norm in float32
(``F.rms_norm``'s order: x·rsqrt(mean x² + eps)·w), the rotations in float32 from the cos/sin
tables (adjacent pairs written de-interleaved where ``rope_interleave``, as ``rotate_pairs``;
else rotate-half), each result rounded once to the cache's / the query's dtype (the torch form
rounds each product in bfloat16: a bfloat16 ulp apart at most). Grid (T,), no host sync: CUDA
graphs capture it. Installed on each ``MLAttention`` as ``rope_write`` at a CUDA hybrid
runner's start (``install``); ``PENSIEVE_MLA_ROPE_KERNEL=0`` leaves the torch form.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

ENV_SWITCH = "PENSIEVE_MLA_ROPE_KERNEL"


def enabled(environ: dict[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(ENV_SWITCH, "1") != "0"


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _kernel() -> Any:
    from pensieve.backends.cuda_hybrid_mla_rope_kernels import mla_rope_write

    return mla_rope_write


def rope_write(q_pe: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float,
               cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor,
               interleave: bool) -> torch.Tensor:
    """q_pe [T, H, rope] (unit stride in the last dim), kv [T, rank + rope] (the latent then
    the rotary key), cos/sin [T, 1, rope] (or [T, rope]) → writes (norm(latent), rope(k_pe))
    into ``cache``'s rows (``cache.view(-1, rank + rope)``) at ``slots`` [T]; returns
    rope(q_pe) [T, H, rope] contiguous in q_pe's dtype."""
    t, heads, rope = q_pe.shape
    rank = kv.shape[-1] - rope
    out = torch.empty(t, heads, rope, dtype=q_pe.dtype, device=q_pe.device)
    if t:
        cos, sin = cos.reshape(t, -1), sin.reshape(t, -1)
        slots = slots.contiguous()  # read at unit stride (a no-op for the engine's)
        assert q_pe.stride(-1) == 1 and kv.stride(-1) == 1 and cos.stride() == sin.stride()
        assert cos.shape[-1] == rope and cache.shape[-1] == rank + rope and cache.is_contiguous()
        _kernel()[(t,)](q_pe, kv, norm_weight, cos, sin, slots, cache, out, q_pe.stride(0),
                        q_pe.stride(1), kv.stride(0), cos.stride(0), float(eps), H=heads,
                        H_PAD=_pow2(heads), RANK=rank, RANK_PAD=_pow2(rank), HALF=rope // 2,
                        INTERLEAVE=interleave, num_warps=4 if rank >= 256 else 1)
    return out


def takes(q_pe: torch.Tensor, kv: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
          cache: torch.Tensor) -> bool:
    """Whether ``rope_write`` takes these tensors (else the torch form runs)."""
    cos, sin = cos_sin
    t, _, rope = q_pe.shape
    return (q_pe.stride(-1) == 1 and kv.stride(-1) == 1 and cache.is_contiguous()
            and cache.shape[-1] == kv.shape[-1] and cache.is_floating_point()
            and cos.shape[-1] == rope and cos.numel() == t * rope and sin.shape == cos.shape
            and cos.is_contiguous() and sin.is_contiguous())


def layer_rope_write(attn: nn.Module) -> Any:
    """``attn`` (an ``MLAttention``)'s glue on the kernel: (q_pe, kv, cos_sin, cache, slots) →
    rope(q_pe), the cache written."""
    def run(q_pe: torch.Tensor, kv: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
            cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
        if not takes(q_pe, kv, cos_sin, cache):
            return None  # the torch form
        norm = attn.kv_a_layernorm
        return rope_write(q_pe, kv, norm.weight, norm.eps, *cos_sin, slots, cache,
                          attn.mla.rope_interleave)

    return run


def install(model: nn.Module) -> int:
    """Set ``rope_write`` on every ``MLAttention`` of ``model`` whose latent norm is the plain
    ``RMSNorm`` (or ``cuda_layers.CudaRMSNorm``, the same norm) and whose rotary dims are twice
    a power of two (every MLA model's 64); returns how many. At a call it declines (None: the torch form) tensors ``takes`` refuses."""
    from pensieve.backends.cuda_layers import CudaRMSNorm
    from pensieve.models.deepseek_mla import MLAttention
    from pensieve.models.llama import RMSNorm

    layers = [m for m in model.modules() if isinstance(m, MLAttention)
              and type(m.kv_a_layernorm) in (RMSNorm, CudaRMSNorm)
              and m.mla.qk_rope_head_dim >= 2
              and _pow2(m.mla.qk_rope_head_dim // 2) == m.mla.qk_rope_head_dim // 2]
    for m in layers:
        m.rope_write = layer_rope_write(m)
    return len(layers)
