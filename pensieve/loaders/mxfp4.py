"""MXFP4 (OCP microscaling FP4, gpt-oss's expert weights) → dense float tensors.

A group of 32 weights shares one E8M0 scale byte ``e`` (the power of two 2^(e − 127)); each
weight is a 4-bit E2M1 code: a sign bit and one of 0, 0.5, 1, 1.5, 2, 3, 4, 6. Two layouts of
the same numbers:

- GGML's ``GGML_TYPE_MXFP4`` block (17 bytes): ``e``, then 16 bytes whose low nibble is weight
  j and high nibble weight j + 16 (Q4_0's order). ggml keeps the table doubled (integers) and
  the scale halved, 2^(e − 128): the same products, and no overflow at e = 255.
- an HF checkpoint's ``*_blocks`` [..., G, 16] with ``*_scales`` [..., G]: byte i holds weights
  2i (low nibble) and 2i + 1 (high nibble) of its group.

Dequantised on load: MXFP4 is not kept as codes on any kernel yet.
"""

from __future__ import annotations

import torch

BLOCK = 32
# E2M1 codes 0..15, doubled (ggml's ``kvalues_mxfp4``): sign bit 3, then 0, .5, 1, 1.5, 2, 3, 4, 6
DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _decode(codes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """codes [..., G, 32] (0..15) and exponents [..., G] (E8M0 bytes) → float32 [..., G, 32]."""
    table = torch.tensor(DOUBLED, dtype=torch.float32)
    values = table[codes.to(torch.int64)]
    return torch.ldexp(values, exponents.to(torch.int32).sub_(128).unsqueeze(-1))


def ggml_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 17) GGML MXFP4 blocks → (n, 32) float32."""
    qs = blocks[:, 1:]
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=1)
    return _decode(codes, blocks[:, 0])


def hf_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An HF checkpoint's ``*_blocks`` [..., G, 16] uint8 and ``*_scales`` [..., G] uint8 →
    float32 [..., G * 32] (the rows as stored: ``[E, out, in]`` for gpt-oss's experts)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales "
                         f"{tuple(scales.shape)}")
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)
    values = _decode(codes, scales)
    return values.flatten(-2)
