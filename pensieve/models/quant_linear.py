"""Weight-only quantised linear layers for CPU decode, where weight bytes decide speed.

``Int4Linear`` keeps 4-bit codes in PyTorch's packed layout with one scale and zero per group
of input channels: ``w = (code - 8) * scale + zero``. GGUF Q4_0 (``w = (q - 8)·d``) and Q4_1
(``w = q·d + m``) blocks of 32 map onto it exactly, so no accuracy is lost on those files.
``Int8Linear`` keeps per-output-channel symmetric int8 codes (an approximation of the source).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Int4Groups:
    """A weight [N, K] as 4-bit codes (0..15) with per-group affine parameters."""

    codes: torch.Tensor  # [N, K] uint8 in 0..15
    scales: torch.Tensor  # [N, K // group] float32
    offsets: torch.Tensor  # [N, K // group] float32: w = code * scale + offset
    group_size: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.codes.view(n, k // self.group_size, self.group_size).float()
        return (g * self.scales[..., None] + self.offsets[..., None]).view(n, k)


def int4_supported(group_size: int, in_features: int) -> bool:
    return (
        hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and group_size in (32, 64, 128, 256)
        and in_features % group_size == 0
    )


class Int4Linear(nn.Module):
    """y = x @ W.T (+ b) with W held as packed int4; float32 activations on CPU."""

    def __init__(self, q: Int4Groups, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        n, k = q.codes.shape
        self.in_features, self.out_features, self.group_size = k, n, q.group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 1)
        zeros = q.offsets + 8 * q.scales  # torch's convention: (code - 8) * scale + zero
        scales_and_zeros = torch.stack([q.scales.t(), zeros.t()], dim=-1).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.float())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).float(), self.packed, self.group_size,
            self.scales_and_zeros,
        )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(nn.Module):
    """y = x @ W.T with W as per-output-channel symmetric int8."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.register_buffer("codes", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(
            x.reshape(-1, self.in_features).float(), self.codes, self.scales
        )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)
