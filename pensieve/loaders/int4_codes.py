"""GGUF blocks → integer codes with per-group scales, exactly, no dequantising.

4-bit types become ``Int4Groups`` (codes + per-32 scale/offset): Q4_0 (``d·(q−8)``), Q4_1
(``d·q + m``) and Q4_K (``d·sc·q − dmin·m`` per 32-weight sub-block) are all 4-bit codes with
one affine map per 32 weights, which is what PyTorch's int4 weight-only matmul takes. Q4_0/Q4_1
keep their packed bytes (``Int4Groups.from_nibbles``); Q4_K keeps its nibbles and own factors
only (``Q4KGroups``: its per-32 products are derived when a layout asks for them).

The other common types become ``Int8Groups`` (int8 codes, a float16 scale per 16 or 32 values,
optionally a float16 offset per 32), the CPU kernels' int8 formats:

=========  ====================================  =====  ===========  ======
type       value                                 code   scale        offset
=========  ====================================  =====  ===========  ======
Q8_0       d·q                                   q      d /32        —
Q5_0       d·(q − 16)                            q−16   d /32        —
Q5_1       d·q + m                               q      d /32        m
Q5_K       d·sc·q − dmin·m  (per 32)             q      d·sc /32     −dmin·m
Q6_K       d·sc·(q − 32)   (per 16)              q−32   d·sc /16     —
IQ4_NL     d·T[q]  (T: a fixed int8 table)       T[q]   d /32        —
IQ4_XS     d·(ls − 32)·T[q]  (per 32)            T[q]   d·(ls−32)    —
MXFP4      2^(e−128)·2fp4(q)  (3-D experts)      2fp4   2^(e−128)    —
=========  ====================================  =====  ===========  ======

(3-D MXFP4 experts are kept packed instead, ``mxfp4.Mxfp4Groups``, unless
``PENSIEVE_MXFP4_INT8=1``.)

Scales that are products (``d·sc``) are rounded to float16 (relative error ≤ 2⁻¹¹, as Q4_K's
in ``Int4Groups``); the rest are the file's own float16 values, so those types are exact. Q4_K
and Q6_K rows of whole super-blocks also keep the file's own factors (``k_scales``), exact:
``q4_k_super_words`` holds Q4_K's as the file does, a 16-byte word quad a 256, for the CUDA MoE
experts' ``q4k`` layout (``q4_k_word_factors`` reads them back per 32). Q6_K is
kept as the file's bytes only (``Q6KGroups``: its codes and float16 steps are derived when a
layout asks for them). A tensor whose products overflow float16 returns None (it is
dequantised as usual), as do other types.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pensieve.loaders.quants import (
    _iq4_nl_codes, _iq4_xs_codes, _iq4_xs_steps, _k_scales, _nibbles, _q5_codes, _q5_k_codes,
    _q6_k_codes, _scale, k_scale_codes,
)
from pensieve.models.quant_linear import Int4Groups

Q = GGMLQuantizationType
GROUP = 32
INT4_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K})
INT8_TYPES = frozenset({Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS})


@dataclass(frozen=True)
class Int8Groups:
    """A weight [N, K] as int8 codes with ``w = code · scale (+ offset)`` per group along K.

    ``scales`` [N, K / group_size] float16 (group 16 or 32); ``offsets`` [N, K / 32] float16 or
    None; ``ggml_type`` names the source (for logs). ``k_scales`` (Q6_K only): the file's own
    factors of ``scales`` — int8 sub-scales [N, K/16] and float16 ``d`` [N, K/256], exact where
    ``scales`` is their product rounded — for layouts that keep the file's 210-byte budget. A
    GGUF's Q6_K loads as the subclass ``Q6KGroups``, which derives codes and scales on demand.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group_size: int
    ggml_type: str = ""
    k_scales: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        g = self.group_size
        w = (self.codes.view(n, k // g, g).float() * self.scales.float()[..., None]).view(n, k)
        if self.offsets is not None:
            w = (w.view(n, k // GROUP, GROUP) + self.offsets.float()[..., None]).view(n, k)
        return w


@dataclass(frozen=True)
class ExpertCodes:
    """A stacked expert weight [E, N, K] (a GGUF's 3-D ``ffn_*_exps``) kept as codes:
    ``groups`` is the 2-D form of its rows [E·N, K] (expert ``e``'s rows are ``e·N … e·N+N-1``,
    as the file stores them), ``experts`` is E. ``backends/quantize.py`` keeps it for the CPU
    kernels' expert slices or dequantises it where the family or device takes no such path."""

    groups: Int4Groups | Int8Groups  # or mxfp4.Mxfp4Groups (gpt-oss's experts)
    experts: int

    @property
    def shape(self) -> tuple[int, int, int]:
        n, k = self.groups.shape
        return self.experts, n // self.experts, k

    def dequantize(self) -> torch.Tensor:
        return self.groups.dequantize().view(self.shape)


def quant_groups(raw: torch.Tensor, ggml_type: Q, shape: tuple[int, ...]
                 ) -> Int4Groups | Int8Groups | ExpertCodes | None:
    """The exact code form of a 2-D tensor of ``shape`` [N, K] stored as ``ggml_type``:
    ``Int4Groups`` for 4-bit types, ``Int8Groups`` for the others above, else None; a 3-D
    [E, N, K] one as ``ExpertCodes`` over its [E·N, K] rows."""
    if len(shape) == 3:
        if ggml_type is Q.MXFP4:  # gpt-oss's experts: packed or int8 codes (loaders/mxfp4.py)
            return _mxfp4_experts(raw, shape)
        if ggml_type not in INT4_TYPES | INT8_TYPES or shape[2] % GGML_QUANT_SIZES[ggml_type][0]:
            return None
        groups = quant_groups(raw, ggml_type, (shape[0] * shape[1], shape[2]))
        return None if groups is None else ExpertCodes(groups, shape[0])
    if len(shape) != 2:
        return None
    if ggml_type in INT8_TYPES:
        return int8_groups(raw, ggml_type, shape)
    return _int4_groups(raw, ggml_type, shape)


def _mxfp4_experts(raw: torch.Tensor, shape: tuple[int, ...]) -> ExpertCodes | None:
    """A 3-D MXFP4 tensor [E, N, K] kept packed as the file holds it (``mxfp4.Mxfp4Groups``,
    4.25 bits a weight), or with ``PENSIEVE_MXFP4_INT8=1`` as int8 codes × a float16 power of
    two per 32, exactly; None where an exponent does not fit the form (dequantised instead)."""
    from pensieve.loaders import mxfp4

    rows, cols = shape[0] * shape[1], shape[2]
    if cols % GROUP:
        return None
    if mxfp4.packed_wanted():
        kept = mxfp4.ggml_packed(raw, rows, cols, name=f"expert tensor {tuple(shape)}")
        return None if kept is None else ExpertCodes(mxfp4.Mxfp4Groups(*kept), shape[0])
    out = mxfp4.ggml_int8(raw, rows, cols, name=f"expert tensor {tuple(shape)}")
    if out is None:
        return None
    return ExpertCodes(Int8Groups(out[0], out[1], None, GROUP, ggml_type="MXFP4"), shape[0])


# The loader's name for it (``load_gguf(keep_int4=True)`` keeps every type above as codes).
int4_groups = quant_groups


def int8_groups(raw: torch.Tensor, ggml_type: Q, shape: tuple[int, ...]) -> Int8Groups | None:
    """The int8 form of a 2-D tensor of ``shape`` [N, K] stored as one of ``INT8_TYPES``
    (Q6_K as ``Q6KGroups``: an ``Int8Groups`` holding only the file's bytes)."""
    if ggml_type not in INT8_TYPES or len(shape) != 2:
        return None
    rows, cols = shape
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[ggml_type][1])
    offsets, group = None, GROUP
    if ggml_type is Q.Q8_0:
        codes, scales = blocks[:, 2:].contiguous().view(torch.int8), _half(blocks, 0)
    elif ggml_type is Q.Q5_0:
        codes, scales = (_q5_codes(blocks, 6).view(torch.int8) - 16), _half(blocks, 0)
    elif ggml_type is Q.Q5_1:
        codes, scales, offsets = _q5_codes(blocks, 8).view(torch.int8), _half(blocks, 0), _half(blocks, 2)
    elif ggml_type is Q.Q5_K:
        sc, mins = _k_scales(blocks[:, 4:16])
        codes = _q5_k_codes(blocks).view(torch.int8)
        scales, offsets = (_scale(blocks, 0) * sc).half(), (-(_scale(blocks, 2) * mins)).half()
    elif ggml_type is Q.Q6_K:  # the file's bytes only, the rest derived (Q6KGroups)
        return Q6KGroups.from_blocks(blocks, rows, cols)
    elif ggml_type is Q.IQ4_NL:
        codes, scales = _iq4_nl_codes(blocks[:, 2:]), _half(blocks, 0)
    else:  # IQ4_XS
        codes, scales = _iq4_xs_codes(blocks), _iq4_xs_steps(blocks).half()
    if not torch.isfinite(scales).all() or (offsets is not None and not torch.isfinite(offsets).all()):
        return None
    return Int8Groups(
        codes=codes.reshape(rows, cols).contiguous(),
        scales=scales.reshape(rows, cols // group).contiguous(),
        offsets=None if offsets is None else offsets.reshape(rows, cols // GROUP).contiguous(),
        group_size=group, ggml_type=ggml_type.name)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[:, at:at + 2].contiguous().view(torch.float16)


class Q6KGroups(Int8Groups):
    """A Q6_K weight [N, K] as ``Int8Groups`` holding only what the file holds: each 256-value
    block's 192 bytes of 6-bit codes (128 of low nibbles, 64 of 2-bit high parts), its 16 int8
    sub-scales and its float16 ``d`` — 210 bytes a 256, 6.56 bits a weight. ``codes`` (int8
    [N, K], 8 bits a weight) and ``scales`` (float16 d·sc [N, K/16], 1 bit) are derived each
    time they are asked for, not kept: loading holds every weight until the model is built
    (on the GPU too, where it converts there), and the layouts that take Q6_K (``cuda_q6k``,
    the CUDA MoE experts' ``six``, the CPU ``F_Q6``) repack the codes and read the file's own
    factors (``k_scales``, views of what is held), so keeping them held 3 more bits a weight
    of every Q6_K tensor at that peak. The values are those of the eager forms bit for bit.

    A subclass, so ``isinstance(p, Int8Groups)`` holds; its fields ``codes``, ``scales`` and
    ``k_scales`` are properties here (the dataclass ``__init__`` is not used; ``replace``
    gives a plain ``Int8Groups``), and equality and hashing are by identity (the dataclass
    ones would derive every form to compare).
    Built only where every d·sc is a finite float16 (``q6_k_fits_half``)."""

    offsets = None
    group_size = 16
    ggml_type = "Q6_K"
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __new__(cls, *args: object, **fields: object) -> Q6KGroups | Int8Groups:
        """``dataclasses.replace`` calls the class with every field by name: that gives the
        plain ``Int8Groups`` of those values (e.g. ``k_scales=None``: a Q6_K without its own
        factors), which are no longer the file's bytes."""
        if "codes" in fields:
            return Int8Groups(**fields)
        return super().__new__(cls)

    def __init__(self, quants: torch.Tensor, sub: torch.Tensor, d: torch.Tensor,
                 shape: tuple[int, int]) -> None:
        """quants [n, 192] uint8 (ql, qh), sub [n, 16] int8, d [n] float16: the n blocks of a
        weight of ``shape`` in the file's order (a frozen dataclass: its field names are not
        set, these are not fields)."""
        self._quants, self._sub, self._d = quants, sub, d
        self._shape = (int(shape[0]), int(shape[1]))

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, rows: int, cols: int) -> Q6KGroups | None:
        """From the file's blocks [n, 210] (copied: a view would keep the reader's buffer);
        None where a d·sc overflows float16 (the tensor is then dequantised as usual)."""
        sub = _copy(blocks[:, 192:208]).view(torch.int8)
        d = _copy(blocks[:, 208:210]).view(torch.float16).reshape(-1)
        if not q6_k_fits_half(sub, d):
            return None
        return cls(_copy(blocks[:, :192]), sub, d, (rows, cols))

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def codes(self) -> torch.Tensor:
        """int8 q − 32 in −32..31 [N, K] (derived, not kept)."""
        return _q6_k_codes(self._quants).reshape(self._shape)

    @property
    def scales(self) -> torch.Tensor:
        """float16 d·sc [N, K/16], the float32 product rounded once (derived, not kept)."""
        steps = self._d.float()[:, None] * self._sub.float()
        return steps.half().reshape(self._shape[0], -1)

    @property
    def k_scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The file's own factors per row, int8 sub-scales [N, K/16] and float16 d [N, K/256]
        (views of what is held); None unless a row is whole super-blocks."""
        rows, cols = self._shape
        if cols % 256:
            return None
        return self._sub.view(rows, cols // 16), self._d.view(rows, cols // 256)

    def six_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``cuda_q6k.pack_six(self.codes)`` straight from the file's bytes, without the int8
        codes (8 bits a weight): (low 4 bits in the int4 layout [N, K/2], high 2 bits four a
        byte [N, K/4]). A block half's 128 values are four groups of 32: the low nibbles of
        ``ql[0:32]``, of ``ql[32:64]``, then their high nibbles; the int4 layout puts value i
        of a group in the low nibble of byte i and value i+16 in the high one (as Q4_K's
        ``_q4_k_nibbles``). Group q's high parts are bits 2q of ``qh[0:32]``, byte i of a
        group holding values i, i+8, i+16, i+24 at bits 0, 2, 4, 6. (q − 32 + 32 = q.)"""
        n = self._quants.shape[0]
        ql = self._quants[:, :128].reshape(n, 2, 2, 2, 16)  # block half, ql half, value half
        lo, hi = ql[:, :, :, 0], ql[:, :, :, 1]
        low = torch.stack(((lo & 0x0F) | (hi << 4), (lo >> 4) | (hi & 0xF0)), dim=2)
        qh = self._quants[:, 128:].reshape(n, 2, 1, 4, 8)  # block half, value i + 8j: j, i
        two = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qh.device
                                  ).view(1, 1, 4, 1, 1)) & 3  # [n, 2, group, j, i]
        high = two[:, :, :, 0] | (two[:, :, :, 1] << 2) | (two[:, :, :, 2] << 4) | (
            two[:, :, :, 3] << 6)
        rows, cols = self._shape
        return low.reshape(rows, cols // 2), high.reshape(rows, cols // 4)

    def __repr__(self) -> str:
        return f"Q6KGroups(shape={self._shape}, device={self._quants.device})"


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy, never a view (even where ``t`` is contiguous already)."""
    return t.clone(memory_format=torch.contiguous_format)


def q6_k_fits_half(sub: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether every Q6_K step d·sc rounds to a finite float16, without making the steps: a
    float16 times an int8 is exact in float32 (19 significant bits), so a block's largest
    |step| is |d|·max|sc| exactly, finite in float16 iff below ``HALF_LIMIT`` (a NaN or
    infinite d fails the comparison, as its steps fail ``isfinite``; so does ∞·0)."""
    top = sub.to(torch.int16).abs().amax(dim=1).float()  # (int16: |−128| fits)
    return bool(((d.float().abs() * top) < HALF_LIMIT).all())


def _int4_groups(raw: torch.Tensor, ggml_type: Q, shape: tuple[int, ...]) -> Int4Groups | None:
    """The exact int4 form of a 2-D tensor of ``shape`` [N, K] stored as ``ggml_type``."""
    if ggml_type not in INT4_TYPES or len(shape) != 2:
        return None
    rows, cols = shape
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[ggml_type][1])
    if ggml_type is Q.Q4_K:
        packed = _q4_k_nibbles(blocks, rows, cols)
        if packed is not None:
            return packed
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
    groups = Int4Groups(
        codes=codes.reshape(rows, cols).contiguous(),
        scales=scales.reshape(rows, cols // GROUP).contiguous(),
        offsets=offsets.reshape(rows, cols // GROUP).contiguous(),
        group_size=GROUP,
    )
    if ggml_type is Q.Q4_K and cols % 256 == 0:  # products past float16: the factors still fit
        groups.k_scales = _q4_k_factors(blocks, rows, cols)
    return groups


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


# A float32 value rounds to a finite float16 below this magnitude (65504 is the largest; the
# tie at 65520 rounds to even, past it)
HALF_LIMIT = 65520.0


class Q4KGroups(Int4Groups):
    """A Q4_K weight [N, K] as ``Int4Groups`` holding only what the file holds: its nibbles in
    ``from_nibbles``' order and its own factors per 256 (12 bytes of 6-bit ``sc``/``m``,
    float16 ``d``/``dmin``), 4.5 bits a weight. The per-32 products the other layouts take —
    float16 ``d·sc``/``−dmin·m`` (``nibbles``' parameters, 1 bit a weight) and their exact
    float32 values (``scales``/``offsets``, 2 bits) — are derived each time they are asked
    for, not kept: loading holds every weight until the model is built (on the GPU too, where
    it converts there), and the CUDA MoE experts' ``q4k`` layout reads only the nibbles and
    factors (``packed_codes``, ``k_scales``), so keeping them held 3 more bits a weight of
    every Q4_K tensor at that peak. Built only where every float16 product is finite
    (``q4_k_fits_half``); the values are those of the eager products bit for bit."""

    def __init__(self, nibbles: torch.Tensor, six: torch.Tensor, dd: torch.Tensor) -> None:
        """nibbles [N, K/2] uint8; six [N·K/256, 12] uint8 and dd [N·K/256, 2] float16 (d,
        dmin): each super-block's factors, in the blocks' order."""
        super().__init__(None, None, None, GROUP)
        rows, cols = nibbles.shape[0], nibbles.shape[1] * 2
        self._packed, self._factors = nibbles, (six, dd)
        if cols % 256 == 0:  # the file's own factors per row (a row of whole super-blocks)
            self.k_scales = (six.reshape(rows, cols // 256 * 12), dd.reshape(rows, cols // 128))

    def half_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scales.half(), self.offsets.half()

    @property
    def scales(self) -> torch.Tensor:
        """The exact float32 d·sc [N, K/32] (derived, not kept)."""
        six, dd = self._factors
        return (dd[:, 0:1].float() * _k_scales(six)[0]).reshape(self.shape[0], -1)

    @property
    def offsets(self) -> torch.Tensor:
        """The exact float32 −dmin·m [N, K/32] (derived, not kept)."""
        six, dd = self._factors
        return (-(dd[:, 1:2].float() * _k_scales(six)[1])).reshape(self.shape[0], -1)


def q4_k_fits_half(six: torch.Tensor, dd: torch.Tensor) -> bool:
    """Whether every Q4_K product d·sc and dmin·m rounds to a finite float16, decided from each
    super-block's largest 6-bit factors without making the products: a float16 times an
    integer ≤ 63 is exact in float32 (17 significant bits), so the largest product of a block
    is |d|·max(sc) exactly, and it is finite in float16 iff below ``HALF_LIMIT`` (a NaN or
    infinite d/dmin fails the comparison, as its products fail ``isfinite``)."""
    sc, m = k_scale_codes(six)  # uint8 [n, 8] each
    top = torch.stack((sc.amax(dim=1), m.amax(dim=1)), dim=1).float()  # [n, 2]
    return bool(((dd.float().abs() * top) < HALF_LIMIT).all())


def _q4_k_nibbles(blocks: torch.Tensor, rows: int, cols: int) -> Q4KGroups | None:
    """Q4_K blocks moved into ``Int4Groups.from_nibbles``' layout without unpacking a code a
    byte: a block's 128 bytes hold sub-blocks 2j (low nibbles) and 2j+1 (high nibbles) of
    bytes 32j..32j+31; the layout wants value i of a sub-block in the low nibble of its byte i
    and value i+16 in the high one. The packed form's per-32 scale d·sc and offset −dmin·m
    round to float16 (as ``pack_q4`` rounds them), derived when asked for (``Q4KGroups``);
    None where one overflows it (the unpacked form with float32 products is kept instead)."""
    six = blocks[:, 4:16].contiguous()
    dd = blocks[:, :4].contiguous().view(torch.float16)
    if not q4_k_fits_half(six, dd):
        return None
    nb = blocks.shape[0]
    qs = blocks[:, 16:].reshape(nb, 4, 2, 16)
    lo, hi = qs[:, :, 0], qs[:, :, 1]
    even = (lo & 0x0F) | ((hi & 0x0F) << 4)
    odd = (lo >> 4) | (hi & 0xF0)
    return Q4KGroups(torch.stack((even, odd), dim=2).reshape(rows, cols // 2), six, dd)


def _q4_k_factors(blocks: torch.Tensor, rows: int, cols: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's own factors per row (``Int4Groups.k_scales``) of the unpacked form: the 6-bit
    scale and min bytes [N, K/256 · 12] and float16 (d, dmin) [N, K/256 · 2]."""
    return (blocks[:, 4:16].contiguous().reshape(rows, cols // 256 * 12),
            blocks[:, :4].contiguous().view(torch.float16).reshape(rows, cols // 128))


def q4_k_super_words(groups: Int4Groups) -> torch.Tensor | None:
    """A Q4_K tensor's own factors (``Int4Groups.k_scales``) per row as the file holds them,
    for a kernel that applies them per 32 (``backends/cuda_moe``'s ``q4k`` layout): int32
    [N, K/256 · 4], a word quad a super-block (16 bytes, one load) — word 0 the float16 ``d``
    (low half) and ``dmin`` (high half), words 1-3 the file's 12 bytes of 6-bit scales and
    mins verbatim (byte i of word 1 + i // 4), not unpacked: ``sc``/``m`` of sub-block j are
    (with a_w = byte j % 4 of word w) a_1 & 63, a_2 & 63 for j < 4, else
    (a_3 & 15) | (a_1 >> 6) << 4 and (a_3 >> 4) | (a_2 >> 6) << 4 (``k_scale_codes``) —
    ``w = float32(d)·sc·q − float32(dmin)·m``, the file's float32 values exactly. None without
    them (Q4_0/Q4_1, a row of part super-blocks, a packed cache's groups)."""
    if groups.k_scales is None:
        return None
    six, dd = groups.k_scales  # uint8 [N, K/256 · 12], float16 [N, K/256 · 2]
    rows = six.shape[0]
    words = torch.cat((dd.reshape(-1, 2).view(torch.uint8), six.reshape(-1, 12)), dim=1)
    return words.view(torch.int32).reshape(rows, -1)  # (the cat's own tensor: contiguous)


def q4_k_word_factors(words: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q4_k_super_words``' quads [N, K/256 · 4] read back as the ``q4k`` kernels read them
    (``backends/cuda_moe_kernels._q4k_factors``: whole-word masks, then sub-block j's byte):
    float32 ``d``, ``dmin`` [N, K/256] and int32 ``sc``, ``m`` [N, K/32] (0..63)."""
    rows = words.shape[0]
    w = words.reshape(rows, -1, 4).int()
    half = lambda bits: bits.to(torch.int16).view(torch.float16).float()  # noqa: E731
    d, dmin = half((w[..., 0] << 16) >> 16), half(w[..., 0] >> 16)
    w1, w2, w3 = w[..., 1:2], w[..., 2:3], w[..., 3:4]
    j = torch.arange(8, device=w.device)
    hi, shift = j >= 4, (j % 4) * 8
    sc = torch.where(hi, (w3 & 0x0F0F0F0F) | ((w1 >> 2) & 0x30303030), w1 & 0x3F3F3F3F)
    m = torch.where(hi, ((w3 >> 4) & 0x0F0F0F0F) | ((w2 >> 2) & 0x30303030), w2 & 0x3F3F3F3F)
    return d, dmin, ((sc >> shift) & 63).reshape(rows, -1), ((m >> shift) & 63).reshape(rows, -1)


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
