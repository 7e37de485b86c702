"""A linear layer over row blocks of integer codes, each block in its own kernel format.

GGUF files mix types inside one model, and inside one fused projection: a Q4_K_M file's q and
k may be Q4_K while v is Q6_K, and a 0.5B model (hidden 896, no multiple of 256) falls back to
Q5_0/Q8_0 on many tensors. Every such weight stays in its codes (``loaders/int4_codes.py``) and
runs on the kernel of its format (``source.py``):

* ``F_Q4`` — 4-bit nibbles, float16 scale and min per 32 (Q4_0, Q4_1, Q4_K);
* ``F_Q8`` — int8 codes, float16 scale per 32 and optionally a float16 min per 32 (Q8_0, Q5_0,
  Q5_1, Q5_K, IQ4_NL, IQ4_XS);
* ``F_Q8G16`` — int8 codes, float16 scale per 16 (group-16 codes other than Q6_K's);
* ``F_Q6`` — Q6_K's 6-bit codes packed 24 bytes per 32 (``source.py``: ``q6_unpack``), float16
  scale per 16: 7 bits a weight against 9 as int8 codes (the file's own Q6_K is 6.56).

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

F_Q4, F_Q8, F_Q8G16, F_Q6 = 0, 1, 2, 3
MAX_PARTS = 3
Q6_BLOCK_BYTES = 24  # F_Q6 bytes per 32 codes


@dataclass(frozen=True)
class Q6Codes:
    """Q6_K codes already in the ``F_Q6`` layout (``packed`` [N, K/32 · 24] uint8) with their
    float16 scales per 16 [N, K/16]: a ``CodesLinear`` block as the packed cache stores it."""

    packed: torch.Tensor
    scales: torch.Tensor
    ggml_type: str = "Q6_K"
    group_size: int = 16
    offsets: None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] // Q6_BLOCK_BYTES * GROUP


class Part(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64), ("fmt", ctypes.c_int64)]


class Proj(ctypes.Structure):
    """Mirror of the C ``Proj``: row blocks (``part``), their count, K and the total N."""

    _fields_ = [("part", Part * MAX_PARTS), ("n_parts", ctypes.c_int64), ("K", ctypes.c_int64),
                ("N", ctypes.c_int64)]


Codes = Int4Groups | Int8Groups | Q6Codes


def codes_format(groups: Codes) -> tuple[int, bool] | None:
    """(kernel format, has mins) of one weight, or None where no kernel takes it."""
    k = groups.shape[1]
    if isinstance(groups, Int4Groups):
        return (F_Q4, True) if kernel_fits(k, groups.group_size) else None
    if not kernel_fits(k):
        return None
    if isinstance(groups, Q6Codes) or (groups.ggml_type == "Q6_K" and groups.group_size == 16
                                       and groups.offsets is None):
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
    """Parts of one format stacked along N: (format, [codes, scales bits, mins bits or None])."""
    fmt, has_min = codes_format(parts[0])
    if fmt == F_Q4:
        return fmt, list(pack_q4(kernels, parts))
    bits = lambda ts: _stack_rows([t.view(torch.int16) for t in ts])  # noqa: E731
    if fmt == F_Q6:
        return fmt, [_stack_rows([_q6_packed(kernels, p) for p in parts]),
                     bits([p.scales.to(torch.float16) for p in parts]), None]
    codes = _stack_rows([p.codes for p in parts])
    scales = bits([p.scales.to(torch.float16) for p in parts])
    mins = bits([p.offsets.to(torch.float16) for p in parts]) if has_min else None
    return fmt, [codes, scales, mins]


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
        parts = [parts] if isinstance(parts, (Int4Groups, Int8Groups, Q6Codes)) else list(parts)
        if not blocks_fit(parts):
            raise ValueError("no kernel format for these parts (K % 32, group 16/32, ≤ 3 formats)")
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)
        keys = [codes_format(p) for p in parts]
        self.formats: list[int] = []
        self.block_rows: list[int] = []
        for i, (start, end) in enumerate(_runs(keys)):
            fmt, (codes, scales, mins) = _pack_block(kernels, parts[start:end])
            self.formats.append(fmt)
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
        for i, (fmt, rows) in enumerate(zip(self.formats, self.block_rows)):
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
                f"{'+'.join(self.kinds)} as {self.formats}")


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
