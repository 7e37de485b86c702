"""Weight-only quantised linear layers for CPU decode, where weight bytes decide speed.

``Int4Linear`` keeps 4-bit codes in PyTorch's packed layout with one scale and zero per group
of input channels: ``w = (code - 8) * scale + zero``. GGUF Q4_0 (``w = (q - 8)·d``) and Q4_1
(``w = q·d + m``) blocks of 32 map onto it exactly, so no accuracy is lost on those files.
``Int8Linear`` keeps per-output-channel symmetric int8 codes (an approximation of the source).
"""

from __future__ import annotations

import torch
from torch import nn


class Int4Groups:
    """A weight [N, K] as 4-bit codes (0..15) with per-group affine parameters:
    ``w = code · scale + offset`` for each run of ``group_size`` values along K.

    Built from unpacked codes (``Int4Groups(codes, scales, offsets, group_size)``), or by
    ``from_nibbles`` from a GGUF Q4_0/Q4_1 tensor's own layout: two codes a byte (value ``j``
    of a block of 32 in the low nibble of byte ``j``, value ``j + 16`` in the high one) and
    float16 scales and offsets. Each form is derived from the other only when asked for
    (``codes`` / ``nibbles``): the CPU kernels take the packed one, so loading a Q4 GGUF for
    them never unpacks 100M codes into bytes only to pack them again. A packed form may also
    derive its float16 parameters (``half_params``) and float32 ones from other factors, as
    ``loaders/int4_codes.Q4KGroups`` does from Q4_K's own: ``packed_codes`` then gives the
    nibbles without deriving them.
    """

    # Q4_K only (``loaders/int4_codes.py``): the file's 6-bit scale/min bytes [N, K/256 · 12]
    # and float16 (d, dmin) [N, K/256 · 2], for layouts that keep the file's 144 bytes a 256
    k_scales: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                 group_size: int) -> None:
        self._codes = codes  # [N, K] uint8 in 0..15
        self._scales, self._offsets = scales, offsets  # [N, K // group] float32
        self._packed: torch.Tensor | None = None  # [N, K/2] uint8, GGUF block order
        self._halves: tuple[torch.Tensor, torch.Tensor] | None = None  # float16 scale, offset
        self.group_size = group_size

    @classmethod
    def from_nibbles(cls, nibbles: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                     group_size: int = 32) -> Int4Groups:
        """nibbles [N, K/2] uint8 in GGUF block order; scales/offsets [N, K/32] float16."""
        if group_size != 32 or scales.dtype != torch.float16 or offsets.dtype != torch.float16:
            raise ValueError("packed 4-bit groups are blocks of 32 with float16 parameters")
        groups = cls.__new__(cls)
        Int4Groups.__init__(groups, None, None, None, group_size)
        groups._packed, groups._halves = nibbles, (scales, offsets)
        return groups

    @property
    def shape(self) -> tuple[int, int]:
        if self._codes is not None:
            return tuple(self._codes.shape)
        n, half = self._packed.shape
        return n, 2 * half

    @property
    def packed_codes(self) -> torch.Tensor | None:
        """The nibbles [N, K/2] uint8 where built from them, else None; derives nothing (a
        layout that takes other scales, e.g. Q4_K's own factors, reads this, not ``nibbles``)."""
        return self._packed

    @property
    def nibbles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(nibbles, float16 scales, float16 offsets) where built from them, else None."""
        return None if self._packed is None else (self._packed, *self.half_params())

    def half_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed form's float16 (scales, offsets) [N, K/32]."""
        return self._halves

    @property
    def codes(self) -> torch.Tensor:
        if self._codes is None:
            n, k = self.shape
            b = self._packed.view(n, k // 32, 16)
            self._codes = torch.cat((b & 0x0F, b >> 4), dim=2).view(n, k)
        return self._codes

    @property
    def scales(self) -> torch.Tensor:
        if self._scales is None:
            self._scales = self.half_params()[0].float()
        return self._scales

    @property
    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = self.half_params()[1].float()
        return self._offsets

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
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
