"""A hybrid layout's attention layers on the batched CUDA kernels, one layer group at a time.

``backends/hybrid_cache.py`` builds each step's per-group block tables and slot mappings
(``ForwardContext.groups``); ``CudaHybridBuilder.build`` turns them into the batched metadata
of ``cuda_attention.py`` per group (block tables, context lengths, the prefill rows' cache
slots) and returns a ``CudaHybridAttention``: the backend ``paged_attention`` hands a layer's
call to, with the layer's ``window`` and ``sinks``.

- **Decode rows** (one new token of a sequence): the Triton split-K decode kernel over the
  layer's group tables, the layer's window and sinks passed to it. A windowed group's tables
  point freed blocks at its zeroed null block; the kernel starts at ``context_len - window``,
  past every freed block, so it never reads one.
- **Prefill rows**: the uniform path's varlen attention (FlashAttention-2 or SDPA) where no
  window masks within the step's chunks and the layer has no sinks. Otherwise each chunk on
  its own: the short-chunk kernel with the layer's window and sinks where the window masks
  within it (each tile of rows reads only its rows' windows: work ∝ new tokens × window,
  whatever the context), the chunk has at most ``CHUNK_ROWS`` rows, or it is a follow-up
  turn's new tokens over a long cached context (``chunk_kernel``); a longer chunk of a
  full-attention layer with sinks takes the per-sequence loop (``attend_cached``).
- **Layers the kernels do not take**, decided per layer, never silently: latent (MLA, values
  narrower than keys or none), head dims over 256, more than 16 query heads a KV head — the
  whole layer goes through the per-sequence loop.
- **Latent layers** of a model that declares ``FastPaths.cuda_latent_attention`` (the builder
  is given ``latent_heads``): the model asks ``latent_rows`` which of its rows the latent kernel
  serves this step (decode rows, short chunks over a cached context, short cold prompts:
  ``cuda_mla.takes``) and hands their absorbed queries to ``attend_latent`` (``cuda_mla.py``);
  the rest stay on its own path.

Opt out with ``PENSIEVE_HYBRID_KERNELS=0`` (read when the model runner starts; the latent
kernel alone: ``PENSIEVE_LATENT_KERNEL=0``). Decode steps as CUDA graphs over static buffers:
``cuda_hybrid_graphs.py`` (opt-in). Importing
this module needs no GPU; Triton loads on first kernel use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from pensieve.backends.cuda_attention import (
    _PAD_GROUP, ChunkBatch, DecodeBatch, PrefillBatch, choose_num_splits, paged_chunk,
    paged_decode, prefill_attention, rope_and_store, store_kv,
)
from pensieve.backends.cuda_mla import (
    LatentBatch, Rows, build_latent, fits, latent_attention, latent_layers, row_index as _rows,
)
from pensieve.models.forward_context import (
    ForwardContext, SequenceSlice, attend_cached, paged_attention,
)
from pensieve.models.rope import apply_rope

MAX_HEAD_DIM = 256  # the decode kernel's [16, D] accumulator per program
CHUNK_ROWS = 64  # a chunk with sinks over its whole context: the chunk kernel up to this many rows
# … and a follow-up chunk of up to FOLLOW_UP_ROWS rows over a context at least FOLLOW_UP_RATIO
# times as long (gpt-oss's turn 2: 82 new tokens over a 17k prefix). The loop would gather the
# whole context per layer and build a [heads, n, C + 1] float mask for SDPA's sink column —
# the suspect for gpt-oss's turn 2 at 13.5% of turn 1 (issue 15, not yet measured on the GPU).
FOLLOW_UP_ROWS, FOLLOW_UP_RATIO = 512, 4
ENV_SWITCH = "PENSIEVE_HYBRID_KERNELS"


def enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether hybrid layouts take the batched kernels on CUDA (``PENSIEVE_HYBRID_KERNELS=0``:
    the per-sequence loop, as before)."""
    return (os.environ if environ is None else environ).get(ENV_SWITCH, "1") != "0"


def kernel_layers(k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
                  layer_group: Sequence[int | None]) -> frozenset[int]:
    """Layers whose K/V the kernels can attend over: plain paged K/V (values as wide as keys;
    not latent, not an empty KV-shared placeholder) of at most ``MAX_HEAD_DIM`` dims."""
    def plain(k: torch.Tensor, v: torch.Tensor) -> bool:
        return k.dim() == 4 and k.shape[2] > 0 and 0 < k.shape[3] <= MAX_HEAD_DIM and \
            v.shape[3] == k.shape[3]

    return frozenset(i for i, g in enumerate(layer_group)
                     if g is not None and plain(k_caches[i], v_caches[i]))


@dataclass(frozen=True)
class GroupBatch:
    """One layer group's batched metadata for a step."""

    decode: DecodeBatch | None
    prefill: PrefillBatch | None
    sequences: list[SequenceSlice]  # the group's, for the per-sequence prefill
    slot_mapping: torch.Tensor  # [T] int64
    chunks: list[ChunkBatch]  # per prefill sequence, in order: the short-chunk kernel's
    latent: LatentBatch | None = None  # the latent kernel's rows (``cuda_mla.py``)


class CudaHybridAttention:
    """The step's attention backend: a layer's call runs over its group's batch (module
    docstring). ``masks_windows``: ``paged_attention`` passes it the layer's window and sinks."""

    masks_windows = True

    def __init__(self, layer_group: Sequence[int | None], groups: list[GroupBatch],
                 decode_rows: Rows | None, prefill_rows: Rows | None, max_prefill_context: int,
                 kernels: frozenset[int], latent: frozenset[int] = frozenset()) -> None:
        self.layer_group = layer_group
        self.groups = groups
        self.decode_rows = decode_rows
        self.prefill_rows = prefill_rows
        self.max_prefill_context = max_prefill_context
        self.kernels = kernels
        self.latent = latent  # latent layers on ``cuda_mla``'s kernel

    def latent_rows(self, layer: int) -> tuple[frozenset[int], Rows] | None:
        """For a latent layer: the sequences (indices into ``ctx.paged(layer)``'s) and the flat
        rows, sequence after sequence, that ``attend_latent`` serves this step; else None."""
        g = self.layer_group[layer]
        batch = self.groups[g].latent if g is not None and layer in self.latent else None
        return None if batch is None else (batch.sequences, batch.rows)

    def attend_latent(self, layer: int, q: torch.Tensor, cache: torch.Tensor, rank: int,
                      scale: float) -> torch.Tensor | None:
        """The absorbed queries [R, H, rank + rope] of ``latent_rows(layer)``'s rows over the
        layer's paged latent cache → the attention-weighted latents [R, H, rank]; None where
        the kernel does not take the latent's width (the model attends on its own)."""
        g = self.layer_group[layer]
        assert g is not None
        batch = self.groups[g].latent
        assert batch is not None
        if not fits(rank, q.shape[-1]):
            return None
        return latent_attention(q, cache, batch, rank, scale)

    def takes(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Whether ``layer`` runs on the kernels (else the per-sequence loop)."""
        return layer in self.kernels and q.shape[1] % k_cache.shape[2] == 0 and \
            q.shape[1] // k_cache.shape[2] <= _PAD_GROUP and q.shape[2] == k_cache.shape[3]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: ForwardContext, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
                 *, window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        k_cache, v_cache = ctx.k_caches[layer], ctx.v_caches[layer]
        g = self.layer_group[layer]
        if g is None or not self.takes(layer, q, k_cache):
            return per_sequence(layer, q, k, v, ctx, cos_sin, window, sinks)
        batch = self.groups[g]
        q = _rope_and_store(q, k, v, cos_sin, batch.slot_mapping, k_cache, v_cache)
        if self.prefill_rows is None:
            assert batch.decode is not None
            return paged_decode(q, k_cache, v_cache, batch.decode, window, sinks)
        out = torch.empty_like(q)
        if self.decode_rows is not None:
            assert batch.decode is not None
            out[self.decode_rows] = paged_decode(q[self.decode_rows], k_cache, v_cache,
                                                 batch.decode, window, sinks)
        if sinks is None and (window is None or self.max_prefill_context <= window):
            assert batch.prefill is not None
            out[self.prefill_rows] = prefill_attention(q[self.prefill_rows], k_cache, v_cache,
                                                       batch.prefill)
        else:  # a window masking within a chunk, or sinks: chunk by chunk
            chunks = iter(batch.chunks)
            for seq in batch.sequences:
                if seq.query_len == 1:
                    continue
                chunk = next(chunks)
                if (window is not None and window < seq.context_len) or chunk_kernel(seq):
                    rows = slice(seq.query_start, seq.query_start + seq.query_len)
                    out[rows] = paged_chunk(q[rows], k_cache, v_cache, chunk, window, sinks)
                else:
                    attend_cached(q, k_cache, v_cache, seq, out, window, sinks)
        return out


def chunk_kernel(seq: SequenceSlice) -> bool:
    """Whether a chunk with sinks, no window masking within it, takes the chunk kernel: a
    short one, or a follow-up turn's few new tokens over a long cached context."""
    return seq.query_len <= CHUNK_ROWS or (seq.query_len <= FOLLOW_UP_ROWS and
                                           seq.context_len >= FOLLOW_UP_RATIO * seq.query_len)


def per_sequence(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: ForwardContext, cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
                 window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """A layer the kernels do not take: the per-sequence SDPA loop over its group's tables."""
    return paged_attention(layer, q, k, v, replace(ctx, attention=None), cos_sin,
                           window=window, sinks=sinks)


def _rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin: tuple[torch.Tensor, torch.Tensor] | None, slots: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """RoPE (where given) and the K/V writes: the fused kernel for full-width rotate-half
    tables over unit-stride inputs, else ``apply_rope`` (partial rotary) and index copies."""
    if cos_sin is not None:
        d = q.shape[-1]
        fused = cos_sin[0].shape[-1] == d and cos_sin[0].numel() == q.shape[0] * d and all(
            x.stride(-1) == 1 for x in (q, k, v, k_cache))
        if fused:
            return rope_and_store(q, k, v, cos_sin, slots, k_cache, v_cache)
        q, k = apply_rope(q, k, cos_sin)
    store_kv(k_cache, v_cache, k, v, slots)
    return q


class CudaHybridBuilder:
    """Per step: the groups' sequences and slot mappings → ``CudaHybridAttention``."""

    def __init__(self, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
                 layer_group: Sequence[int | None], windows: Sequence[int | None],
                 block_size: int, device: torch.device, num_sms: int | None = None,
                 latent_heads: int | None = None) -> None:
        self.layer_group = tuple(layer_group)
        self.kernels = kernel_layers(k_caches, v_caches, layer_group)
        # the latent kernel: only for a model that declared it (its query heads given)
        self.latent_heads = latent_heads
        self.latent = latent_layers(k_caches, v_caches, layer_group) if latent_heads else \
            frozenset()
        self.plain_groups = {self.layer_group[i] for i in self.kernels}
        self.latent_groups = {self.layer_group[i] for i in self.latent}
        self.windows = list(windows)  # per group (None: full attention)
        self.kv_heads = [max((k_caches[i].shape[2] for i, gi in enumerate(layer_group)
                              if gi == g and i in self.kernels), default=1)
                         for g in range(len(windows))]
        self.block_size = block_size
        self.device = device
        self.num_sms = num_sms if num_sms is not None else \
            torch.cuda.get_device_properties(device).multi_processor_count

    def build(self, layer_group: Sequence[int | None], sequences: list[list[SequenceSlice]],
              slots: list[torch.Tensor]) -> CudaHybridAttention:
        first = sequences[0]
        dec = [i for i, s in enumerate(first) if s.query_len == 1]
        pre = [i for i, s in enumerate(first) if s.query_len > 1]
        decode_rows = _rows([first[i].query_start for i in dec], self.device) if dec else None
        prefill_rows = _rows([r for i in pre for r in range(
            first[i].query_start, first[i].query_start + first[i].query_len)],
            self.device) if pre else None
        groups = [self._group(seqs, dec, pre, slot_mapping, self.windows[g], self.kv_heads[g])
                  if g in self.plain_groups else GroupBatch(None, None, seqs, slot_mapping, [])
                  for g, (seqs, slot_mapping) in enumerate(zip(sequences, slots))]
        for g in self.latent_groups:
            assert g is not None and self.latent_heads is not None
            groups[g] = replace(groups[g], latent=build_latent(
                sequences[g], self.latent_heads, self.device, self.num_sms))
        return CudaHybridAttention(layer_group, groups, decode_rows, prefill_rows,
                                   max((first[i].context_len for i in pre), default=0),
                                   self.kernels, self.latent)

    def _group(self, seqs: list[SequenceSlice], dec: list[int], pre: list[int],
               slot_mapping: torch.Tensor, window: int | None, kv_heads: int) -> GroupBatch:
        """Gather the sequences' device block tables once ([B, width] for the decode rows,
        every context token's slot for the prefill rows) by host-built indices."""
        bs = self.block_size
        lens = [s.block_table.numel() for s in seqs]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        width = max((lens[i] for i in dec), default=0)
        table_idx = np.zeros((len(dec), width), dtype=np.int64)
        for r, i in enumerate(dec):
            table_idx[r] = offsets[i] + np.minimum(np.arange(width), lens[i] - 1)
        ctx_lens = np.asarray([seqs[i].context_len for i in dec], dtype=np.int64)
        k_lens = [seqs[i].context_len for i in pre]
        q_lens = [seqs[i].query_len for i in pre]
        pos = [np.arange(n) for n in k_lens]
        kv_block = np.concatenate([offsets[i] + p // bs for i, p in zip(pre, pos)]) if pre else \
            np.zeros(0, np.int64)
        kv_off = np.concatenate([p % bs for p in pos]) if pre else np.zeros(0, np.int64)
        cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
        cu_k = np.concatenate([[0], np.cumsum(k_lens)]).astype(np.int64)
        starts = np.asarray([k - q for k, q in zip(k_lens, q_lens)] + q_lens, dtype=np.int64)
        host = np.concatenate([table_idx.reshape(-1), ctx_lens, kv_block, kv_off, cu_q, cu_k,
                               starts])
        dev = torch.from_numpy(host).to(self.device, non_blocking=True)
        o = np.cumsum([0, table_idx.size, len(dec), len(kv_block), len(kv_off), len(cu_q)])
        flat = torch.cat([s.block_table for s in seqs])
        decode = prefill = None
        chunks: list[ChunkBatch] = []
        if dec:
            table = flat[dev[o[0]:o[1]]].to(torch.int32).view(len(dec), width)
            longest = max(min(n, window) if window else n for n in ctx_lens.tolist())
            splits = choose_num_splits(len(dec), kv_heads, longest, self.num_sms)
            decode = DecodeBatch(table, dev[o[1]:o[2]].to(torch.int32), splits)
        if pre:
            kv_slots = flat[dev[o[2]:o[3]]] * bs + dev[o[3]:o[4]]
            i32 = dev[o[4]:].to(torch.int32)
            n_cu = len(cu_q)
            prefill = PrefillBatch(
                cu_seqlens_q=i32[:n_cu], cu_seqlens_k=i32[n_cu:2 * n_cu], kv_slots=kv_slots,
                max_q=max(q_lens), max_k=max(k_lens), query_lens=tuple(q_lens),
                context_lens=tuple(k_lens))
            starts_d, lens_d = i32[2 * n_cu:2 * n_cu + len(pre)], i32[2 * n_cu + len(pre):]
            for j, i in enumerate(pre):
                keys = min(k_lens[j], window + q_lens[j]) if window else k_lens[j]
                splits = choose_num_splits(max(1, q_lens[j] // 4), kv_heads, keys, self.num_sms)
                chunks.append(ChunkBatch(seqs[i].block_table.to(torch.int32),
                                         starts_d[j:j + 1], lens_d[j:j + 1], splits))
        return GroupBatch(decode, prefill, seqs, slot_mapping, chunks)
