"""A linear layer over row blocks of integer codes, each block in its own kernel format.

GGUF files mix types inside one model, and inside one fused projection: a Q4_K_M file's q and
k may be Q4_K while v is Q6_K, and a 0.5B model (hidden 896, no multiple of 256) falls back to
Q5_0/Q8_0 on many tensors. Every such weight stays in its codes (``loaders/int4_codes.py``) and
runs on the kernel of its format (``source.py``):

* ``F_Q4`` — 4-bit nibbles, float16 scale and min per 32 (Q4_0, Q4_1, Q4_K without its
  super-block scales); a Q4_K weight that brings them (``super_scaled``) runs as ``F_Q4K``: the
  same nibbles with the file's own 6-bit scales and mins (12 bytes a 256) and float16 d, dmin
  — 144 bytes a 256 as in the file, against 160 with float16 per 32, and the file's weights
  exactly (d·sc is exact in float32; float16 per 32 rounded it);
* ``F_Q8`` — int8 codes, float16 scale per 32 and optionally a float16 min per 32 (Q8_0, Q5_0,
  Q5_1, Q5_K, IQ4_NL, IQ4_XS);
* ``F_Q8G16`` — int8 codes, float16 scale per 16 (group-16 codes other than Q6_K's, and Q6_K
  without its super-block factors);
* ``F_Q6`` — Q6_K's 6-bit codes packed 24 bytes per 32 (``source.py``: ``q6_unpack``) with the
  file's float16 d and 16 int8 sub-scales per 256 (18 bytes): 210 bytes a 256, the file's own
  size, against 224 with a float16 scale per 16.

``formats`` names each block's code format (``F_Q4`` for ``F_Q4K`` too); ``part_formats`` is
what the C side is told (``F_Q4K`` where the block keeps Q4_K's scales).

A ``Proj`` (mirrored from C) lists up to three row blocks; ``CodesLinear`` holds one, and
``proj_of`` gives one for ``Q4Linear``/``Q8Linear`` too, so the fused MLP and the one-call
decoder take any of them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pensieve.backends.cpu_quant import bf16_prefill
from pensieve.backends.cpu_quant.build import Kernels
from pensieve.backends.cpu_quant.linear import (
    DENSE_FROM, GROUP, Q4Linear, Q8Linear, _QuantisedLinear, _stack_rows, kernel_fits, pack_q4,
)
from pensieve.loaders.int4_codes import Int8Groups
from pensieve.models.quant_linear import Int4Groups

F_Q4, F_Q8, F_Q8G16, F_Q6, F_Q4K = 0, 1, 2, 3, 4
MAX_PARTS = 3
Q6_BLOCK_BYTES = 24  # F_Q6 bytes per 32 codes
Q6_SUPER_BYTES = 18  # F_Q6 scale bytes per 256 codes: float16 d, 16 int8 sub-scales
Q4K_SUPER_BYTES = 12  # F_Q4K scale bytes per 256 codes (the file's 6-bit scales and mins)
SUPER = 256


@dataclass(frozen=True)
class Q6Codes:
    """Q6_K codes already in the ``F_Q6`` layout (``packed`` [N, K/32 · 24] uint8) with their
    super-block scales (``scales`` [N, K/256 · 18] uint8: float16 d, 16 int8 sub-scales): a
    ``CodesLinear`` block as the packed cache stores it."""

    packed: torch.Tensor
    scales: torch.Tensor
    ggml_type: str = "Q6_K"
    group_size: int = 16
    offsets: None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] // Q6_BLOCK_BYTES * GROUP


@dataclass(frozen=True)
class Q4KCodes:
    """Q4_K codes in the ``F_Q4K`` layout as the packed cache stores them: ``nibbles`` [N, K/2]
    uint8 (the q4 order), ``scales`` [N, K/256 · 12] uint8 (the file's 6-bit scales and mins),
    ``dmin`` [N, K/256 · 2] float16 (d, dmin of each super-block)."""

    nibbles: torch.Tensor
    scales: torch.Tensor
    dmin: torch.Tensor
    ggml_type: str = "Q4_K"
    group_size: int = 32

    @property
    def shape(self) -> tuple[int, int]:
        return self.nibbles.shape[0], self.nibbles.shape[1] * 2


def super_scaled(part: object) -> bool:
    """Whether a part keeps its file's super-block scales (Q4_K's, Q6_K's) for the kernels."""
    if isinstance(part, (Q4KCodes, Q6Codes)):
        return True
    k_scales = getattr(part, "k_scales", None)
    return k_scales is not None and part.shape[1] % SUPER == 0 and (
        isinstance(part, Int4Groups) and part.packed_codes is not None
        or isinstance(part, Int8Groups))


class Part(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64), ("fmt", ctypes.c_int64)]


class Proj(ctypes.Structure):
    """Mirror of the C ``Proj``: row blocks (``part``), their count, K and the total N."""

    _fields_ = [("part", Part * MAX_PARTS), ("n_parts", ctypes.c_int64), ("K", ctypes.c_int64),
                ("N", ctypes.c_int64)]


Codes = Int4Groups | Int8Groups | Q6Codes | Q4KCodes


def codes_format(groups: Codes) -> tuple[int, bool] | None:
    """(kernel format, has mins) of one weight, or None where no kernel takes it."""
    k = groups.shape[1]
    if isinstance(groups, (Int4Groups, Q4KCodes)):
        return (F_Q4, True) if kernel_fits(k, groups.group_size) else None
    if not kernel_fits(k):
        return None
    if isinstance(groups, Q6Codes) or (groups.ggml_type == "Q6_K" and groups.group_size == 16
                                       and groups.offsets is None and super_scaled(groups)):
        return F_Q6, False  # codes in -32..31 by the type's construction
    if groups.group_size == 16 and groups.offsets is None:
        return F_Q8G16, False
    if groups.group_size == GROUP:
        return F_Q8, groups.offsets is not None
    return None


def blocks_fit(parts: Sequence[Codes]) -> bool:
    """Whether ``CodesLinear`` takes these parts: every one a kernel format, one K, and at most
    ``MAX_PARTS`` runs of differing formats."""
    keys = [codes_format(p) for p in parts]
    return (all(keys) and len({p.shape[1] for p in parts}) == 1
            and len(_runs(keys)) <= MAX_PARTS)


def _runs(keys: Sequence[object]) -> list[tuple[int, int]]:
    """[start, end) index runs of equal consecutive keys."""
    runs: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if runs and keys[runs[-1][0]] == key:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _pack_block(kernels: Kernels, parts: Sequence[Codes]) -> tuple[int, list[torch.Tensor | None]]:
    """Parts of one format stacked along N: (C format, [codes, scales, mins or None]) —
    float16 scales and mins as int16 bits, super-block scales as bytes (``F_Q4K``, ``F_Q6``)."""
    fmt, has_min = codes_format(parts[0])
    bits = lambda ts: _stack_rows([t.view(torch.int16) for t in ts])  # noqa: E731
    if fmt == F_Q4 and all(super_scaled(p) for p in parts):
        return F_Q4K, [_stack_rows([_q4k_parts(p)[i] for p in parts]) for i in range(3)]
    if fmt == F_Q4:
        return fmt, list(pack_q4(kernels, [_int4(p) for p in parts]))
    if fmt == F_Q6:
        return fmt, [_stack_rows([_q6_packed(kernels, p) for p in parts]),
                     _stack_rows([_q6_scales(p) for p in parts]), None]
    codes = _stack_rows([p.codes for p in parts])
    scales = bits([p.scales.to(torch.float16) for p in parts])
    mins = bits([p.offsets.to(torch.float16) for p in parts]) if has_min else None
    return fmt, [codes, scales, mins]


def _q4k_parts(part: Int4Groups | Q4KCodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nibbles, 6-bit scale bytes, d/dmin as int16 bits) of a super-scaled Q4_K part."""
    if isinstance(part, Q4KCodes):
        return part.nibbles, part.scales, part.dmin.view(torch.int16)
    six, dmin = part.k_scales
    return part.packed_codes, six, dmin.view(torch.int16)


def _int4(part: Int4Groups | Q4KCodes) -> Int4Groups:
    if isinstance(part, Int4Groups):
        return part
    raise ValueError("Q4_K codes with super-block scales stack only with their own kind")


def _q6_scales(part: Int8Groups | Q6Codes) -> torch.Tensor:
    """A Q6_K part's super-block scales in the ``F_Q6`` layout: [N, K/256 · 18] uint8."""
    if isinstance(part, Q6Codes):
        return part.scales
    sub, d = part.k_scales  # int8 [N, K/16], float16 [N, K/256]
    n = sub.shape[0]
    return torch.cat((d.contiguous().view(torch.uint8).view(n, -1, 2),
                      sub.contiguous().view(torch.uint8).view(n, -1, 16)), dim=2).view(n, -1)


def _q6_packed(kernels: Kernels, part: Int8Groups | Q6Codes) -> torch.Tensor:
    """Q6_K codes in the ``F_Q6`` layout (packed in C; as they are for ``Q6Codes``)."""
    if isinstance(part, Q6Codes):
        return part.packed
    n, k = part.shape
    codes = part.codes.contiguous()
    out = torch.empty(n, k // GROUP * Q6_BLOCK_BYTES, dtype=torch.uint8)
    kernels.pq6_pack(codes.data_ptr(), n, k, out.data_ptr())
    return out


class CodesLinear(_QuantisedLinear):
    """y = x @ W.T (+ b) with W as up to three row blocks of codes, each block in its own format
    (consecutive parts of one format share a block)."""

    KIND = "codes"

    def __init__(self, kernels: Kernels, parts: Codes | Sequence[Codes],
                 bias: torch.Tensor | None = None, dense_from: int = DENSE_FROM,
                 threads: int | None = None) -> None:
        super().__init__()
        parts = ([parts] if isinstance(parts, (Int4Groups, Int8Groups, Q6Codes, Q4KCodes))
                 else list(parts))
        if not blocks_fit(parts):
            raise ValueError("no kernel format for these parts (K % 32, group 16/32, ≤ 3 formats)")
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)
        keys = [codes_format(p) for p in parts]
        self.formats: list[int] = []  # code formats (F_Q4 for F_Q4K)
        self.part_formats: list[int] = []  # the C side's (F_Q4K where Q4_K keeps its scales)
        self.block_rows: list[int] = []
        for i, (start, end) in enumerate(_runs(keys)):
            fmt, (codes, scales, mins) = _pack_block(kernels, parts[start:end])
            self.formats.append(F_Q4 if fmt == F_Q4K else fmt)
            self.part_formats.append(fmt)
            self.block_rows.append(codes.shape[0])
            self.register_buffer(f"codes{i}", codes)
            self.register_buffer(f"scales{i}", scales)
            self.register_buffer(f"mins{i}", mins)
        self.codes = self.codes0  # the device check of _Quantised
        self.kinds = sorted({getattr(p, "ggml_type", "") or "q4" for p in parts})
        self._init_common(kernels, bias, dense_from, threads)

    def _refresh(self) -> None:
        self.codes = self.codes0
        self._bias = None if self.bias is None else self.bias.detach().float().contiguous()
        self._on_cpu = self.codes0.device.type == "cpu"
        self.proj = Proj(n_parts=len(self.formats), K=self.in_features, N=self.out_features)
        row = 0
        for i, (fmt, rows) in enumerate(zip(self.part_formats, self.block_rows)):
            mins = getattr(self, f"mins{i}")
            bias = None if self._bias is None else self._bias.data_ptr() + 4 * row
            self.proj.part[i] = Part(getattr(self, f"codes{i}").data_ptr(),
                                     getattr(self, f"scales{i}").data_ptr(),
                                     None if mins is None else mins.data_ptr(), bias, rows, fmt)
            row += rows
        self._address = ctypes.addressof(self.proj)
        self._fn = self.kernels.lib.pqx_linear

    def _proj_address(self) -> int:
        return self._address

    def dequantize(self) -> torch.Tensor:
        self._check_cpu()
        out = torch.empty(self.out_features, self.in_features)
        self.kernels.pqx_dequant(self._address, out.data_ptr(), self.threads)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32:
            return self(x.float()).to(x.dtype)
        if not self._on_cpu:
            self._check_cpu()
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        m = rows.shape[0]
        if m >= self.dense_from:
            return nn.functional.linear(x, self.dequantize(), self._bias)
        if m >= self.bf16_from:
            y = bf16_prefill.linear(self, rows)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        y = torch.empty(m, self.out_features)
        self._fn(rows.data_ptr(), m, self._address, y.data_ptr(), self.threads, 0)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{'+'.join(self.kinds)} as {self.part_formats}")


def proj_of(layer: nn.Module) -> Proj | None:
    """The C projection of a ``CodesLinear``, ``Q4Linear`` or ``Q8Linear`` (CPU), else None.
    Valid while the layer's buffers stay where they are (rebuild after ``.to()``)."""
    if isinstance(layer, CodesLinear):
        return layer.proj
    if not isinstance(layer, (Q4Linear, Q8Linear)):
        return None
    bias = None if layer._bias is None else layer._bias.data_ptr()
    mins = layer.mins.data_ptr() if isinstance(layer, Q4Linear) else None
    fmt = F_Q4 if isinstance(layer, Q4Linear) else F_Q8
    proj = Proj(n_parts=1, K=layer.in_features, N=layer.out_features)
    proj.part[0] = Part(layer.codes.data_ptr(), layer.scales.data_ptr(), mins, bias,
                        layer.out_features, fmt)
    return proj


class CodesEmbedding(nn.Module):
    """Embedding lookup from one block of codes in any kernel format (a GGUF's Q4_K or Q6_K token
    embedding kept as codes: a 151936×1536 table is 130-190 MB instead of 933 MB in float32).

    Built from a one-block ``CodesLinear``, whose buffers it shares: a tied output layer and
    its embedding hold one copy.
    """

    def __init__(self, table: CodesLinear) -> None:
        super().__init__()
        if len(table.formats) != 1:
            raise ValueError("an embedding table is one block of codes")
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        # an empty float buffer that model.to(dtype) converts: the dtype to hand out
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.table._check_cpu()
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.shape[0], self.embedding_dim)
        bad = self.table.kernels.pqx_rows(self.table._address, flat.data_ptr(), flat.shape[0],
                                          out.data_ptr())
        if bad >= 0:
            raise IndexError(f"token id {int(flat[bad])} out of range [0, {self.num_embeddings})")
        out = out.view(*ids.shape, self.embedding_dim)
        return out if self.dtype_probe.dtype == torch.float32 else out.to(self.dtype_probe.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {'+'.join(self.table.kinds)} codes"
