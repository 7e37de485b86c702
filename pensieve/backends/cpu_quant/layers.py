"""A decoder layer's glue on the CPU over the compiled kernels (``layer_source.py``).

``CpuRMSNorm`` replaces ``models.llama.RMSNorm`` (same ``weight``); ``CpuAttention`` makes each
step's ``ForwardContext.attention``: RoPE and the KV store in one call for every token, one
call for all one-token (decode) sequences, and for longer chunks the compiled prefill attention
(``prefill_attention_source.py``: AVX-512, head size 64 or 128; 2-4× SDPA on the 1.5B's
shapes) or else PyTorch's SDPA. Anything else — another dtype, an odd head size — takes the
PyTorch path unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.backends.cpu_quant.build import Kernels
from pensieve.models.forward_context import ForwardContext, SequenceSlice, attend_cached, paged_attention
from pensieve.models.llama import RMSNorm


class CpuRMSNorm(nn.Module):
    """``RMSNorm`` in one kernel call (PyTorch's decomposes into ~8 ops, ~50 µs at one row)."""

    def __init__(self, kernels: Kernels, norm: RMSNorm) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        self._fn = kernels.lib.pq_rmsnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype is not torch.float32 or w.dtype is not torch.float32 or x.device.type != "cpu":
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        h = x.shape[-1]
        rows = x if x.dim() == 2 and x.stride(1) == 1 else x.reshape(-1, h).contiguous()
        y = torch.empty(rows.shape[0], h)
        self._fn(rows.data_ptr(), rows.stride(0), rows.shape[0], h, w.data_ptr(), self.eps,
                 y.data_ptr())
        return y if x.dim() == 2 else y.view(x.shape)


def swap_norms(model: nn.Module, kernels: Kernels) -> int:
    """Replace every ``RMSNorm`` of ``model`` by ``CpuRMSNorm``; how many."""
    targets = [name for name, m in model.named_modules() if type(m) is RMSNorm]
    for name in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, CpuRMSNorm(kernels, model.get_submodule(name)))
    return len(targets)


class CpuAttention:
    """Per engine: ``step(sequences)`` → the step's attention backend (or None for PyTorch's)."""

    def __init__(self, kernels: Kernels, threads: int | None = None) -> None:
        self.kernels = kernels
        self.threads = threads or torch.get_num_threads()

    @staticmethod
    def fits(caches: list[torch.Tensor], dtype: torch.dtype) -> bool:
        """float32 model, float32 or float16 caches, head size a multiple of 16 (≤ 1024)."""
        c = caches[0]
        return (dtype == torch.float32 and c.dtype in (torch.float32, torch.float16)
                and c.device.type == "cpu" and c.shape[-1] % 16 == 0 and c.shape[-1] <= 1024
                and c.is_contiguous())

    def release_scratch(self) -> None:
        """Hand back the kernels' per-call buffers on this thread (after a prefill: sized by
        its chunk, ~64 MB at 512 rows of a 1.5B model, they would stay resident) and the bf16
        prefill path's scratch (~50 MB there)."""
        from pensieve.backends.cpu_quant import bf16_prefill

        self.kernels.lib.pq_release_scratch()
        bf16_prefill.release()

    def step(self, sequences: list[SequenceSlice]) -> CpuAttentionStep:
        decode = [s for s in sequences if s.query_len == 1]
        longer = [s for s in sequences if s.query_len > 1]
        offsets, at = [], 0
        for s in decode:
            offsets.append(at)
            at += s.block_table.shape[0]
        tables = (torch.cat([s.block_table for s in decode]) if len(decode) > 1
                  else decode[0].block_table if decode else torch.empty(0, dtype=torch.long))
        meta = torch.tensor([[s.query_start for s in decode], [s.context_len for s in decode],
                             offsets], dtype=torch.long).reshape(3, -1)
        return CpuAttentionStep(self, len(decode), meta, tables.contiguous(), longer)


@dataclass
class CpuAttentionStep:
    """The ``AttentionBackend`` of one step (see ``ForwardContext.attention``)."""

    owner: CpuAttention
    num_decode: int
    meta: torch.Tensor  # [3, num_decode]: query row, context length, offset into tables
    tables: torch.Tensor  # the decode sequences' block tables, concatenated
    longer: list[SequenceSlice]  # sequences with more than one new token: SDPA

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: ForwardContext,
                 cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        t, hq, d = q.shape
        hk = k.shape[1]
        if cos_sin is None or q.dtype is not torch.float32 or not all(
                x.stride(2) == 1 and x.stride(1) == d for x in (q, k, v)):
            return paged_attention(layer, q, k, v, replace(ctx, attention=None), cos_sin)
        lib = self.owner.kernels.lib
        k_cache, v_cache = ctx.k_caches[layer], ctx.v_caches[layer]
        half = int(k_cache.dtype == torch.float16)
        cos, sin = (c.contiguous() for c in cos_sin)
        lib.pq_rope_store(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(),
                          v.stride(0), t, hq, hk, d, cos.data_ptr(), sin.data_ptr(),
                          ctx.slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                          half)
        out = torch.empty(t, hq, d)
        if self.num_decode:
            m = self.meta
            lib.pq_paged_decode(q.data_ptr(), q.stride(0), self.num_decode, m[0].data_ptr(),
                                m[1].data_ptr(), m[2].data_ptr(), self.tables.data_ptr(), hq, hk,
                                d, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1],
                                d ** -0.5, out.data_ptr(), hq * d, self.owner.threads, half)
        for seq in self.longer:  # the compiled prefill attention where it applies, else SDPA
            table = seq.block_table
            if table.dtype is not torch.long or not table.is_contiguous() or lib.pq_prefill_attention(
                    q[seq.query_start].data_ptr(), q.stride(0), seq.query_len, seq.context_len,
                    table.data_ptr(), k_cache.shape[1], hq, hk, d, k_cache.data_ptr(),
                    v_cache.data_ptr(), d ** -0.5, out[seq.query_start].data_ptr(), hq * d,
                    self.owner.threads, half) != 0:
                attend_cached(q, k_cache, v_cache, seq, out)
        return out
