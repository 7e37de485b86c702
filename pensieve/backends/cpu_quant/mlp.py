"""A Llama (SwiGLU) MLP whose two projections are on the compiled kernels: one call per step.

``down(silu(gate) * up)`` with ``[gate | up] = gate_up(x)`` is what ``models/llama.MLP``
computes; as four PyTorch ops plus two kernel calls it spends more time in dispatch than in
arithmetic at one token. This module keeps the two children (``Q4Linear``, ``Q8Linear`` or
``CodesLinear``, in any mix of code formats; same parameter names, same state dict) and, below
their ``dense_from`` rows (by default always), runs the whole MLP in C: both matmuls, and
SiLU·up in between (float32, relative error ~1e-7).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.backends.cpu_quant import bf16_prefill
from pensieve.backends.cpu_quant.codes_linear import proj_of


class Q4MLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        if gate_up_proj.out_features != 2 * down_proj.in_features or (
            gate_up_proj.in_features != down_proj.out_features
        ):
            raise ValueError("gate_up_proj must be [2·I, H] and down_proj [H, I]")
        if proj_of(gate_up_proj) is None or proj_of(down_proj) is None:
            raise ValueError("both projections must run on the compiled kernels")
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.hidden, self.inner = down_proj.out_features, down_proj.in_features
        self._fn = gate_up_proj.kernels.lib.pqx_mlp
        self._refresh()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - children's buffers may move
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def _refresh(self) -> None:
        self._projs = (proj_of(self.gate_up_proj), proj_of(self.down_proj))
        self._addresses = tuple(ctypes.addressof(p) for p in self._projs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu, down = self.gate_up_proj, self.down_proj
        rows = x if x.dim() == 2 else x.reshape(-1, self.hidden)
        m = rows.shape[0]
        fused = (x.dtype is torch.float32 and gu._on_cpu and down._on_cpu
                 and m < min(gu.dense_from, down.dense_from))
        if fused and m >= max(gu.bf16_from, down.bf16_from):  # prefill on AMX: bf16 matmuls
            y = bf16_prefill.mlp(gu, down, rows if rows.is_contiguous() else rows.contiguous())
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.hidden)
        if not fused:
            gate, up = gu(x).chunk(2, dim=-1)
            return down(F.silu(gate) * up)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        y = torch.empty(m, self.hidden)
        self._fn(rows.data_ptr(), m, *self._addresses, y.data_ptr(), gu.threads)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.hidden)
