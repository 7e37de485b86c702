"""A step of one short prefill chunk as a CUDA graph, one per token bucket (16, 32, 64 …).

The follow-up turn of an agent resends a long cached prefix plus a few new tokens; a short
prompt is a few dozen tokens. Run eagerly, such a step costs ~450 kernel launches from
Python (CPU-bound at 8B); as a graph it is one replay. The attention is the short-chunk
kernel (``cuda_attention.paged_chunk``), which reads the sequence's pages directly with split
keys — FlashAttention's varlen kernel puts a few-token query over a 12k context on only one
block per head. Its inputs (block table, chunk start and length) sit in static buffers.
Query rows past the chunk's real length compute garbage that no real row reads (every op
but attention is row-wise, and attention reads only real rows); their K/V go to the
scratch block.
"""

from __future__ import annotations

import torch
from torch import nn

from pensieve.backends.cuda_attention import ChunkBatch, CudaPagedAttention, choose_num_splits
from pensieve.backends.cuda_batch import block_slots
from pensieve.backends.cuda_capture import capture_graph
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.models.forward_context import ForwardContext

CHUNK_BUCKETS = (16, 32, 64)


class CudaChunkGraphs:
    def __init__(self, model: nn.Module, k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor], max_context: int, scratch_block: int,
                 max_tokens: int) -> None:
        self.model = model
        self.k_caches, self.v_caches = k_caches, v_caches
        self.block_size = k_caches[0].shape[1]
        self.kv_heads = k_caches[0].shape[2]
        self.device = k_caches[0].device
        self.buckets = [b for b in CHUNK_BUCKETS if b <= max_tokens] or [max_tokens]
        self.max_q = self.buckets[-1]
        self.max_context = max_context
        self.max_blocks = -(-max_context // self.block_size)
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * self.block_size
        q = self.max_q
        # int64: ids [q] | positions [q] | slots [q] | logits row [1]
        # int32: chunk start [1] | chunk length [1] | block table [max_blocks]
        self._i64 = torch.zeros(3 * q + 1, dtype=torch.int64, device=self.device)
        self._i32 = torch.zeros(2 + self.max_blocks, dtype=torch.int32, device=self.device)
        self._h64 = torch.zeros(3 * q + 1, dtype=torch.int64).pin_memory()
        self._h32 = torch.zeros(2 + self.max_blocks, dtype=torch.int32).pin_memory()
        self._np64, self._np32 = self._h64.numpy(), self._h32.numpy()
        self._copied = torch.cuda.Event()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.replays = 0

    def _context(self, bucket: int) -> ForwardContext:
        q = self.max_q
        tiles = -(-bucket // 4)  # programs per KV head at 4 query heads per KV head
        chunk = ChunkBatch(
            block_table=self._i32[2:], start=self._i32[0:1], num_tokens=self._i32[1:2],
            num_splits=choose_num_splits(tiles, self.kv_heads, self.max_context, self.num_sms),
        )
        return ForwardContext(
            k_caches=self.k_caches, v_caches=self.v_caches,
            slot_mapping=self._i64[2 * q:2 * q + bucket], sequences=[],
            logits_indices=self._i64[3 * q:], attention=CudaPagedAttention(0, None, None, chunk),
        )

    @torch.inference_mode()
    def capture(self, pool) -> None:  # noqa: ANN001 - a CUDA graph memory pool handle
        q = self.max_q
        self._np64[:] = 0
        self._np64[2 * q:3 * q] = self.scratch_slot
        self._np32[:] = self.scratch_block
        self._np32[:2] = (0, 1)  # one token at position 0 (in the scratch block)
        self._i64.copy_(self._h64)
        self._i32.copy_(self._h32)
        for bucket in reversed(self.buckets):
            ids, pos = self._i64[:bucket], self._i64[q:q + bucket]
            ctx = self._context(bucket)
            self._graphs[bucket], self._outputs[bucket] = capture_graph(
                lambda: self.model(ids, pos, ctx), pool)
        torch.cuda.synchronize()

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        if len(chunks) != 1:
            return False
        c = chunks[0]
        return 1 < c.num_tokens <= self.max_q and c.completes and (
            c.request.num_computed_tokens + c.num_tokens <= self.max_context
        )

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [1, V] for a step of one short chunk that completes its request."""
        c = chunks[0]
        req, start, n = c.request, c.request.num_computed_tokens, c.num_tokens
        end = start + n
        bucket = next(b for b in self.buckets if b >= n)
        q = self.max_q
        self._copied.synchronize()
        h = self._np64
        nblocks = -(-end // self.block_size)
        h[:n] = req.all_ids[start:end]
        h[n:bucket] = 0
        h[q:q + n] = range(start, end)
        h[q + n:q + bucket] = 0
        h[2 * q:2 * q + n] = block_slots(req.block_ids, self.block_size, end)[start:end]
        h[2 * q + n:2 * q + bucket] = self.scratch_slot
        h[3 * q] = n - 1
        self._np32[:2] = (start, n)
        self._np32[2:2 + nblocks] = req.block_ids[:nblocks]
        self._i64.copy_(self._h64, non_blocking=True)
        self._i32.copy_(self._h32, non_blocking=True)
        self._copied.record()
        self._graphs[bucket].replay()
        self.replays += 1
        return self._outputs[bucket].clone()
