"""Fused element-wise steps of the Llama block on CUDA (one Triton kernel each).

``fuse_cuda_layers`` changes the class of each ``models.llama.MLP`` to ``CudaMLP`` and of each
``DecoderLayer`` to ``CudaDecoderLayer`` — same children, same state dict, only ``forward``
differs — so the model file keeps reading like the reference:

* ``silu_mul``: SiLU(gate)·up straight from the fused gate/up output. PyTorch runs SiLU on the
  strided half, then the product: three passes over [T, 2I] instead of one and a half (~6%
  of a 2048-token prefill step on an H100).
* ``add_rms_norm``: the residual add after attention and the post-attention RMSNorm in one
  pass (PyTorch: an add, then a norm kernel with one block per row).

Both compute in float32 and round where PyTorch rounds (the sum to x's dtype before the
norm reads it). Importing this module needs no GPU; Triton is imported on first use.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pensieve.models.llama import MLP, DecoderLayer


def _kernels() -> ModuleType:
    from pensieve.backends import cuda_layer_kernels

    return cuda_layer_kernels


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] → SiLU(gate_up[:, :I]) · gate_up[:, I:]."""
    t, two_i = gate_up.shape
    inner = two_i // 2
    out = torch.empty(t, inner, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _kernels().silu_mul[(t, -(-inner // block))](gate_up, out, inner, gate_up.stride(0),
                                                 BLOCK=block, num_warps=4)
    return out


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, RMSNorm(x + y) · weight) for rows of width H."""
    t, h = x.shape
    total = torch.empty_like(x)
    normed = torch.empty_like(x)
    block = 1 << (h - 1).bit_length()
    _kernels().add_rms_norm[(t,)](x, y, weight, total, normed, h, eps, BLOCK=block,
                                  num_warps=8 if block >= 4096 else 4)
    return total, normed


class CudaMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        shape = gate_up.shape
        act = silu_mul(gate_up.reshape(-1, shape[-1]).contiguous())
        return self.down_proj(act.view(*shape[:-1], shape[-1] // 2))


class CudaDecoderLayer(DecoderLayer):
    def forward(self, x, cos_sin, ctx):  # noqa: ANN001, ANN201 - as DecoderLayer.forward
        attn = self.self_attn(self.input_layernorm(x), cos_sin, ctx)
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(x.reshape(-1, x.shape[-1]), attn.reshape(-1, x.shape[-1]),
                            norm.weight, norm.eps)
        return x + self.mlp(h)


def fuse_cuda_layers(model: nn.Module) -> int:
    """Switch the model's MLPs and decoder layers (exact classes only) to the fused forms."""
    count = 0
    for module in model.modules():
        if type(module) is MLP:
            module.__class__ = CudaMLP
        elif type(module) is DecoderLayer:
            module.__class__ = CudaDecoderLayer
            count += 1
    return count
