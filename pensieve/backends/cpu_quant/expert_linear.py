"""Mixture-of-experts projections kept as their GGUF codes: each routed expert's slice of one
stacked code buffer per projection, run on the compiled kernels (only its bytes are read).

A GGUF stores an MoE layer's experts as 3-D tensors (``ffn_{gate,up,down}_exps``: [E, N, K],
expert ``e``'s rows at ``e·N``). ``backends/quantize.py`` builds each projection as one
``CodesLinear``/``Q4Linear`` over all experts' rows — ``gate_up_proj`` holds every expert's gate
rows [E·I, H] then every expert's up rows [E·I, H], ``down_proj`` [E·H, I] — exactly as for a
dense weight (same packing, same packed-cache entries), and ``SlicedExperts`` takes the place of
``models.moe.Experts`` over those two children. Per expert it keeps a C ``Proj`` whose parts
point into the stacked buffers at that expert's rows (pointer offsets, no copy): gate_up as two
parts (its gate rows, its up rows), down as one. A forward groups the (token, pick) rows by
expert as ``Experts`` does and runs each expert with tokens in one ``pqx_mlp`` call: the row
tiles for a few rows, the panel GEMM from ``GEMM_FROM`` rows (the C side picks), SiLU·up in
between. Other activations run the two projections with PyTorch's activation between them.
A decode step's one token runs all its picks in one ``pqx_moe_rows`` call instead (SiLU:
two fork/joins of the thread pool a layer instead of three a pick, bitwise the same outputs);
``PENSIEVE_CPU_MOE_ONE_CALL=0`` keeps one ``pqx_mlp`` call a pick (A/B benches).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import torch
from torch import nn

from pensieve.backends.cpu_quant.codes_linear import F_Q4, CodesLinear, Part, Proj
from pensieve.backends.cpu_quant.linear import Q4Linear

Block = tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]  # fmt, rows, codes, scales, mins


def code_blocks(layer: nn.Module) -> list[Block]:
    """A kernel layer's row blocks in order: (format, rows, codes, scales, mins), each buffer
    [rows, …] with one row per output row."""
    if isinstance(layer, CodesLinear):
        return [(fmt, rows, getattr(layer, f"codes{i}"), getattr(layer, f"scales{i}"),
                 getattr(layer, f"mins{i}"))
                for i, (fmt, rows) in enumerate(zip(layer.part_formats, layer.block_rows))]
    if isinstance(layer, Q4Linear):
        return [(F_Q4, layer.out_features, layer.codes, layer.scales, layer.mins)]
    raise TypeError(f"{type(layer).__name__} is not a layer of codes")


def _row_at(t: torch.Tensor, row: int) -> int:
    return t.data_ptr() + row * t.stride(0) * t.element_size()


def row_part(blocks: list[Block], row: int, rows: int) -> Part:
    """The C ``Part`` of output rows [row, row + rows) of a layer (inside one of its blocks)."""
    start = 0
    for fmt, n, codes, scales, mins in blocks:
        if start <= row and row + rows <= start + n:
            at = row - start
            return Part(_row_at(codes, at), _row_at(scales, at),
                        None if mins is None else _row_at(mins, at), None, rows, fmt)
        start += n
    raise ValueError(f"rows [{row}, {row + rows}) cross a block boundary")


class SlicedExperts(nn.Module):
    """``models.moe.Experts`` over stacked code layers: ``gate_up_proj`` [2·E·I, H] (all gate
    rows, then all up rows) and ``down_proj`` [E·H, I], each a ``CodesLinear`` or ``Q4Linear``
    on the CPU."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, num_experts: int,
                 act: Callable[[torch.Tensor], torch.Tensor], silu: bool) -> None:
        super().__init__()
        e = num_experts
        if down_proj.out_features % e or gate_up_proj.out_features != 2 * e * down_proj.in_features:
            raise ValueError("gate_up_proj must be [2·E·I, H] and down_proj [E·H, I]")
        if gate_up_proj.in_features != down_proj.out_features // e:
            raise ValueError("gate_up_proj's K must be down_proj's rows per expert")
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.num_experts, self.silu, self.act = e, silu, act
        self.hidden, self.inner = gate_up_proj.in_features, down_proj.in_features
        self.kernels = gate_up_proj.kernels
        self.one_call = silu and os.environ.get("PENSIEVE_CPU_MOE_ONE_CALL", "1") != "0"
        self._refresh()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - the children's buffers may move
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def _refresh(self) -> None:
        e, h, i = self.num_experts, self.hidden, self.inner
        gu, down = code_blocks(self.gate_up_proj), code_blocks(self.down_proj)
        self._gu, self._down = [], []
        for x in range(e):
            p = Proj(n_parts=2, K=h, N=2 * i)
            p.part[0], p.part[1] = row_part(gu, x * i, i), row_part(gu, e * i + x * i, i)
            d = Proj(n_parts=1, K=i, N=h)
            d.part[0] = row_part(down, x * h, h)
            self._gu.append(p)
            self._down.append(d)
        self._gu_at = [ctypes.addressof(p) for p in self._gu]
        self._down_at = [ctypes.addressof(p) for p in self._down]
        # pqx_moe_rows' tables of every expert's Proj (it indexes them by the picked ids)
        self._gu_table = (ctypes.c_void_p * e)(*self._gu_at)
        self._down_table = (ctypes.c_void_p * e)(*self._down_at)
        self._on_cpu = self.gate_up_proj.codes.device.type == "cpu"

    def expert_mlp(self, e: int, rows: torch.Tensor, out: torch.Tensor) -> None:
        """out[n, H] = expert ``e``'s MLP of rows [n, H] (float32, contiguous; out may be a
        contiguous row range of a larger tensor)."""
        n, threads = rows.shape[0], self.gate_up_proj.threads
        if self.silu:
            self.kernels.pqx_mlp(rows.data_ptr(), n, self._gu_at[e], self._down_at[e],
                                 out.data_ptr(), threads)
            return
        h = torch.empty(n, 2 * self.inner)
        self.kernels.pqx_linear(rows.data_ptr(), n, self._gu_at[e], h.data_ptr(), threads, 0)
        gate, up = h.chunk(2, dim=-1)
        a = (self.act(gate) * up).contiguous()
        self.kernels.pqx_linear(a.data_ptr(), n, self._down_at[e], out.data_ptr(), threads, 0)

    def picks_mlp(self, row: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
        """out[j] = expert ids[j]'s SwiGLU MLP of the one row [1, H] (float32, contiguous;
        out [k, H] contiguous): all k picks in one ``pqx_moe_rows`` call, bitwise one
        ``pqx_mlp`` call a pick."""
        ids = ids.to(torch.int64).contiguous()
        bad = self.kernels.pqx_moe_rows(
            row.data_ptr(), ids.data_ptr(), ids.numel(), ctypes.addressof(self._gu_table),
            ctypes.addressof(self._down_table), self.num_experts, out.data_ptr(),
            self.gate_up_proj.threads)
        if bad >= 0:
            raise IndexError(f"expert id {ids[bad].item()} outside [0, {self.num_experts})")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/ids [T, k] → Σ_picks weight · expert(x), [T, H] (as ``Experts``:
        rows grouped by expert for the kernels; contributions summed per token in pick
        order)."""
        if not self._on_cpu:
            raise RuntimeError("SlicedExperts runs on the CPU only")
        if x.dtype is not torch.float32:
            return self(x.float(), weights.float(), ids).to(x.dtype)
        k = ids.shape[1]
        if x.shape[0] == 1:  # one token (a decode step): its picks in pick order, no sorting —
            # the same kernel calls and sum as below (each expert there gets this one row), the
            # grouping's ~10 torch ops a layer gone (a 24-layer MoE's greedy decode on 2 cores:
            # 29.2 → 29.6 tok/s, noise level; its 34 ms step is the kernel calls, not torch).
            # With SiLU all picks run in one pqx_moe_rows call (two pool fork/joins a layer, not
            # three a pick; the same bits): the same model 29.2 → 30.7 tok/s (medians of 3, quiet)
            row = x.contiguous()
            picks = torch.empty(k, x.shape[1])
            if self.one_call:
                self.picks_mlp(row, ids[0], picks)
            else:
                for j, e in enumerate(ids[0].tolist()):
                    self.expert_mlp(e, row, picks[j:j + 1])
            return (picks.unsqueeze(0) * weights.to(picks.dtype).unsqueeze(-1)).sum(dim=1)
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        tokens = order // k
        rows = x[tokens].contiguous()
        out = torch.empty_like(rows)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n:
                self.expert_mlp(e, rows[start:start + n], out[start:start + n])
                start += n
        # back to (token, pick) order and summed per token: no index_add_, whose CPU kernel
        # opens a parallel region even for one row (58 ms a call measured on the loaded 2-core
        # VM: the whole decode step's cost)
        picks = out[order.argsort()].view(x.shape[0], k, -1)
        return (picks * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, inner={self.inner}, codes sliced"
