"""Tensors equal bit for bit: same dtype and shape, the same bytes (NaN equals NaN, −0 ≠ +0)."""

from __future__ import annotations

import torch


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = lambda t: t.view(torch.uint8) if t.is_floating_point() else t  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
