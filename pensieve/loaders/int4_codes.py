"""GGUF 4-bit blocks → ``Int4Groups`` (codes + per-32 scale/offset), exactly, no dequantising.

Q4_0 (``d·(q−8)``), Q4_1 (``d·q + m``) and Q4_K (``d·sc·q − dmin·m`` per 32-weight sub-block)
are all 4-bit codes with one affine map per 32 weights, which is what PyTorch's int4
weight-only matmul takes. Q4_0/Q4_1 keep their packed bytes (``Int4Groups.from_nibbles``).
Other types return None and are dequantised as usual.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pensieve.loaders.quants import _k_scales, _nibbles, _scale
from pensieve.models.quant_linear import Int4Groups

Q = GGMLQuantizationType
GROUP = 32
INT4_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K})


def int4_groups(raw: torch.Tensor, ggml_type: Q, shape: tuple[int, ...]) -> Int4Groups | None:
    """The exact int4 form of a 2-D tensor of ``shape`` [N, K] stored as ``ggml_type``."""
    if ggml_type not in INT4_TYPES or len(shape) != 2:
        return None
    rows, cols = shape
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[ggml_type][1])
    if ggml_type is Q.Q4_K:
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        codes = torch.cat((qs & 15, qs >> 4), dim=2).reshape(-1, 8, 32)
        sc, mins = _k_scales(blocks[:, 4:16])
        scales = _scale(blocks, 0) * sc  # [n, 8]
        offsets = -(_scale(blocks, 2) * mins)
    else:
        packed = _packed(blocks, ggml_type, rows, cols)
        if packed is not None:
            return packed
        data_at = 2 if ggml_type is Q.Q4_0 else 4
        codes = _nibbles(blocks[:, data_at:])
        scales = _scale(blocks, 0)
        offsets = -8.0 * scales if ggml_type is Q.Q4_0 else _scale(blocks, 2)
    return Int4Groups(
        codes=codes.reshape(rows, cols).contiguous(),
        scales=scales.reshape(rows, cols // GROUP).contiguous(),
        offsets=offsets.reshape(rows, cols // GROUP).contiguous(),
        group_size=GROUP,
    )


Q8_NAMES = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


def q8_0_codes(raw: torch.Tensor, ggml_type: Q, shape: tuple[int, ...]
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A 2-D Q8_0 tensor's own codes and scales: (int8 [N, K], float16 [N, K/32]), exactly;
    None for other types (``w = code · scale``, as the CPU kernels' q8 format)."""
    if ggml_type is not Q.Q8_0 or len(shape) != 2:
        return None
    rows, cols = shape
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[Q.Q8_0][1])
    scales = blocks[:, :2].contiguous().view(torch.float16).reshape(rows, cols // GROUP)
    return blocks[:, 2:].contiguous().view(torch.int8).reshape(rows, cols), scales


def _packed(blocks: torch.Tensor, ggml_type: Q, rows: int, cols: int) -> Int4Groups | None:
    """Q4_0/Q4_1 blocks as they are: their bytes already hold two codes each in the order
    ``Int4Groups.from_nibbles`` takes; only the float16 parameters move. None if a Q4_0
    offset (−8·d) does not fit float16."""
    g = cols // GROUP
    halves = lambda at: blocks[:, at:at + 2].contiguous().view(torch.float16).reshape(rows, g)
    scales = halves(0)
    if ggml_type is Q.Q4_0:
        offsets = (scales.float() * -8.0).half()
        if not torch.isfinite(offsets).all():
            return None
        data_at = 2
    else:
        offsets, data_at = halves(2), 4
    nibbles = blocks[:, data_at:].contiguous().reshape(rows, cols // 2)
    return Int4Groups.from_nibbles(nibbles, scales, offsets, GROUP)
