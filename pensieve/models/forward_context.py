"""Per-forward state handed to a model: where each token's KV goes and what each sequence sees.

The engine owns the KV cache (a pool of fixed-size blocks per layer); a model only reads and
writes it through this context. Tokens of all sequences in a step are flattened into one
[T] batch (prefill chunks and single decode tokens side by side).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from pensieve.models.rope import apply_rope
from pensieve.models.sink_attention import attend_with_sinks


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's part of a flattened batch."""

    query_start: int  # index of its first token in the flattened batch
    query_len: int  # tokens of it in this step
    context_len: int  # tokens it attends to after this step (cached + new)
    block_table: torch.Tensor  # [num_blocks] int64, the blocks holding its KV, in order


class AttentionBackend(Protocol):
    """Stores one layer's new K/V and attends over the paged cache, from batched metadata the
    model runner prepared for this step (e.g. ``backends/cuda_attention.CudaPagedAttention``)."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: "ForwardContext",
                 cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class RecurrentStates:
    """The recurrent layers' per-request state (``models/cache_spec.RecurrentState``), indexed
    by model layer (None for attention layers): ``conv[layer]`` ``[slots, *conv_shape]``,
    ``ssm[layer]`` ``[slots, *state_shape]`` float32; ``slots[i]`` is the state slot of
    ``ctx.sequences[i]``. A slot holds the state after the sequence's cached tokens when
    ``context_len > query_len``, else it is read as zeros; the layer writes the state after
    this step's tokens back into it."""

    conv: list[torch.Tensor | None]
    ssm: list[torch.Tensor | None]
    slots: torch.Tensor  # [S] int64, on the model's device
    # a pure-decode step over static buffers (``backends/hybrid_static.py``, a CUDA graph's):
    # [S] bool, whether row i's slot holds a state (its context_len > 1); every sequence is
    # then the one decode row i, and the layer reads no host lengths
    cached: torch.Tensor | None = None


@dataclass(frozen=True)
class PagedGroups:
    """Where layer groups page apart (hybrid layouts: full and sliding-window layers keep their
    own block tables, ``engine/kv_plan.py``): ``layer_group[layer]`` indexes ``slot_mapping``
    and ``sequences`` (None for a recurrent layer). Attention reads them via ``ctx.paged``."""

    layer_group: tuple[int | None, ...]
    slot_mapping: list[torch.Tensor]
    sequences: list[list[SequenceSlice]]


@dataclass(frozen=True)
class ForwardContext:
    """What one forward pass needs beyond token ids and positions."""

    k_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, kv_heads, head_dim]
    v_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [T] int64: flat slot (block * block_size + offset) per token
    sequences: list[SequenceSlice]  # read by the per-sequence path below
    logits_indices: torch.Tensor  # [S'] rows of the hidden states to turn into logits
    attention: AttentionBackend | None = None  # None → the per-sequence SDPA loop below
    states: RecurrentStates | None = None  # recurrent layers' state (hybrid models only)
    # per-group slots and tables where groups page apart; ``slot_mapping``/``sequences`` above
    # are then the first group's (the same positions and lengths, other block ids)
    groups: PagedGroups | None = None

    def paged(self, layer: int) -> tuple[torch.Tensor, list[SequenceSlice]]:
        """``layer``'s slot mapping and sequences (with its group's block tables): what every
        paged attention must read, rather than ``slot_mapping``/``sequences`` directly."""
        if self.groups is None:
            return self.slot_mapping, self.sequences
        g = self.groups.layer_group[layer]
        if g is None:
            raise ValueError(f"layer {layer} keeps recurrent state, not paged K/V")
        return self.groups.slot_mapping[g], self.groups.sequences[g]

    @property
    def block_size(self) -> int:
        return self.k_caches[0].shape[1]


def paged_attention(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None, *, window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply RoPE (when ``cos_sin`` is given), store this step's K/V, then attend each
    sequence over its cached context (the last ``window`` keys only, for a windowed layer).

    q: [T, Hq, D]; k, v: [T, Hk, D]. Returns [T, Hq, D]. Causal within the new tokens: the
    i-th new token of a sequence sees keys up to ``context_len - query_len + i`` (and from
    ``window - 1`` before it). A backend in ``ctx.attention`` may fuse RoPE with the cache
    writes; it attends over everything, so the model runner gives none to a step where a
    window masks (the per-sequence loop below does), unless the backend declares
    ``masks_windows`` (``backends/cuda_hybrid.py``): it is then given the layer's ``window``
    and ``sinks``. ``sinks`` [Hq] (gpt-oss): a learned logit per head that joins each
    softmax's denominator with no value; with any other backend such a layer takes the
    per-sequence loop.
    """
    if ctx.attention is not None and getattr(ctx.attention, "masks_windows", False):
        return ctx.attention(layer, q, k, v, ctx, cos_sin, window=window, sinks=sinks)
    if ctx.attention is not None and sinks is None:
        return ctx.attention(layer, q, k, v, ctx, cos_sin)
    if cos_sin is not None:
        q, k = apply_rope(q, k, cos_sin)
    k_cache, v_cache = ctx.k_caches[layer], ctx.v_caches[layer]
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    slot_mapping, sequences = ctx.paged(layer)
    if sinks is not None and not sequences and slot_mapping.numel():
        raise RuntimeError("attention sinks need the per-sequence path (ctx.sequences)")
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    out = torch.empty_like(q)
    for seq in sequences:
        attend_cached(q, k_cache, v_cache, seq, out, window, sinks)
    return out


def attend_cached(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  seq: SequenceSlice, out: torch.Tensor, window: int | None = None,
                  sinks: torch.Tensor | None = None) -> None:
    """``out``'s rows of ``seq`` = its (rotated) queries in ``q`` [T, Hq, D] attending over its
    context, already in the cache; causal within the new tokens; with ``sinks`` [Hq], each
    head's sink logit joins its softmax's denominator (``sink_attention.py``)."""
    rows = slice(seq.query_start, seq.query_start + seq.query_len)
    first = 0  # the first key read: past every block wholly before the first row's window
    if window is not None and window < seq.context_len:
        bs = k_cache.shape[1]
        first = max(0, seq.context_len - seq.query_len + 1 - window) // bs * bs
        mask = _window_mask(seq.query_len, seq.context_len, window, str(q.device), q.dtype,
                            first)
    else:
        mask = _causal_mask(seq, q.device, q.dtype)
    keys, values = _gather(k_cache, seq, first), _gather(v_cache, seq, first)
    if sinks is not None:
        if mask is None and seq.query_len > 1:  # a whole prefill: plain causal
            mask = _offset_causal_mask(seq.query_len, seq.context_len, str(q.device), q.dtype)
        out[rows] = attend_with_sinks(q[rows], keys.to(q.dtype), values.to(q.dtype), sinks, mask)
        return
    attn = F.scaled_dot_product_attention(
        q[rows].transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0).to(q.dtype),
        values.transpose(0, 1).unsqueeze(0).to(q.dtype),
        attn_mask=mask,
        is_causal=mask is None and seq.query_len > 1,
        enable_gqa=q.shape[1] > k_cache.shape[2],
    )
    out[rows] = attn[0].transpose(0, 1)


def _gather(cache: torch.Tensor, seq: SequenceSlice, first: int = 0) -> torch.Tensor:
    """``seq``'s cached entries from token ``first`` (a multiple of the block size) on."""
    bs = cache.shape[1]
    blocks = cache.index_select(0, seq.block_table[first // bs:])
    return blocks.view(-1, cache.shape[2], cache.shape[3])[: seq.context_len - first]


def _causal_mask(seq: SequenceSlice, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """None when SDPA's own flags suffice (decode, or a prefill with nothing cached)."""
    if seq.query_len == 1 or seq.query_len == seq.context_len:
        return None
    return _offset_causal_mask(seq.query_len, seq.context_len, str(device), dtype)


@functools.lru_cache(maxsize=8)
def _window_mask(query_len: int, context_len: int, window: int, device: str,
                 dtype: torch.dtype, first: int = 0) -> torch.Tensor:
    """Additive mask over keys ``first`` .. ``context_len - 1``: the i-th new token (absolute
    position p) sees keys p - window + 1 .. p."""
    offset = context_len - query_len
    rows = torch.arange(query_len, device=device).unsqueeze(1) + offset
    cols = torch.arange(first, context_len, device=device).unsqueeze(0)
    hidden = (cols > rows) | (cols <= rows - window)
    return torch.zeros(query_len, context_len - first, device=device, dtype=dtype).masked_fill_(
        hidden, float("-inf"))


@functools.lru_cache(maxsize=4)
def _offset_causal_mask(query_len: int, context_len: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask: the i-th new token sees keys up to ``context_len - query_len + i``.
    Cached: every layer of a step asks for the same one (building it per layer, and SDPA
    turning a boolean mask into a float one per call, cost ~6% of a CPU prefill)."""
    offset = context_len - query_len
    rows = torch.arange(query_len, device=device).unsqueeze(1) + offset
    cols = torch.arange(context_len, device=device).unsqueeze(0)
    return torch.zeros(query_len, context_len, device=device, dtype=dtype).masked_fill_(cols > rows, float("-inf"))


def gather_context(cache: torch.Tensor, seq: SequenceSlice) -> torch.Tensor:
    """``seq``'s cached entries of one layer, in order: [context_len, heads, dim]."""
    return _gather(cache, seq)


def sequence_mask(seq: SequenceSlice, device: torch.device, dtype: torch.dtype
                  ) -> torch.Tensor | None:
    """The additive causal mask of ``seq``'s new tokens over its context; None where SDPA's
    ``is_causal`` (a prefill with nothing cached) or no mask (one token) does it."""
    return _causal_mask(seq, device, dtype)
