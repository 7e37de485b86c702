"""A hybrid layout's pure-decode step over static buffers: what a CUDA graph of it reads.

``hybrid_cache.HybridCaches.run`` builds each step's metadata anew (per-group block tables as
fresh tensors, Python lists of sequences, host-side branches on their lengths); a captured
graph reads fixed addresses instead. ``StaticDecode`` keeps every input of a decode step of up
to ``max_rows`` rows in preallocated device buffers, written from the host in one upload a step:

- int64: token ids | positions | carried rows (-1: none) | logits rows | state slots |
  per layer group the new token's cache slot ``[groups, rows]``;
- int32: context lengths | per group the block tables ``[groups, rows, max_blocks]``.

Every row is one sequence's one new token (row i is sequence i). Rows past the real ones in a
bucket are padding: position 0, context length 1, their K/V written to each group's scratch
block and their recurrent state read as zeros from and written to the scratch state slot
(``HybridCaches.scratch_blocks`` / ``scratch_slot``), which no request ever reads. A recurrent
layer learns from ``RecurrentStates.cached`` (context length > 1, computed on the device) which
slots hold a state. The context's ``sequences`` are placeholders (row i, one token, the static
table row): with a static context nothing may loop over host lengths, so the attention backend
must take every paged layer (``StaticTorchAttention`` here, ``cuda_hybrid_graphs.py``'s on CUDA).

``StaticTorchAttention`` is the torch form over the same buffers (decode with windows and
sinks, the latent layers' absorbed attention): no host syncs and no data-dependent shapes, it
lets a CPU test check the static step against the dynamic one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pensieve.backends.cuda_batch import token_at
from pensieve.backends.hybrid_cache import HybridCaches
from pensieve.engine.kv_groups import NULL_BLOCK
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.models.forward_context import (
    AttentionBackend, ForwardContext, PagedGroups, RecurrentStates, SequenceSlice,
)
from pensieve.models.rope import apply_rope

PLACEHOLDER_CONTEXT = 2  # the static sequences' context_len: "something cached" (not read)


class StaticDecode:
    """Static buffers of a hybrid pure-decode step (module docstring)."""

    def __init__(self, caches: HybridCaches, max_rows: int, max_seqs: int, max_blocks: int
                 ) -> None:
        self.caches = caches
        self.device = caches.device
        self.block_size = caches.block_size
        self.groups = len(caches.plan.paged)
        self.max_rows, self.max_seqs, self.max_blocks = max_rows, max_seqs, max_blocks
        n, g, w = max_rows, self.groups, max_blocks
        pin = self.device.type == "cuda"
        self._i64 = torch.zeros((5 + g) * n, dtype=torch.int64, device=self.device)
        self._i32 = torch.zeros(n + g * n * w, dtype=torch.int32, device=self.device)
        self._h64 = torch.zeros(self._i64.shape, dtype=torch.int64, pin_memory=pin)
        self._h32 = torch.zeros(self._i32.shape, dtype=torch.int32, pin_memory=pin)
        self._n64, self._n32 = self._h64.numpy(), self._h32.numpy()
        self._copied = torch.cuda.Event() if pin else None
        self.ids, self.positions = self._i64[:n], self._i64[n:2 * n]
        self.carried_rows, self.logits_rows = self._i64[2 * n:3 * n], self._i64[3 * n:4 * n]
        self.state_slots = self._i64[4 * n:5 * n]
        self.slots = self._i64[5 * n:].view(g, n)
        self.lens = self._i32[:n]
        self.tables = self._i32[n:].view(g, n, w)
        self._pad(0, n)
        self._upload(n)
        self._sequences: dict[int, list[list[SequenceSlice]]] = {}

    # ------------------------------------------------------------------ host side

    def can_run(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """One token a chunk, at most ``max_seqs`` of them, no context over ``max_blocks``."""
        bs = self.block_size
        return 0 < len(chunks) <= min(self.max_seqs, self.max_rows) and all(
            c.num_tokens == 1 and c.request.num_computed_tokens // bs < self.max_blocks
            for c in chunks)

    def _pad(self, start: int, end: int) -> None:
        """Host rows ``start..end-1`` as padding rows (module docstring)."""
        n, bs = self.max_rows, self.block_size
        h64, h32 = self._n64, self._n32
        tables = h32[n:].reshape(self.groups, n, self.max_blocks)
        h64[start:end] = 0
        h64[n + start:n + end] = 0
        h64[2 * n + start:2 * n + end] = -1
        h64[4 * n + start:4 * n + end] = self.caches.scratch_slot
        h32[start:end] = 1
        for g, block in enumerate(self.caches.scratch_blocks):
            h64[(5 + g) * n + start:(5 + g) * n + end] = block * bs
            tables[g, start:end, 0] = block

    def fill(self, chunks: Sequence[ScheduledChunk], bucket: int,
             carried: torch.Tensor | None = None, carried_rows: Sequence[int] = ()) -> int:
        """Write the step's rows into the buffers, padding rows up to ``bucket``, and upload
        them; chunk ``i`` with ``carried_rows[i] >= 0`` takes its token from ``carried`` (the
        previous step's sampled ids, on the device). Returns the logits rows written."""
        if self._copied is not None:
            self._copied.synchronize()  # the last upload has left the pinned buffers
        n, bs, null = self.max_rows, self.block_size, self.caches.null_blocks
        h64, h32 = self._n64, self._n32
        tables = h32[n:].reshape(self.groups, n, self.max_blocks)
        s = 0
        for r, c in enumerate(chunks):
            req, p = c.request, c.request.num_computed_tokens
            from_device = carried is not None and carried_rows[r] >= 0
            h64[r] = 0 if from_device else token_at(req, p)
            h64[n + r] = p
            h64[2 * n + r] = carried_rows[r] if from_device else -1
            if req.cache is not None and req.cache.slot is not None:
                h64[4 * n + r] = req.cache.slot
            h32[r] = p + 1
            own = req.cache.tables if req.cache is not None else [req.block_ids]
            for g, table in enumerate(own):
                blocks = np.asarray(table[: p // bs + 1], dtype=np.int64)
                h64[(5 + g) * n + r] = blocks[-1] * bs + p % bs
                tables[g, r, : len(blocks)] = np.where(blocks == NULL_BLOCK, null[g], blocks)
            if c.completes:
                h64[3 * n + s] = r
                s += 1
        self._pad(len(chunks), bucket)
        h64[3 * n + s:3 * n + min(bucket, self.max_seqs)] = 0
        self._upload(bucket)
        if carried is not None:
            ids, rows = self.ids[:bucket], self.carried_rows[:bucket]
            ids.copy_(torch.where(rows >= 0, carried[rows.clamp(min=0)], ids))
        return s

    def _upload(self, bucket: int) -> None:
        """The host buffers up in two copies (the table rows past ``bucket`` stay)."""
        n, w = self.max_rows, self.max_blocks
        self._i64.copy_(self._h64, non_blocking=True)
        self._i32[:n].copy_(self._h32[:n], non_blocking=True)
        for g in range(self.groups):
            lo = n + g * n * w
            self._i32[lo:lo + bucket * w].copy_(self._h32[lo:lo + bucket * w], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    # ------------------------------------------------------------------ device side

    def sequences(self, b: int) -> list[list[SequenceSlice]]:
        """Per group the placeholder sequences of a ``b``-row step (module docstring)."""
        if b not in self._sequences:
            self._sequences[b] = [[SequenceSlice(i, 1, PLACEHOLDER_CONTEXT, self.tables[g, i])
                                   for i in range(b)] for g in range(self.groups)]
        return self._sequences[b]

    def context(self, b: int, attention: AttentionBackend) -> ForwardContext:
        """The step's context over the first ``b`` rows of the buffers; only device ops (the
        recurrent layers' ``cached`` flags), so it may be built inside a graph's capture."""
        c = self.caches
        sequences = self.sequences(b)
        slots = [self.slots[g, :b] for g in range(self.groups)]
        states = None
        if c.recurrent_layers:
            states = RecurrentStates(c.conv, c.ssm, self.state_slots[:b], cached=self.lens[:b] > 1)
        return ForwardContext(
            k_caches=c.k_caches, v_caches=c.v_caches, slot_mapping=slots[0],
            sequences=sequences[0], logits_indices=self.logits_rows[:min(b, self.max_seqs)],
            attention=attention, states=states,
            groups=PagedGroups(tuple(c.layer_group), slots, sequences) if self.groups > 1 else None)

    def forward(self, model: nn.Module, b: int, attention: AttentionBackend) -> torch.Tensor:
        """The model over the first ``b`` rows: logits of every logits row of the bucket."""
        return model(self.ids[:b], self.positions[:b], self.context(b, attention))

    def torch_attention(self, b: int, latent: frozenset[int] = frozenset()
                        ) -> "StaticTorchAttention":
        """The torch backend over the first ``b`` rows (``latent``: layers it serves in latent
        space, for a model that declared ``FastPaths.cuda_latent_attention``)."""
        return StaticTorchAttention(
            self.caches.layer_group, [self.tables[g, :b] for g in range(self.groups)],
            self.lens[:b], [self.slots[g, :b] for g in range(self.groups)], latent)


class StaticTorchAttention:
    """Torch decode attention over the static buffers (windows, sinks, latent layers): each
    row attends over its table's ``max_blocks`` pages, keys past its context length or before
    its window masked. Slow (it reads every page of a row's table) but graph-safe."""

    masks_windows = True

    def __init__(self, layer_group: Sequence[int | None], tables: list[torch.Tensor],
                 lens: torch.Tensor, slots: list[torch.Tensor],
                 latent: frozenset[int] = frozenset()) -> None:
        self.layer_group = layer_group
        self.tables, self.lens, self.slots, self.latent = tables, lens, slots, latent

    def _pages(self, layer: int, cache: torch.Tensor, window: int | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every page of every row's table [B, N, *entry] (zeros where not visible: pages never
        written may hold anything) and which keys a row sees [B, N]."""
        g = self.layer_group[layer]
        assert g is not None
        table = self.tables[g].long()
        b, w = table.shape
        pages = cache[table].reshape(b, w * cache.shape[1], *cache.shape[2:])
        pos = torch.arange(w * cache.shape[1], device=cache.device)
        lens = self.lens.long().unsqueeze(1)
        visible = pos < lens
        if window is not None:
            visible &= pos >= lens - window
        shown = visible.view(b, -1, *[1] * (pages.dim() - 2))
        return torch.where(shown, pages, torch.zeros((), dtype=pages.dtype)), visible

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: ForwardContext, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
                 *, window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        g = self.layer_group[layer]
        assert g is not None
        if cos_sin is not None:
            q, k = apply_rope(q, k, cos_sin)
        k_cache, v_cache = ctx.k_caches[layer], ctx.v_caches[layer]
        hk, d = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, hk, d).index_copy_(0, self.slots[g], k.to(k_cache.dtype))
        v_cache.view(-1, hk, v_cache.shape[3]).index_copy_(0, self.slots[g], v.to(v_cache.dtype))
        keys, visible = self._pages(layer, k_cache, window)
        values, _ = self._pages(layer, v_cache, window)
        b, hq = q.shape[:2]
        qf = q.float().view(b, hk, hq // hk, q.shape[2])
        scores = torch.einsum("bkgd,bnkd->bkgn", qf, keys.float()) * q.shape[2] ** -0.5
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        if sinks is not None:
            lse = torch.logaddexp(lse, sinks.float().view(1, hk, hq // hk, 1))
        out = torch.einsum("bkgn,bnkd->bkgd", torch.exp(scores - lse), values.float())
        return out.reshape(b, hq, -1).to(q.dtype)

    def latent_rows(self, layer: int) -> tuple[frozenset[int], slice] | None:
        """A latent layer: every row (row i is sequence i)."""
        if layer not in self.latent:
            return None
        b = self.lens.shape[0]
        return frozenset(range(b)), slice(0, b)

    def attend_latent(self, layer: int, q: torch.Tensor, cache: torch.Tensor, rank: int,
                      scale: float) -> torch.Tensor:
        """Absorbed queries [B, H, rank + rope] over the rows' latents → [B, H, rank]."""
        keys, visible = self._pages(layer, cache, None)
        keys = keys[:, :, 0].float()  # [B, N, rank + rope]
        scores = torch.einsum("bhd,bnd->bhn", q.float(), keys) * scale
        probs = scores.masked_fill(~visible[:, None, :], float("-inf")).softmax(dim=-1)
        return torch.einsum("bhn,bnr->bhr", probs, keys[..., :rank]).to(q.dtype)
