"""The runner's tensors for layouts that are not one uniform full-attention cache.

From a family's ``cache_layout`` (``models/cache_spec.py``): per-layer K/V shapes (latent layers:
K only, V an empty placeholder), one block pool per layer group (``engine/kv_plan.py``), the
recurrent layers' state slots and checkpoints. Each step it builds the ``ForwardContext`` with
every group's slots and block tables (``PagedGroups``) and the state slots, copies a restored
checkpoint into a request's slot before its first chunk and the slot into a checkpoint after a
chunk that ends on a checkpoint position. The fast paths (one-call CPU decoder, compiled
paged kernels, CUDA graphs) assume one uniform cache; the runner's ``attend`` may give a
backend per step (on CUDA ``cuda_hybrid.py``'s batched kernels per group), else the
per-sequence path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from pensieve.engine.config import EngineConfig
from pensieve.engine.kv_groups import NULL_BLOCK
from pensieve.engine.kv_plan import (
    RECURRENT, WINDOW, CachePlan, GroupPlan, group_layers, window_resume_interval,
)
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.models.cache_spec import LayerCache, PagedKV, RecurrentState
from pensieve.models.forward_context import (
    AttentionBackend, ForwardContext, PagedGroups, RecurrentStates, SequenceSlice,
)

log = logging.getLogger(__name__)
STATE_DTYPE = torch.float32
MAX_CHECKPOINTS = 256
CHECKPOINT_SHARE = 4  # by default checkpoints may take 1/4 of the KV budget


def state_bytes(layout: Sequence[LayerCache]) -> int:
    """Bytes of one request's recurrent state (= one checkpoint)."""
    return sum(sum(s.elements()) for s in layout if isinstance(s, RecurrentState)) * \
        torch.empty((), dtype=STATE_DTYPE).element_size()


def group_block_bytes(layout: Sequence[LayerCache], layers: Sequence[int], block_size: int,
                      dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(layout[i].token_elements() for i in layers
               if isinstance(layout[i], PagedKV)) * block_size * size


def plan_cache(layout: Sequence[LayerCache], config: EngineConfig, budget: int) -> CachePlan:
    """Blocks per group, state slots and checkpoints within ``budget`` bytes.

    The first paged group gets enough blocks for one full context at least, up to every seat's
    full context; another windowed group gets what the running requests' windows and chunks
    need plus, for prefix hits, about the share of blocks in the windows before the resume
    points (``window / window_resume_interval`` of the first group's, at most about a
    quarter). ``num_kv_blocks`` sets every paged group.
    """
    bs, dtype = config.block_size, config.kv_dtype or config.dtype
    grouped = group_layers(layout, config.context_length)
    interval = config.state_checkpoint_interval
    per_state = state_bytes(layout)
    recurrent = any(kind == RECURRENT for kind, _, _ in grouped)
    slots = config.max_num_seqs if recurrent else 0
    if not recurrent:
        checkpoints = 0
    elif config.state_checkpoints is not None:
        checkpoints = config.state_checkpoints
    else:
        checkpoints = min(MAX_CHECKPOINTS, max(4, budget // CHECKPOINT_SHARE // max(per_state, 1)))
    paged = [(kind, window, layers) for kind, window, layers in grouped if kind != RECURRENT]
    if not paged:  # the prefix cache, checkpoints and accounting all count attention blocks
        raise ValueError(f"every one of the model's {len(layout)} layers keeps recurrent state; "
                         "Pensieve serves hybrid models with at least one attention layer")
    costs = [group_block_bytes(layout, layers, bs, dtype) for _, _, layers in paged]
    per_seq = -(-config.context_length // bs)
    if config.num_kv_blocks is not None:
        counts = [config.num_kv_blocks] * len(paged)
    else:
        live, share = [], []
        for kind, window, _ in paged[1:]:
            if kind == WINDOW and window is not None:
                chunk = -(-config.max_num_batched_tokens // bs)
                live.append(config.max_num_seqs * (-(-window // bs) + chunk + 1))
                every = window_resume_interval(window, interval)
                share.append(min(1.0, (window + bs) / every) if every else 0.0)
            else:
                live.append(0)
                share.append(1.0)
        left = budget - (slots + checkpoints) * per_state - sum(n * c for n, c in zip(live, costs[1:]))
        unit = costs[0] + sum(s * c for s, c in zip(share, costs[1:]))
        n = max(per_seq, min(int(left // max(unit, 1)), per_seq * config.max_num_seqs))
        counts = [n] + [min(n, lv + int(s * n + 0.999)) for lv, s in zip(live, share)]
    groups = []
    counted = iter(counts)
    for kind, window, layers in grouped:
        groups.append(GroupPlan(kind, layers, window, 0 if kind == RECURRENT else next(counted)))
    return CachePlan(tuple(groups), bs, slots, checkpoints, interval if recurrent or
                     any(k == WINDOW for k, _, _ in grouped) else 0)


AttentionFor = Callable[[Sequence[int | None], list[list[SequenceSlice]], list[torch.Tensor]],
                        "AttentionBackend | None"]


@dataclass(frozen=True)
class GroupedAttention:
    """An attention backend per layer group (each built over its group's block tables): a
    layer's call goes to its group's, over a context with that group's slots and sequences."""

    layer_group: Sequence[int | None]
    backends: list[AttentionBackend]
    slot_mapping: list[torch.Tensor]
    sequences: list[list[SequenceSlice]]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: ForwardContext,
                 cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        g = self.layer_group[layer]
        assert g is not None
        own = replace(ctx, slot_mapping=self.slot_mapping[g], sequences=self.sequences[g],
                      groups=None, attention=None)
        return self.backends[g](layer, q, k, v, own, cos_sin)


class HybridCaches:
    """Per-layer caches of a hybrid layout and the step's context over them."""

    def __init__(self, layout: Sequence[LayerCache], plan: CachePlan, config: EngineConfig,
                 device: torch.device) -> None:
        self.plan, self.device, self.block_size = plan, device, config.block_size
        dtype, bs = config.kv_dtype or config.dtype, config.block_size
        n = len(layout)
        self.k_caches: list[torch.Tensor] = [torch.empty(0, bs, 0, 0, dtype=dtype, device=device)] * n
        self.v_caches: list[torch.Tensor] = list(self.k_caches)
        self.layer_group: list[int | None] = [None] * n
        self.null_blocks: list[int] = []
        # past the pool's blocks: a null block (zeroed, never written: freed window blocks point
        # at it) and a scratch block, where the static decode step's padding rows write
        self.scratch_blocks: list[int] = []
        for g, group in enumerate(plan.paged):
            self.null_blocks.append(group.num_blocks)
            self.scratch_blocks.append(group.num_blocks + 1)
            for layer in group.layers:
                spec = layout[layer]
                assert isinstance(spec, PagedKV)
                shape = (group.num_blocks + 2, bs, spec.kv_heads)
                k = torch.empty(*shape, spec.head_dim, dtype=dtype, device=device)
                v = torch.empty(*shape, spec.v_head_dim, dtype=dtype, device=device)
                k[-2:].zero_()
                v[-2:].zero_()
                self.k_caches[layer], self.v_caches[layer] = k, v
                self.layer_group[layer] = g
        self.conv: list[torch.Tensor | None] = [None] * n
        self.ssm: list[torch.Tensor | None] = [None] * n
        self.saved_conv: list[torch.Tensor | None] = [None] * n
        self.saved_ssm: list[torch.Tensor | None] = [None] * n
        rec: GroupPlan | None = plan.recurrent
        # one state slot past the running requests': the static decode step's padding rows
        self.scratch_slot = plan.state_slots
        for layer in rec.layers if rec is not None else ():
            spec = layout[layer]
            assert isinstance(spec, RecurrentState)
            f32 = dict(dtype=STATE_DTYPE, device=device)
            self.conv[layer] = torch.zeros(plan.state_slots + 1, *spec.conv_shape, **f32)
            self.ssm[layer] = torch.zeros(plan.state_slots + 1, *spec.state_shape, **f32)
            self.saved_conv[layer] = torch.empty(plan.checkpoints, *spec.conv_shape, **f32)
            self.saved_ssm[layer] = torch.empty(plan.checkpoints, *spec.state_shape, **f32)
        self.recurrent_layers = [i for i in range(n) if self.conv[i] is not None]
        per_state = state_bytes(layout)
        log.info("hybrid KV cache: %s; %d state slots and %d checkpoints of %.2f MiB each, "
                 "one every %d tokens (and at each prompt's last full block)",
                 ", ".join(f"{g.kind}{'' if g.window is None else f'({g.window})'} "
                           f"{len(g.layers)} layers {g.num_blocks} blocks" if g.kind != RECURRENT
                           else f"recurrent {len(g.layers)} layers" for g in plan.groups),
                 plan.state_slots, plan.checkpoints, per_state / 2**20, plan.checkpoint_interval)

    def run(self, model: nn.Module, chunks: list[ScheduledChunk],
            attend: AttentionFor | None = None) -> torch.Tensor:
        """One step; ``attend`` may give an attention backend for the step's per-group
        sequences and slot mappings (None: the per-sequence path)."""
        bs, groups = self.block_size, len(self.plan.paged)
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        slots: list[list[int]] = [[] for _ in range(groups)]
        sequences: list[list[SequenceSlice]] = [[] for _ in range(groups)]
        state_slots: list[int] = []
        for chunk in chunks:
            req, start = chunk.request, chunk.request.num_computed_tokens
            end, q_start = start + chunk.num_tokens, len(ids)
            ids.extend(req.all_ids[start:end])
            positions.extend(range(start, end))
            tables = req.cache.tables if req.cache is not None else [req.block_ids]
            for g, table in enumerate(tables):
                slots[g].extend(table[p // bs] * bs + p % bs for p in range(start, end))
                blocks = [b if b != NULL_BLOCK else self.null_blocks[g] for b in table[: -(-end // bs)]]
                sequences[g].append(SequenceSlice(q_start, chunk.num_tokens, end, self._tensor(blocks)))
            if chunk.completes:
                rows.append(len(ids) - 1)
            if self.recurrent_layers:
                assert req.cache is not None and req.cache.slot is not None
                state_slots.append(req.cache.slot)
        self.restore(chunks)
        slot_tensors = [self._tensor(s) for s in slots]
        states = None
        if self.recurrent_layers:
            states = RecurrentStates(self.conv, self.ssm, self._tensor(state_slots))
        ctx = ForwardContext(
            k_caches=self.k_caches, v_caches=self.v_caches, slot_mapping=slot_tensors[0],
            sequences=sequences[0], logits_indices=self._tensor(rows), states=states,
            groups=PagedGroups(tuple(self.layer_group), slot_tensors, sequences) if groups > 1 else None,
            attention=attend(self.layer_group, sequences, slot_tensors) if attend is not None else None,
        )
        logits = model(self._tensor(ids), self._tensor(positions), ctx)
        self.save(chunks)
        return logits

    def restore(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Before a step: a restored checkpoint into the state slot of a request's first chunk."""
        for chunk in chunks:
            cache = chunk.request.cache
            if self.recurrent_layers and cache is not None and cache.restore is not None:
                assert cache.slot is not None
                self._copy(cache.restore, cache.slot, into_slot=True)

    def save(self, chunks: Sequence[ScheduledChunk]) -> None:
        """After a step: the state slot into a checkpoint where a chunk ended on one."""
        for chunk in chunks:
            cache = chunk.request.cache
            if cache is not None and cache.save is not None and cache.slot is not None:
                self._copy(cache.save, cache.slot, into_slot=False)

    def _copy(self, checkpoint: int, slot: int, into_slot: bool) -> None:
        for layer in self.recurrent_layers:
            for live, saved in ((self.conv[layer], self.saved_conv[layer]),
                                (self.ssm[layer], self.saved_ssm[layer])):
                assert live is not None and saved is not None
                if into_slot:
                    live[slot].copy_(saved[checkpoint])
                else:
                    saved[checkpoint].copy_(live[slot])

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
