"""GGML tensor bytes → dense torch tensors.

Float types (F32, F16, BF16) and the common block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; Q4_K,
Q5_K, Q6_K of the ``Q4_K_M``/``Q5_K_M`` files; IQ4_NL, IQ4_XS; gpt-oss's MXFP4) dequantise with
vectorised torch ops, 3-10× faster than ``gguf.quants`` (which matters for the ready-in-3-s target); the
rarer Q2_K and Q3_K use ``gguf.quants.dequantize``, the reference implementation, which every
fast path is tested against bit for bit. The ``_*_codes`` helpers give the integer codes the
CPU kernels keep (``int4_codes.py``).

Block layouts (all little-endian, ``d``/``m`` are float16):
Q8_0 = d, 32 × int8                 → d·q
Q4_0 = d, 16 bytes of nibbles       → d·(q − 8); low nibbles are values 0..15, high 16..31
Q4_1 = d, m, 16 bytes of nibbles    → d·q + m
MXFP4 = e (E8M0), 16 bytes of E2M1 nibbles, Q4_0's order → 2^(e−127)·fp4(q)  (``mxfp4.py``)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from pensieve.loaders import mxfp4
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


def k_scale_codes(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes [n, 12] uint8 → 8 six-bit scales and 8 six-bit mins [n, 8], uint8.

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; bytes 8-11 hold the low
    nibbles of scales 4-7 and high nibbles of mins 4-7, whose top 2 bits are the spare
    top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((a & 63, (c & 15) | ((a >> 6) << 4)), dim=1)
    mins = torch.cat((b & 63, (c >> 4) | ((b >> 6) << 4)), dim=1)
    return scales, mins


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k_scale_codes`` as float32."""
    scales, mins = k_scale_codes(packed)
    return scales.to(torch.float32), mins.to(torch.float32)


def _k_affine(q: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(n, 8, 32) codes → d·scale·q − dmin·min per 32-weight sub-block."""
    scales, mins = _k_scales(blocks[:, 4:16])
    step = (_scale(blocks, 0) * scales).unsqueeze(2)
    offset = (_scale(blocks, 2) * mins).unsqueeze(2)
    return q.to(torch.float32).mul_(step).sub_(offset).reshape(-1, 256)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """d, dmin, 12 scale bytes, 128 bytes: chunk i's low nibbles are sub-block 2i, high 2i+1."""
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    return _k_affine(torch.cat((qs & 15, qs >> 4), dim=2).reshape(-1, 8, 32), blocks)


def _q5_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K's codes (0..31) as (n, 8, 32) uint8: Q4_K's nibbles plus 32 bytes before them
    whose bit j is sub-block j's fifth bit."""
    qh = blocks[:, 16:48].reshape(-1, 1, 32)
    qs = blocks[:, 48:].reshape(-1, 4, 1, 32)
    low = torch.cat((qs & 15, qs >> 4), dim=2).reshape(-1, 8, 32)
    high = torch.cat([(qh >> bit) & 1 for bit in range(8)], dim=1)
    return low | (high << 4)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    return _k_affine(_q5_k_codes(blocks), blocks)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales (one per 16 weights), d.

    Per 128-weight half: groups of 32 take (ql[0:32] low, ql[32:64] low, ql[0:32] high,
    ql[32:64] high) nibbles, and bits (0-1, 2-3, 4-5, 6-7) of the half's 32 qh bytes.
    """
    q = _q6_k_codes(blocks).to(torch.float32).reshape(-1, 16, 16)
    return q.mul_(_q6_k_steps(blocks).unsqueeze(2)).reshape(-1, 256)


def _q6_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K's signed codes (q − 32, in −32..31) as (n, 256) int8, in value order.

    Each half of a block: 64 bytes whose low nibbles are quarters 0-1 and high nibbles quarters
    2-3 (of 32 values each), and 32 bytes of 2-bit high parts (quarter i at bits 2i). Written
    into one output in place: the output layer alone is 233M codes in a 1.5B Qwen, so the
    concatenations this replaces cost ~0.5 s of start-up."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    out = torch.empty(n, 2, 4, 32, dtype=torch.uint8, device=blocks.device)
    low = out.view(n, 2, 2, 64)
    torch.bitwise_and(ql, 15, out=low[:, :, 0])
    torch.bitwise_right_shift(ql, 4, out=low[:, :, 1])
    high = torch.empty(n, 2, 4, 32, dtype=torch.uint8, device=blocks.device)
    high[:, :, 0].copy_(qh)
    for i, shift in ((1, 2), (2, 4), (3, 6)):
        torch.bitwise_right_shift(qh, shift, out=high[:, :, i])
    out.bitwise_or_(high.bitwise_and_(3).bitwise_left_shift_(4))
    return out.view(torch.int8).sub_(32).reshape(n, 256)


def _q6_k_steps(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K's (n, 16) float32 steps d·scale, one per 16 values."""
    return _scale(blocks, 208) * blocks[:, 192:208].view(torch.int8).to(torch.float32)


def _q5_codes(blocks: torch.Tensor, data_at: int) -> torch.Tensor:
    """Q5_0/Q5_1's codes (0..31) as (n, 32) uint8: nibbles as Q4_0, and the fifth bit of value
    j in bit j of the little-endian uint32 before them."""
    low = _nibbles(blocks[:, data_at:])
    qh = blocks[:, data_at - 4:data_at, None]  # byte b holds values 8b..8b+7, lowest bit first
    high = ((qh >> torch.arange(8, dtype=torch.uint8, device=qh.device)) & 1).reshape(-1, 32)
    return low | (high << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    return _q5_codes(blocks, 6).to(torch.float32).sub_(16.0).mul_(_scale(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _q5_codes(blocks, 8).to(torch.float32).mul_(_scale(blocks, 0)).add_(_scale(blocks, 2))


IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_nl_codes(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) IQ4 nibble bytes → (n, 32) int8 table values (low nibbles, then high)."""
    table = torch.tensor(IQ4_VALUES, dtype=torch.int8, device=qs.device)
    return table[_nibbles(qs).to(torch.int64)]


def _iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """d, 16 bytes of nibbles indexing a fixed non-linear table: d·table[q]."""
    return _iq4_nl_codes(blocks[:, 2:]).to(torch.float32).mul_(_scale(blocks, 0))


def _iq4_xs_steps(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_XS's (n, 8) float32 steps d·(ls − 32), one per 32 values: ls is a 6-bit scale, low
    4 bits in the nibbles of bytes 4..7, high 2 bits in the uint16 at byte 2."""
    low = torch.stack((blocks[:, 4:8] & 15, blocks[:, 4:8] >> 4), dim=2).reshape(-1, 8)
    high_bits = blocks[:, 2].to(torch.int64) | (blocks[:, 3].to(torch.int64) << 8)
    high = (high_bits[:, None] >> (2 * torch.arange(8, device=blocks.device))) & 3
    ls = low.to(torch.int64) | (high << 4)
    return _scale(blocks, 0) * (ls - 32).to(torch.float32)


def _iq4_xs_codes(blocks: torch.Tensor) -> torch.Tensor:
    return _iq4_nl_codes(blocks[:, 8:].reshape(-1, 16)).reshape(-1, 256)


def _iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    q = _iq4_xs_codes(blocks).to(torch.float32).reshape(-1, 8, 32)
    return q.mul_(_iq4_xs_steps(blocks).unsqueeze(2)).reshape(-1, 256)


_TORCH_BLOCKS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.IQ4_NL: _iq4_nl,
    Q.IQ4_XS: _iq4_xs,
    Q.MXFP4: mxfp4.ggml_blocks,
}
_FLOATS: dict[GGMLQuantizationType, torch.dtype] = {
    Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16,
}
_REFERENCE = frozenset({Q.Q2_K, Q.Q3_K})

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
        values = torch.from_numpy(gguf_dequantize(blocks.cpu().numpy(), ggml_type)).to(raw.device)
    return values.reshape(shape).to(dtype)


def reference_dequantize(
    raw: torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """``gguf.quants.dequantize`` of the same bytes, as float32 (for tests and checks)."""
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    rows = raw.numpy().reshape(-1, type_size)
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(rows, ggml_type))).reshape(shape)
