"""One step's chunks → the flat CUDA batch: inputs plus the attention's batched metadata.

Used for the steps that CUDA graphs do not take (prefill chunks, mixed batches, batches over
the largest graph). Decode tokens go first in the flat batch, prefill chunks after, as
``CudaPagedAttention`` expects; logits rows follow the chunks' own order. All integers are
packed into two host arrays (int64 and int32) and uploaded in two copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pensieve.backends.cuda_attention import (
    CudaPagedAttention,
    DecodeBatch,
    PrefillBatch,
    choose_num_splits,
)
from pensieve.engine.request import Request
from pensieve.engine.scheduler import ScheduledChunk


@dataclass(frozen=True)
class CudaBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [S] int64
    attention: CudaPagedAttention


def token_at(req: Request, position: int) -> int:
    """The token at ``position`` without building ``all_ids`` (a copy of the whole prompt)."""
    n = len(req.prompt_ids)
    return req.prompt_ids[position] if position < n else req.output_ids[position - n]


def block_slots(block_ids: Sequence[int], block_size: int, length: int) -> np.ndarray:
    """Cache slots of positions ``0..length-1`` of a sequence with these blocks."""
    blocks = np.asarray(block_ids[: -(-length // block_size)], dtype=np.int64)
    return (blocks[:, None] * block_size + np.arange(block_size)).reshape(-1)[:length]


class CudaBatchBuilder:
    def __init__(self, block_size: int, kv_heads: int, device: torch.device) -> None:
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.device = device
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def build(self, chunks: list[ScheduledChunk]) -> CudaBatch:
        bs = self.block_size
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = [c for c in chunks if c.num_tokens > 1]
        last_row: dict[int, int] = {}
        ids, pos, slots = [], [], []
        ctx_lens, tables = [], []
        for c in decodes:
            req, p = c.request, c.request.num_computed_tokens
            last_row[id(c)] = len(ids)
            ids.append(token_at(req, p))
            pos.append(p)
            slots.append(req.block_ids[p // bs] * bs + p % bs)
            ctx_lens.append(p + 1)
            tables.append(req.block_ids[: p // bs + 1])
        kv_slots, q_lens, k_lens = [], [], []
        for c in prefills:
            req, start = c.request, c.request.num_computed_tokens
            end = start + c.num_tokens
            ctx_slots = block_slots(req.block_ids, bs, end)
            ids.extend(req.all_ids[start:end])
            pos.extend(range(start, end))
            slots.extend(ctx_slots[start:end].tolist())
            kv_slots.append(ctx_slots)
            q_lens.append(c.num_tokens)
            k_lens.append(end)
            last_row[id(c)] = len(ids) - 1
        rows = [last_row[id(c)] for c in chunks if c.completes]
        return self._upload(ids, pos, slots, rows, ctx_lens, tables, kv_slots, q_lens, k_lens)

    def _upload(self, ids, pos, slots, rows, ctx_lens, tables, kv_slots, q_lens, k_lens) -> CudaBatch:  # noqa: ANN001
        t, nd, npf = len(ids), len(ctx_lens), len(q_lens)
        width = max((len(x) for x in tables), default=0)
        kv = np.concatenate(kv_slots) if kv_slots else np.zeros(0, np.int64)
        i64 = np.concatenate([np.asarray(ids + pos + slots + rows, dtype=np.int64), kv])
        table = np.zeros((nd, width), dtype=np.int32)
        for i, blocks in enumerate(tables):
            table[i, : len(blocks)] = blocks
        cu_q = np.concatenate([[0], np.cumsum(q_lens)]) if npf else np.zeros(1)
        cu_k = np.concatenate([[0], np.cumsum(k_lens)]) if npf else np.zeros(1)
        i32 = np.concatenate([np.asarray(ctx_lens), cu_q, cu_k, table.reshape(-1)]).astype(np.int32)
        d64 = torch.from_numpy(i64).to(self.device, non_blocking=True)
        d32 = torch.from_numpy(i32).to(self.device, non_blocking=True)
        o = np.cumsum([0, t, t, t, len(rows)])
        c = np.cumsum([0, nd, npf + 1, npf + 1])
        decode = prefill = None
        if nd:
            splits = choose_num_splits(nd, self.kv_heads, max(ctx_lens), self.num_sms)
            decode = DecodeBatch(d32[c[3]:].view(nd, width), d32[: c[1]], splits)
        if npf:
            prefill = PrefillBatch(
                cu_seqlens_q=d32[c[1]:c[2]], cu_seqlens_k=d32[c[2]:c[3]], kv_slots=d64[o[4]:],
                max_q=max(q_lens), max_k=max(k_lens),
                query_lens=tuple(q_lens), context_lens=tuple(k_lens),
            )
        return CudaBatch(
            input_ids=d64[o[0]:o[1]], positions=d64[o[1]:o[2]], slot_mapping=d64[o[2]:o[3]],
            logits_indices=d64[o[3]:o[4]], attention=CudaPagedAttention(nd, decode, prefill),
        )
