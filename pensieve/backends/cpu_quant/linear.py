"""Linear and embedding modules over the compiled q4/q8 kernels (CPU, float32 activations).

Weights are packed once at load into the kernels' layout (see ``source.py``). Scales are kept
as float16 *bit patterns* in int16 buffers, so ``model.to(dtype)`` leaves them alone. Every
call runs the integer kernels: a few rows (decode) the row-tile kernel, from ``GEMM_FROM``
rows (in C; 16 where K > 1024) the panel GEMM of ``gemm_source.py``, which beats dequantising the weight for
PyTorch's float GEMM at every row count measured (1.3–1.6× at 512 rows on 2 Zen 3 cores,
2–3× at 48; ``bench/cpu_kernels.py``). ``dense_from`` keeps that float path for calls of at
least that many rows, off by default. Inputs in another dtype are computed in float32 and
converted back. The modules run on the CPU only (``swap_in`` never puts them elsewhere).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.backends.cpu_quant import bf16_prefill
from pensieve.backends.cpu_quant.build import Kernels
from pensieve.models.quant_linear import Int4Groups

GROUP = 32
DENSE_FROM = sys.maxsize  # rows from which to dequantise for a float GEMM: never (see above)


def kernel_fits(in_features: int, group_size: int = GROUP) -> bool:
    """Whether the kernels take this shape: groups of 32 along K."""
    return group_size == GROUP and in_features % GROUP == 0 and in_features > 0


def pack_q4(kernels: Kernels, groups: Int4Groups | Sequence[Int4Groups],
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int4Groups (or parts to stack along N) → (nibble codes [N, K/2] uint8, scales, mins
    [N, K/32] as float16 bits), in C: no float temporaries, no PyTorch thread pool.

    Q4_0/Q4_1 scales and offsets are float16 in the file, so this is exact for them; Q4_K's
    (d·sc, a float16 times a 6-bit integer) round to float16 (relative error ≤ 2⁻¹¹).
    """
    parts = [groups] if isinstance(groups, Int4Groups) else list(groups)
    k = parts[0].shape[1]
    if any(not kernel_fits(p.shape[1], p.group_size) or p.shape[1] != k for p in parts):
        raise ValueError(f"q4 kernel needs groups of {GROUP} along one K % {GROUP} == 0")
    if all(p.packed_codes is not None for p in parts):  # a GGUF's bytes: already packed
        packed = [p.nibbles for p in parts]  # (once a part: Q4_K's are derived on each call)
        return tuple(_stack_rows([q[i] for q in packed]) for i in range(3))
    n = sum(p.shape[0] for p in parts)
    codes = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, k // GROUP, dtype=torch.int16)
    mins = torch.empty(n, k // GROUP, dtype=torch.int16)
    row = 0
    for p in parts:
        rows = p.codes.shape[0]
        c, s, m = (p.codes.contiguous(), p.scales.float().contiguous(),
                   p.offsets.float().contiguous())
        kernels.pq4_pack(c.data_ptr(), s.data_ptr(), m.data_ptr(), rows, k,
                         codes[row].data_ptr(), scales[row].data_ptr(), mins[row].data_ptr())
        row += rows
    return codes, scales, mins


def _stack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along rows as plain memory copies (float16 → int16 bits): torch's own
    copy runs on its OpenMP pool, which on a busy 2-core machine costs ~6 ms a call. One
    contiguous part is returned as it is (no copy): a packed weight mapped from disk
    (``backends/packed_cache.py``) stays in its page-cache pages."""
    dtype = torch.int16 if parts[0].dtype == torch.float16 else parts[0].dtype
    if len(parts) == 1 and parts[0].is_contiguous():
        return parts[0].view(dtype)
    out = torch.empty(sum(p.shape[0] for p in parts), *parts[0].shape[1:], dtype=dtype)
    at = out.data_ptr()
    for p in parts:
        p = p.contiguous()
        nbytes = p.numel() * p.element_size()
        ctypes.memmove(at, p.data_ptr(), nbytes)
        at += nbytes
    return out


def pack_q8(kernels: Kernels, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [N, K] → (int8 codes [N, K], scales [N, K/32] as float16 bits).

    Symmetric per 32 values (GGUF's Q8_0): scale = max|w| / 127 in float16, code =
    round(w / scale); a weight dequantised from Q8_0 round-trips exactly.
    """
    n, k = weight.shape
    if not kernel_fits(k):
        raise ValueError(f"q8 kernel needs K % {GROUP} == 0, got {k}")
    w = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    codes = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // GROUP, dtype=torch.int16)
    kernels.pq8_pack(w.data_ptr(), n, k, codes.data_ptr(), scales.data_ptr())
    return codes, scales


class _Quantised(nn.Module):
    """Shared plumbing: raw pointers cached per placement, refreshed whenever it changes."""

    kernels: Kernels

    def _apply(self, fn, recurse=True):  # .to()/.cpu()/.float() may move the buffers
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def _refresh(self) -> None:
        raise NotImplementedError

    def _check_cpu(self) -> None:
        if self.codes.device.type != "cpu":
            raise RuntimeError(f"{type(self).__name__} runs on the CPU only")


class _QuantisedLinear(_Quantised):
    """y = x @ W.T (+ b) on a compiled kernel: subclasses set ``_weights`` (pointers of the
    weight's buffers), ``_fn`` (the matmul) and ``_dequant`` in ``_refresh``."""

    KIND = ""
    out_features: int
    in_features: int
    dense_from: int
    bf16_from: int  # rows from which to dequantise to bf16 for one oneDNN matmul (AMX)
    threads: int

    def _init_common(self, kernels: Kernels, bias: torch.Tensor | None, dense_from: int,
                     threads: int | None) -> None:
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.kernels, self.dense_from = kernels, dense_from
        self.bf16_from = bf16_prefill.bf16_from()
        self.threads = threads or torch.get_num_threads()
        self._refresh()

    def _set_pointers(self, weights: tuple[int, ...], fn, dequant) -> None:  # noqa: ANN001 - ctypes functions
        self._bias = None if self.bias is None else self.bias.detach().float().contiguous()
        self._on_cpu = self.codes.device.type == "cpu"
        self._weights, self._fn, self._dequant = weights, fn, dequant
        self._proj = None
        self._args = (*weights, self.out_features, None if self._bias is None else self._bias.data_ptr())

    def _proj_address(self) -> int:
        """Address of this layer's C ``Proj`` (for ``pqx_*`` calls), built once per placement."""
        if self._proj is None:
            from pensieve.backends.cpu_quant.codes_linear import proj_of
            self._proj = proj_of(self)
        return ctypes.addressof(self._proj)

    def dequantize(self) -> torch.Tensor:
        self._check_cpu()
        out = torch.empty(self.out_features, self.in_features)
        self._dequant(*self._weights, self.out_features, self.in_features, out.data_ptr(), self.threads)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the hot path of decode: every line here costs ~1 µs, ~120 calls per token
        if x.dtype is not torch.float32:
            return self(x.float()).to(x.dtype)
        if not self._on_cpu:
            self._check_cpu()
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        m = rows.shape[0]
        if m >= self.dense_from:
            return F.linear(x, self.dequantize(), self._bias)
        if m >= self.bf16_from:
            y = bf16_prefill.linear(self, rows)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        y = torch.empty(m, self.out_features)
        self._fn(rows.data_ptr(), m, self.in_features, *self._args, y.data_ptr(), self.threads)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.KIND} group 32"


class Q4Linear(_QuantisedLinear):
    """y = x @ W.T (+ b) with W as 4-bit group-32 affine codes (w = code·scale + min)."""

    KIND = "q4"

    def __init__(self, kernels: Kernels, groups: Int4Groups | Sequence[Int4Groups],
                 bias: torch.Tensor | None = None, dense_from: int = DENSE_FROM,
                 threads: int | None = None) -> None:
        """``groups``: the weight, or parts of it to stack along N (a fused projection)."""
        super().__init__()
        codes, scales, mins = pack_q4(kernels, groups)
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 2
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self._init_common(kernels, bias, dense_from, threads)

    def _refresh(self) -> None:
        self._set_pointers((self.codes.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr()),
                           self.kernels.lib.pq4_linear, self.kernels.pq4_dequant)


class Q8Linear(_QuantisedLinear):
    """y = x @ W.T (+ b) with W as int8 per 32-block (Q8_0); the output projection's form."""

    KIND = "q8"

    def __init__(self, kernels: Kernels, codes: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, dense_from: int = DENSE_FROM,
                 threads: int | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self._init_common(kernels, bias, dense_from, threads)

    def _refresh(self) -> None:
        self._set_pointers((self.codes.data_ptr(), self.scales.data_ptr()),
                           self.kernels.lib.pq8_linear, self.kernels.pq8_dequant)


class Q8Embedding(_Quantised):
    """Embedding lookup from q8 rows — shares a tied output projection's codes."""

    def __init__(self, kernels: Kernels, codes: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        # an empty float buffer that model.to(dtype) converts: the dtype to hand out
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)
        self.kernels = kernels
        self._refresh()

    def _refresh(self) -> None:
        self._args = (self.codes.data_ptr(), self.scales.data_ptr(), self.num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_cpu()
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.shape[0], self.embedding_dim)
        bad = self.kernels.pq8_rows(*self._args, flat.data_ptr(), flat.shape[0],
                                    self.embedding_dim, out.data_ptr())
        if bad >= 0:
            raise IndexError(f"token id {int(flat[bad])} out of range [0, {self.num_embeddings})")
        out = out.view(*ids.shape, self.embedding_dim)
        return out if self.dtype_probe.dtype == torch.float32 else out.to(self.dtype_probe.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, q8 group 32"
