"""Owns the tensors: the KV cache, the batch's input tensors, the model call."""

from __future__ import annotations

import torch
from torch import nn

from pensieve.engine.config import EngineConfig
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.models.args import ModelArgs
from pensieve.models.forward_context import ForwardContext, SequenceSlice


def kv_block_bytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def plan_num_blocks(args: ModelArgs, config: EngineConfig) -> int:
    """Enough blocks for one full context at least; more up to the memory cap."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_seq = -(-config.context_length // config.block_size)
    by_bytes = config.kv_cache_bytes // kv_block_bytes(args, config.block_size, config.dtype)
    return max(per_seq, min(by_bytes, per_seq * config.max_num_seqs))


class ModelRunner:
    def __init__(self, model: nn.Module, args: ModelArgs, config: EngineConfig) -> None:
        self.model = model
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.num_blocks = plan_num_blocks(args, config)
        shape = (self.num_blocks, config.block_size, args.num_kv_heads, args.head_dim)
        # empty, not zeros: a slot is always written before it is read, and untouched pages
        # of a CPU cache then cost no resident memory
        self.k_caches = [
            torch.empty(shape, dtype=config.dtype, device=self.device)
            for _ in range(args.num_layers)
        ]
        self.v_caches = [torch.empty_like(k) for k in self.k_caches]

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step; logits [S, V] for the chunks that complete, in their order."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sequences: list[SequenceSlice] = []
        rows: list[int] = []
        bs = self.block_size
        for chunk in chunks:
            req, start = chunk.request, chunk.request.num_computed_tokens
            end = start + chunk.num_tokens
            q_start = len(ids)
            ids.extend(req.all_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(req.block_ids[p // bs] * bs + p % bs for p in range(start, end))
            table = torch.tensor(req.block_ids[: -(-end // bs)], device=self.device)
            sequences.append(SequenceSlice(q_start, chunk.num_tokens, end, table))
            if chunk.completes:
                rows.append(len(ids) - 1)
        ctx = ForwardContext(
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            slot_mapping=self._tensor(slots),
            sequences=sequences,
            logits_indices=self._tensor(rows),
        )
        return self.model(self._tensor(ids), self._tensor(positions), ctx)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
