"""Decode steps as CUDA graphs, one per batch-size bucket (1, 2, 4, 8, 16, 32 … max).

A decode step of an 8B model is ~450 kernel launches; launched from Python they cost more
than the GPU time at small batch. Captured once at start, a step is then one ``replay()``.
Graphs read fixed addresses, so every input lives in static device buffers: token ids,
positions, KV slots (int64) and context lengths + block tables padded to the longest context
(int32). Each step fills two pinned host buffers and copies them up in two non-blocking
copies; under async scheduling a row's token id may instead come from the previous step's
sampled ids, still on the device (one gather before the replay); rows past the real batch write their K/V to a scratch block nobody reads and attend
to one token of it. All buckets share one memory pool (they never run at once); each keeps
its own output, which ``run`` copies out before the next step can overwrite it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from pensieve.backends.cuda_attention import CudaPagedAttention, DecodeBatch, choose_num_splits
from pensieve.engine.cuda_batch import token_at
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.models.forward_context import ForwardContext

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256) if b < max_batch]
    return sizes + [max_batch]


class CudaGraphRunner:
    def __init__(self, model: nn.Module, k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor], max_batch: int, max_blocks: int,
                 scratch_block: int) -> None:
        self.model = model
        self.k_caches, self.v_caches = k_caches, v_caches
        self.block_size = k_caches[0].shape[1]
        self.kv_heads = k_caches[0].shape[2]
        self.device = k_caches[0].device
        self.buckets = bucket_sizes(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_block * self.block_size
        self.scratch_block = scratch_block
        n, w = self.max_batch, max_blocks
        # int64: ids | positions | slots | carried rows; int32: context lens | block tables [n, w]
        self._i64 = torch.zeros(4 * n, dtype=torch.int64, device=self.device)
        self._i32 = torch.zeros(n + n * w, dtype=torch.int32, device=self.device)
        self._h64 = torch.zeros(4 * n, dtype=torch.int64).pin_memory()
        self._h32 = torch.zeros(n + n * w, dtype=torch.int32).pin_memory()
        self._n64, self._n32 = self._h64.numpy(), self._h32.numpy()
        self._copied = torch.cuda.Event()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._arange = torch.arange(n, device=self.device)
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.replays = 0

    # ------------------------------------------------------------------ capture

    def _context(self, b: int) -> ForwardContext:
        n, w = self.max_batch, self.max_blocks
        decode = DecodeBatch(
            block_tables=self._i32[n:].view(n, w)[:b],
            context_lens=self._i32[:b],
            num_splits=choose_num_splits(b, self.kv_heads, 1 << 30, self.num_sms),
        )
        return ForwardContext(
            k_caches=self.k_caches, v_caches=self.v_caches,
            slot_mapping=self._i64[2 * n:2 * n + b], sequences=[],
            logits_indices=self._arange[:b], attention=CudaPagedAttention(b, decode, None),
        )

    @torch.inference_mode()
    def capture(self, pool) -> None:  # noqa: ANN001 - a CUDA graph memory pool handle
        """Capture every bucket, largest first (later ones reuse its pool blocks)."""
        n = self.max_batch
        self._i64.zero_()
        self._i64[2 * n:3 * n].fill_(self.scratch_slot)
        self._i32.fill_(self.scratch_block)
        self._i32[:n].fill_(1)
        for b in reversed(self.buckets):
            ctx = self._context(b)
            ids, pos = self._i64[:b], self._i64[n:n + b]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compile Triton kernels, pick cuBLAS algorithms
                    self.model(ids, pos, ctx)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[b] = self.model(ids, pos, ctx)
            self._graphs[b] = graph
        torch.cuda.synchronize()

    # ------------------------------------------------------------------ replay

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        return 0 < len(chunks) <= self.max_batch and all(
            c.num_tokens == 1 and c.completes for c in chunks
        )

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], carried: torch.Tensor | None = None,
            carried_rows: Sequence[int] = ()) -> torch.Tensor:
        """Logits [len(chunks), V] for a decode-only step; row ``i`` decodes
        ``carried[carried_rows[i]]`` where that is ≥ 0 (see ``ModelRunner.run``)."""
        b = len(chunks)
        bucket = next(s for s in self.buckets if s >= b)
        n, w, bs = self.max_batch, self.max_blocks, self.block_size
        self._copied.synchronize()  # the last upload has left the pinned buffers
        h64, h32 = self._n64, self._n32
        tables = h32[n:].reshape(n, w)
        carry = carried is not None
        for i, c in enumerate(chunks):
            req, p = c.request, c.request.num_computed_tokens
            blocks = req.block_ids[: p // bs + 1]
            from_device = carry and carried_rows[i] >= 0
            h64[i] = 0 if from_device else token_at(req, p)
            h64[n + i] = p
            h64[3 * n + i] = carried_rows[i] if from_device else -1
            h64[2 * n + i] = blocks[-1] * bs + p % bs
            h32[i] = p + 1
            tables[i, : len(blocks)] = blocks
        h64[b:bucket] = 0
        h64[n + b:n + bucket] = 0
        h64[2 * n + b:2 * n + bucket] = self.scratch_slot
        h32[b:bucket] = 1
        tables[b:bucket, 0] = self.scratch_block
        self._i64.copy_(self._h64, non_blocking=True)
        self._i32.copy_(self._h32, non_blocking=True)
        self._copied.record()
        if carry:
            ids, rows = self._i64[:b], self._i64[3 * n:3 * n + b]
            ids.copy_(torch.where(rows >= 0, carried[rows.clamp(min=0)], ids))
        self._graphs[bucket].replay()
        self.replays += 1
        return self._outputs[bucket][:b].clone()

