"""Decode steps, and short prefills riding along with them, as CUDA graphs: one per row
bucket (1, 2, 4, 8, 16, 32 … max).

A decode step of an 8B model is ~450 kernel launches; launched from Python they cost more
than the GPU time at small batch. Captured once at start, a step is then one ``replay()``.
Every row is one token with its own position, KV slot, context length and block table, so
the paged decode-attention kernel serves any mix: a short prompt's ``k`` new tokens are ``k``
rows whose context lengths grow by one (causal by construction; all rows' K/V are stored
before any row attends). New requests arriving while others decode thus join a graph step
instead of forcing an eager one; a prefill joins only while its context is short
(``MAX_PREFILL_CONTEXT``), as every row re-reads its sequence's pages. Long or long-context
chunks run eagerly or as chunk graphs (``cuda_chunk_graphs.py``).

Graphs read fixed addresses, so every input lives in static device buffers: token ids,
positions, KV slots, the rows to turn into logits (int64) and context lengths + block tables
padded to the longest context (int32). Each step fills two pinned host buffers and copies
them up in two non-blocking copies; under async scheduling a decode row's token id may
instead come from the previous step's sampled ids, still on the device (one gather before the
replay). Rows past the real ones write their K/V to a scratch block nobody reads and attend
to one token of it. All buckets share one memory pool (they never run at once); each keeps
its own output, which ``run`` copies out before the next step can overwrite it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pensieve.backends.cuda_attention import CudaPagedAttention, DecodeBatch, choose_num_splits
from pensieve.backends.cuda_batch import token_at
from pensieve.backends.cuda_capture import capture_graph
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.models.forward_context import ForwardContext

log = logging.getLogger(__name__)
PREFILL_ROWS = 1024  # rows beyond max_num_seqs for short prefills (a burst of new prompts)
MAX_PREFILL_CONTEXT = 256  # a prefill chunk joins a graph step only if it ends by this position


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
             if b < max_batch]
    return sizes + [max_batch]


class CudaGraphRunner:
    def __init__(self, model: nn.Module, k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor], max_batch: int, max_blocks: int,
                 scratch_block: int, prefill_rows: int = PREFILL_ROWS) -> None:
        self.model = model
        self.k_caches, self.v_caches = k_caches, v_caches
        self.block_size = k_caches[0].shape[1]
        self.kv_heads = k_caches[0].shape[2]
        self.device = k_caches[0].device
        self.buckets = bucket_sizes(max_batch + prefill_rows)
        self.max_batch = self.buckets[-1]  # rows of the largest graph
        self.max_seqs = max_batch  # sequences of a step: logits rows at most
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_block * self.block_size
        self.scratch_block = scratch_block
        n, w = self.max_batch, max_blocks
        # int64: ids | positions | slots | carried rows | logits rows;
        # int32: context lens | block tables [n, w]
        self._i64 = torch.zeros(5 * n, dtype=torch.int64, device=self.device)
        self._i32 = torch.zeros(n + n * w, dtype=torch.int32, device=self.device)
        self._h64 = torch.zeros(5 * n, dtype=torch.int64).pin_memory()
        self._h32 = torch.zeros(n + n * w, dtype=torch.int32).pin_memory()
        self._n64, self._n32 = self._h64.numpy(), self._h32.numpy()
        self._copied = torch.cuda.Event()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.replays = 0
        self.mixed_replays = 0  # replays with prefill rows

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
            logits_indices=self._i64[4 * n:4 * n + min(b, self.max_seqs)],
            attention=CudaPagedAttention(b, decode, None),
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
            self._graphs[b], self._outputs[b] = capture_graph(lambda: self.model(ids, pos, ctx), pool)
        torch.cuda.synchronize()

    # ------------------------------------------------------------------ replay

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        """Decodes, plus prefill chunks that end by ``MAX_PREFILL_CONTEXT``, in ≤ max rows."""
        if len(chunks) > self.max_seqs:
            return False
        rows = 0
        for c in chunks:
            if c.num_tokens > 1 and c.request.num_computed_tokens + c.num_tokens > MAX_PREFILL_CONTEXT:
                return False
            rows += c.num_tokens
        return 0 < rows <= self.max_batch

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], carried: torch.Tensor | None = None,
            carried_rows: Sequence[int] = ()) -> torch.Tensor:
        """Logits [S, V] for the S chunks that complete, in order; a one-token chunk ``i``
        decodes ``carried[carried_rows[i]]`` where that is ≥ 0 (see ``ModelRunner.run``)."""
        n, w, bs = self.max_batch, self.max_blocks, self.block_size
        self._copied.synchronize()  # the last upload has left the pinned buffers
        h64, h32 = self._n64, self._n32
        tables = h32[n:].reshape(n, w)
        carry = carried is not None
        r = s = 0  # rows filled, logits rows
        for i, c in enumerate(chunks):
            req, p, k = c.request, c.request.num_computed_tokens, c.num_tokens
            if k == 1:
                blocks = req.block_ids[: p // bs + 1]
                from_device = carry and carried_rows[i] >= 0
                h64[r] = 0 if from_device else token_at(req, p)
                h64[n + r] = p
                h64[2 * n + r] = blocks[-1] * bs + p % bs
                h64[3 * n + r] = carried_rows[i] if from_device else -1
                h32[r] = p + 1
                tables[r, : len(blocks)] = blocks
            else:  # k rows of one short prefill: positions p … p+k-1
                pos = np.arange(p, p + k)
                blocks = np.asarray(req.block_ids[: (p + k - 1) // bs + 1], dtype=np.int32)
                h64[r:r + k] = req.all_ids[p:p + k]
                h64[n + r:n + r + k] = pos
                h64[2 * n + r:2 * n + r + k] = blocks[pos // bs] * bs + pos % bs
                h64[3 * n + r:3 * n + r + k] = -1
                h32[r:r + k] = pos + 1
                tables[r:r + k, : len(blocks)] = blocks
            r += k
            if c.completes:
                h64[4 * n + s] = r - 1
                s += 1
        bucket = next(b for b in self.buckets if b >= r)
        h64[r:bucket] = 0
        h64[n + r:n + bucket] = 0
        h64[2 * n + r:2 * n + bucket] = self.scratch_slot
        h64[4 * n + s:4 * n + min(bucket, self.max_seqs)] = 0
        h32[r:bucket] = 1
        tables[r:bucket, 0] = self.scratch_block
        self._i64.copy_(self._h64, non_blocking=True)
        used = n + bucket * w  # context lengths and the table rows this bucket reads
        self._i32[:used].copy_(self._h32[:used], non_blocking=True)
        self._copied.record()
        if carry:
            ids, rows = self._i64[:r], self._i64[3 * n:3 * n + r]
            ids.copy_(torch.where(rows >= 0, carried[rows.clamp(min=0)], ids))
        self._graphs[bucket].replay()
        self.replays += 1
        self.mixed_replays += r > len(chunks)
        return self._outputs[bucket][:s].clone()
