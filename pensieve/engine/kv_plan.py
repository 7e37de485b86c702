"""How a model's layers group for the KV manager: one group per cache policy.

Layers that keep the same kind of cache share one block table per request (vLLM's KV cache
groups): every full-attention layer (latent ones included: they page like any other) is one
group, the layers of one sliding window another, and the recurrent layers a third (a state slot
per request instead of blocks). A window as long as the served context masks nothing and frees
nothing: such layers count as full attention. The runner sizes each group and hands the plan to
the engine (``ModelRunner.cache_plan``); a plan of one full-attention group is the classic
single-table layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pensieve.models.cache_spec import LayerCache, PagedKV, RecurrentState

FULL, WINDOW, RECURRENT = "full", "window", "recurrent"


@dataclass(frozen=True)
class GroupPlan:
    """One cache policy's layers. ``num_blocks``: its pool's blocks (paged groups; a windowed
    group's tables point freed positions at one more, zeroed, block: index ``num_blocks``)."""

    kind: str  # FULL, WINDOW or RECURRENT
    layers: tuple[int, ...]
    window: int | None = None
    num_blocks: int = 0


@dataclass(frozen=True)
class CachePlan:
    """The groups, first the one whose table is ``Request.block_ids`` (full attention where a
    model has any), and the recurrent layers' state slots and checkpoints."""

    groups: tuple[GroupPlan, ...]
    block_size: int
    state_slots: int = 0  # one per running request
    checkpoints: int = 0  # recurrent state copies kept for prefix hits
    checkpoint_interval: int = 0  # tokens between checkpoints (a multiple of block_size)

    def __post_init__(self) -> None:
        if not self.paged:
            raise ValueError("a model needs at least one attention layer")
        if self.checkpoint_interval % self.block_size:
            raise ValueError(f"the checkpoint interval ({self.checkpoint_interval}) must be a "
                             f"multiple of the block size ({self.block_size})")

    @property
    def paged(self) -> tuple[GroupPlan, ...]:
        return tuple(g for g in self.groups if g.kind != RECURRENT)

    @property
    def recurrent(self) -> GroupPlan | None:
        return next((g for g in self.groups if g.kind == RECURRENT), None)

    @property
    def single_table(self) -> bool:
        """One full-attention group, nothing else: the classic layout."""
        return len(self.groups) == 1 and self.groups[0].kind == FULL


def group_layers(layout: Sequence[LayerCache], context_length: int
                 ) -> list[tuple[str, int | None, tuple[int, ...]]]:
    """``(kind, window, layers)`` per group, full attention first, then windows by size,
    then the recurrent layers."""
    keys: dict[tuple[int, str, int], list[int]] = {}
    for i, spec in enumerate(layout):
        if isinstance(spec, RecurrentState):
            key = (2, RECURRENT, 0)
        elif isinstance(spec, PagedKV) and spec.window is not None and spec.window < context_length:
            key = (1, WINDOW, spec.window)
        elif isinstance(spec, PagedKV):
            key = (0, FULL, 0)
        else:
            raise TypeError(f"layer {i}: unknown cache spec {spec!r}")
        keys.setdefault(key, []).append(i)
    return [(kind, window if kind == WINDOW else None, tuple(layers))
            for (_, kind, window), layers in sorted(keys.items())]


def uniform_full(layout: Sequence[LayerCache], context_length: int) -> bool:
    """Every layer the same full-attention K/V (no windows that mask, no latent, no state):
    what the fast paths (CPU one-call decoder, compiled paged kernels, CUDA graphs) assume."""
    first = layout[0] if layout else None
    return isinstance(first, PagedKV) and not first.latent and all(
        isinstance(s, PagedKV) and (s.window is None or s.window >= context_length)
        and (s.kv_heads, s.head_dim, s.v_head_dim) == (first.kv_heads, first.head_dim, first.v_head_dim)
        for s in layout)


def first_live_block(position: int, window: int, block_size: int) -> int:
    """The first block a query at ``position`` still reads in a ``window``-token layer."""
    return max(0, position - window + 1) // block_size


WINDOW_RESUME_SPAN = 4  # a windowed group keeps the window before every 4 windows at most


def window_resume_interval(window: int, interval: int) -> int:
    """Tokens between the points before which a windowed group keeps its window for later hits:
    the checkpoint interval, stretched to a multiple of it spanning ``WINDOW_RESUME_SPAN``
    windows, so at most about a quarter of a long prompt's window blocks stay cached (0: the
    prompt's end only)."""
    if interval <= 0:
        return 0
    return -(-WINDOW_RESUME_SPAN * window // interval) * interval if window > interval // WINDOW_RESUME_SPAN \
        else interval
