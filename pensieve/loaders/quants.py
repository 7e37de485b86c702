"""GGML tensor bytes → dense torch tensors.

Float types and the hot block types of small models (Q8_0, Q4_0, Q4_1) dequantise with
vectorised torch ops (~10× faster than ``gguf.quants`` on 2 CPU cores, which matters for
the ready-in-3-s target); the K-quants and Q5_0/Q5_1 use ``gguf.quants.dequantize``, the
reference implementation, which the fast paths are tested against.

Block layouts (all little-endian, ``d``/``m`` are float16):
Q8_0 = d, 32 × int8                 → d·q
Q4_0 = d, 16 bytes of nibbles       → d·(q − 8); low nibbles are values 0..15, high 16..31
Q4_1 = d, m, 16 bytes of nibbles    → d·q + m
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from pensieve.loaders.checkpoint import CheckpointError

Q = GGMLQuantizationType


def _scale(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 stored at byte ``at`` of every block, as an (n_blocks, 1) float32."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes → (n, 32) values: low nibbles first, then high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).to(torch.float32).mul_(_scale(blocks, 0))


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:]).to(torch.float32).sub_(8.0)
    return q.mul_(_scale(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 4:]).to(torch.float32)
    return q.mul_(_scale(blocks, 0)).add_(_scale(blocks, 2))


_TORCH_BLOCKS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
}
_FLOATS: dict[GGMLQuantizationType, torch.dtype] = {
    Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16,
}
_REFERENCE = frozenset({Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {*_FLOATS, *_TORCH_BLOCKS, *_REFERENCE}
)


def dequantize(
    raw: torch.Tensor,
    ggml_type: GGMLQuantizationType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    name: str = "tensor",
) -> torch.Tensor:
    """Decode ``raw`` (flat uint8 bytes of one tensor) into a new ``dtype`` tensor of ``shape``.

    ``shape`` is in torch order: its last dim is GGML's row (``ne[0]``), along which
    blocks run. Raises CheckpointError for unsupported types or a size mismatch.
    """
    if ggml_type not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise CheckpointError(
            f"{name}: unsupported GGUF tensor type {ggml_type.name}; supported: {supported}"
        )
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    count = int(np.prod(shape, dtype=np.int64))
    if count % block or raw.numel() != count // block * type_size:
        raise CheckpointError(
            f"{name}: {raw.numel()} bytes do not hold a {ggml_type.name} tensor of shape {shape}"
        )
    if ggml_type in _FLOATS:
        return raw.view(_FLOATS[ggml_type]).reshape(shape).to(dtype, copy=True)
    blocks = raw.reshape(-1, type_size)
    if ggml_type in _TORCH_BLOCKS:
        values = _TORCH_BLOCKS[ggml_type](blocks)
    else:
        values = torch.from_numpy(gguf_dequantize(blocks.numpy(), ggml_type))
    return values.reshape(shape).to(dtype)


def reference_dequantize(
    raw: torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """``gguf.quants.dequantize`` of the same bytes, as float32 (for tests and checks)."""
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    rows = raw.numpy().reshape(-1, type_size)
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(rows, ggml_type))).reshape(shape)
