"""MXFP4 (OCP microscaling FP4, gpt-oss's expert weights) → dense float tensors.

A group of 32 weights shares one E8M0 scale byte ``e`` (the power of two 2^(e − 127)); each
weight is a 4-bit E2M1 code: a sign bit and one of 0, 0.5, 1, 1.5, 2, 3, 4, 6. Two layouts of
the same numbers:

- GGML's ``GGML_TYPE_MXFP4`` block (17 bytes): ``e``, then 16 bytes whose low nibble is weight
  j and high nibble weight j + 16 (Q4_0's order). ggml keeps the table doubled (integers) and
  the scale halved, 2^(e − 128): the same products, and no overflow at e = 255.
- an HF checkpoint's ``*_blocks`` [..., G, 16] with ``*_scales`` [..., G]: byte i holds weights
  2i (low nibble) and 2i + 1 (high nibble) of its group.

Either dequantised here to float, kept as the file's own 17 bytes a 32 (``Mxfp4Groups``: GGML's
nibble order, two codes a byte, the E8M0 byte apart — the form ``backends/cuda_moe.py``'s
``FP4`` kernels read; ``ggml_packed``/``hf_packed`` from either layout, ``packed_from_int8``
from the int8 form), or as the grouped kernels' int8 codes, exactly (``int8_codes``; what
3-D experts were kept as before, and still are with ``PENSIEVE_MXFP4_INT8=1``): doubled,
every E2M1 value is an integer in [−12, 12], so a block is int8 codes times one power of two 2^(e − 128) — a float16 scale, exact while e − 128 is in [−24, 15]
(float16's smallest subnormal to its largest power of two). An all-zero block's scale is 0 (its
value is 0 whatever e says); a tensor with another block outside that range is not converted
(None, with the reason logged): it stays on the dequantised path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
INT8_ENV = "PENSIEVE_MXFP4_INT8"  # "1": experts kept as int8 codes (2x the file), not packed


def packed_wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether 3-D MXFP4 experts are kept packed (``Mxfp4Groups``, the file's 4.25 bits a
    weight) rather than as int8 codes (``INT8_ENV`` = 1: the layout before, a GPU opt-out)."""
    return (os.environ if environ is None else environ).get(INT8_ENV, "0") != "1"

BLOCK = 32
CHUNK = 1 << 18  # blocks decoded at a time: bounds the temporaries (a 20b layer's gate/up
# experts are 16.6M blocks)
# E2M1 codes 0..15, doubled (ggml's ``kvalues_mxfp4``): sign bit 3, then 0, .5, 1, 1.5, 2, 3, 4, 6
DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
# the exponents whose scale 2^(e − 128) float16 holds exactly: 2^-24 (its least subnormal) … 2^15
F16_EXPONENTS = (128 - 24, 128 + 15)


def _pairs() -> torch.Tensor:
    """[256] int64: a byte's (low nibble, high nibble) doubled E2M1 values as two float32s."""
    table = torch.tensor(DOUBLED, dtype=torch.float32)
    byte = torch.arange(256)
    pairs = torch.stack((table[byte & 0x0F], table[byte >> 4]), dim=1).contiguous()
    return pairs.view(torch.int64).reshape(256)


_PAIRS = _pairs()


def _decode_into(out: torch.Tensor, qs: torch.Tensor, exponents: torch.Tensor,
                 interleaved: bool) -> None:
    """out [n, 32] float32 ← qs [n, 16] code bytes and exponents [n] (E8M0): a byte's nibbles
    are values j and j + 16 (GGML) or 2j and 2j + 1 (``interleaved``, HF). One 8-byte lookup
    per code byte (``index_select`` takes int32 indices) and one scale per block,
    2^(e − 128) × the doubled code, multiplied straight into ``out``."""
    n = qs.shape[0]
    values = torch.index_select(_PAIRS.to(qs.device), 0, qs.reshape(-1).to(torch.int32))
    values = values.view(torch.float32).view(n, BLOCK // 2, 2)
    scale = torch.ldexp(torch.ones(n, device=qs.device), exponents.to(torch.int32).sub_(128)).view(n, 1, 1)
    if interleaved:
        torch.mul(values, scale, out=out.view(n, BLOCK // 2, 2))
    else:
        torch.mul(values.transpose(1, 2), scale, out=out.view(n, 2, BLOCK // 2))


def ggml_blocks(blocks: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """(n, 17) GGML MXFP4 blocks → (n, 32) float32."""
    out = torch.empty(blocks.shape[0], BLOCK, device=blocks.device)
    for start in range(0, blocks.shape[0], chunk):
        part = blocks[start:start + chunk]
        _decode_into(out[start:start + chunk], part[:, 1:], part[:, 0], interleaved=False)
    return out


def hf_blocks(blocks: torch.Tensor, scales: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """An HF checkpoint's ``*_blocks`` [..., G, 16] uint8 and ``*_scales`` [..., G] uint8 →
    float32 [..., G * 32] (the rows as stored: ``[E, out, in]`` for gpt-oss's experts)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales "
                         f"{tuple(scales.shape)}")
    flat, exps = blocks.reshape(-1, BLOCK // 2), scales.reshape(-1)
    out = torch.empty(flat.shape[0], BLOCK, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        _decode_into(out[start:start + chunk], flat[start:start + chunk],
                     exps[start:start + chunk], interleaved=True)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def _int8_pairs() -> torch.Tensor:
    """[256] int16: a byte's (low nibble, high nibble) doubled E2M1 values as two int8s."""
    table = torch.tensor(DOUBLED, dtype=torch.int8)
    byte = torch.arange(256)
    return torch.stack((table[byte & 0x0F], table[byte >> 4]), dim=1).contiguous().view(
        torch.int16).reshape(256)


_INT8_PAIRS = _int8_pairs()


def int8_codes(qs: torch.Tensor, exponents: torch.Tensor, *, interleaved: bool,
               name: str = "", chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor] | None:
    """qs [n, 16] code bytes and exponents [n] (E8M0) → (int8 codes [n, 32] in −12..12,
    float16 scales [n]) with code · scale = the block's value exactly (``_decode_into``'s
    doubled value and 2^(e − 128)); None (logged, with ``name``) where a block that is not
    all zero has e − 128 outside [−24, 15]. Nibble order as ``_decode_into``'s (one 2-byte
    lookup per code byte); ``chunk`` blocks at a time (bounds the temporaries)."""
    n = qs.shape[0]
    pairs = _INT8_PAIRS.to(qs.device)
    codes = torch.empty(n, BLOCK, dtype=torch.int8, device=qs.device)
    scales = torch.empty(n, dtype=torch.float16, device=qs.device)
    low, high = F16_EXPONENTS
    for at in range(0, n, chunk):
        q, out = qs[at:at + chunk], codes[at:at + chunk]
        m = q.shape[0]
        both = torch.index_select(pairs, 0, q.reshape(-1).to(torch.int32)).view(torch.int8)
        if interleaved:  # byte j: weights 2j, 2j + 1 — the lookup's order already
            out.copy_(both.view(m, BLOCK))
        else:  # byte j: weights j, j + 16
            out.view(m, 2, 16).copy_(both.view(m, 16, 2).transpose(1, 2))
        e = exponents.reshape(n)[at:at + chunk].to(torch.int32)
        zero = (out == 0).all(dim=1)
        bad = ~zero & ((e < low) | (e > high))
        if bool(bad.any()):  # one host sync a chunk, at load
            log.info("MXFP4 %s: blocks' scales 2^(e-128) (e.g. e = %d) are not float16 values; "
                     "dequantised instead of kept as int8 codes", name or "tensor",
                     int(e[bad][0]))
            return None
        scale = torch.ldexp(torch.ones(m, device=qs.device), e.clamp(low, high) - 128)
        scales[at:at + chunk] = torch.where(zero, 0.0, scale)
    return codes, scales


def ggml_int8(raw: torch.Tensor, rows: int, cols: int, name: str = ""
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A GGML MXFP4 tensor's bytes, rows × cols → (int8 codes [rows, cols], float16 scales
    [rows, cols / 32]) or None (``int8_codes``)."""
    blocks = raw.reshape(-1, 17)
    out = int8_codes(blocks[:, 1:], blocks[:, 0], interleaved=False, name=name)
    if out is None:
        return None
    return out[0].reshape(rows, cols), out[1].reshape(rows, cols // BLOCK)


def hf_int8(blocks: torch.Tensor, scales: torch.Tensor, name: str = ""
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An HF ``*_blocks`` [..., G, 16] / ``*_scales`` [..., G] pair → (int8 codes
    [..., G · 32], float16 scales [..., G]) or None (``int8_codes``)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales "
                         f"{tuple(scales.shape)}")
    out = int8_codes(blocks.reshape(-1, BLOCK // 2), scales.reshape(-1), interleaved=True,
                     name=name)
    if out is None:
        return None
    return (out[0].reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK),
            out[1].reshape(scales.shape))


# --- the packed form: two E2M1 codes a byte + the E8M0 byte, the file's 4.25 bits a weight ------

@dataclass(frozen=True)
class Mxfp4Groups:
    """A weight [N, K] as MXFP4 kept packed: ``packed`` uint8 [N, K / 2], two E2M1 codes a byte
    in GGML's order (byte i of group g: column 32g + i in the low nibble, 32g + 16 + i in the
    high one), ``exponents`` uint8 [N, K / 32] the E8M0 bytes: w = e2m1 · 2^(e − 127). Only
    exponents 1..254 occur where a block's codes are not all zero (``ggml_packed``/``hf_packed``
    check); e = 0 reads as a zero scale. The stacked experts' form on CUDA (``ExpertCodes``)."""

    packed: torch.Tensor
    exponents: torch.Tensor
    group_size: int = BLOCK
    offsets: None = None
    ggml_type: str = "MXFP4"

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        return packed_dequantize(self.packed, self.exponents)


def _checked(packed: torch.Tensor, exps: torch.Tensor, name: str) -> bool:
    """Whether every block with a non-zero code has an exponent in 1..254 (0 would be 2^−127,
    read as 0 by the kernels; 255 is NaN): else logged, and the caller keeps no packed form."""
    live = (packed.reshape(-1, BLOCK // 2) & 0x77).amax(dim=1) > 0  # ±0 codes are zero
    e = exps.reshape(-1)
    bad = live & ((e == 0) | (e == 255))
    if bool(bad.any()):  # one host sync a tensor, at load
        log.info("MXFP4 %s: a block at exponent %d; not kept packed", name or "tensor",
                 int(e[bad][0]))
        return False
    return True


def ggml_packed(raw: torch.Tensor, rows: int, cols: int, name: str = ""
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A GGML MXFP4 tensor's bytes, rows × cols → (code bytes uint8 [rows, cols / 2], GGML's
    order: byte i of group g holds column 32g + i (low nibble) and 32g + 16 + i (high); E8M0
    exponents uint8 [rows, cols / 32]): the file's bytes, the exponent moved apart; None
    (logged) where a block's exponent is 0 or 255 (``Mxfp4Groups``)."""
    blocks = raw.reshape(rows * (cols // BLOCK), 17)
    packed = blocks[:, 1:].contiguous().view(rows, cols // 2)
    exps = blocks[:, 0].contiguous().view(rows, cols // BLOCK)
    return (packed, exps) if _checked(packed, exps, name) else None


def hf_packed(blocks: torch.Tensor, scales: torch.Tensor, name: str = ""
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An HF ``*_blocks`` [..., G, 16] / ``*_scales`` [..., G] pair → (code bytes uint8
    [..., G · 16] in GGML's order, E8M0 bytes [..., G]) or None (``ggml_packed``): HF's byte i
    holds weights 2i, 2i + 1; GGML's byte j weights j, j + 16 — the nibbles moved once here."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales "
                         f"{tuple(scales.shape)}")
    b = blocks.reshape(-1, BLOCK // 2)
    codes = torch.stack((b & 0x0F, b >> 4), dim=2).reshape(-1, 2, BLOCK // 2)  # [n, 32] by col
    packed = (codes[:, 0] | (codes[:, 1] << 4)).reshape(*scales.shape[:-1], -1)
    exps = scales.contiguous()
    return (packed, exps) if _checked(packed, exps, name) else None


# int8 code (doubled E2M1, −12..12) + 12 → its E2M1 nibble; −1 where no code (e.g. 5)
_NIBBLE_OF = torch.full((25,), -1, dtype=torch.int16)
for _nib, _val in enumerate(DOUBLED):
    if not (_val == 0 and _nib == 8):  # −0 → 0's nibble
        _NIBBLE_OF[_val + 12] = _nib


def packed_from_int8(codes: torch.Tensor, scales: torch.Tensor, chunk_rows: int = 4096
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``int8_codes``' form back to the packed one, exactly: int8 codes [R, K] (doubled E2M1)
    and float16 scales [R, K / 32] (2^(e − 128), or 0 for an all-zero block) → (code bytes
    uint8 [R, K / 2] in GGML's order, E8M0 bytes uint8 [R, K / 32]; a zero scale → e = 0).
    Raises ValueError on a code no E2M1 value doubles to or a scale that is no power of two.
    ``chunk_rows`` rows at a time (bounds the temporaries)."""
    rows, cols = codes.shape
    if cols % BLOCK or scales.shape != (rows, cols // BLOCK):
        raise ValueError(f"MXFP4 codes {tuple(codes.shape)} do not fit scales "
                         f"{tuple(scales.shape)}")
    table = _NIBBLE_OF.to(codes.device)
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=codes.device)
    exps = torch.empty(rows, cols // BLOCK, dtype=torch.uint8, device=codes.device)
    for at in range(0, rows, chunk_rows):
        c = codes[at:at + chunk_rows]
        m = c.shape[0]
        ci = c.to(torch.int64) + 12
        nib = table[ci.clamp(0, 24)]
        if bool((nib < 0).any() or ((ci < 0) | (ci > 24)).any()):
            raise ValueError("MXFP4 int8 codes: a code that is no doubled E2M1 value")
        nib = nib.view(m, cols // BLOCK, 2, 16)
        packed[at:at + m] = (nib[:, :, 0] | (nib[:, :, 1] << 4)).to(torch.uint8).view(m, -1)
        s = scales[at:at + chunk_rows].float()
        mant, ex = torch.frexp(s)  # s = 0.5 · 2^ex for a power of two
        zero = s == 0
        if bool((~zero & (mant != 0.5)).any()):
            raise ValueError("MXFP4 int8 scales: a scale that is no power of two")
        e = torch.where(zero, 0, ex.to(torch.int32) - 1 + 128)  # 2^(e − 128) = s
        if bool(((e < 1) & ~zero).any() or (e > 254).any()):
            raise ValueError("MXFP4 int8 scales: an exponent E8M0 does not hold")
        exps[at:at + m] = e.to(torch.uint8)
    return packed, exps


def packed_dequantize(packed: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """The packed form → float32 [R, K] (``ggml_blocks`` over the same bytes; e = 0 is read as
    a zero scale, as the kernels read it)."""
    rows = packed.shape[0]
    blocks = torch.cat((exps.reshape(-1, 1), packed.reshape(-1, BLOCK // 2)), dim=1)
    w = ggml_blocks(blocks).view(rows, -1, BLOCK)
    return torch.where((exps == 0)[..., None], 0.0, w).view(rows, -1)
