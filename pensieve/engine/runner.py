"""What the engine needs from a backend: run a scheduled step over its KV cache, give logits.

The engine schedules in tokens and blocks and samples from logits; it never sees a model, a
device kernel or an HTTP peer. Backends (``backends/model_runner.py`` for PyTorch on CPU and
CUDA; MLX and upstream servers later) implement this protocol, and the CLI composes a runner
with an ``Engine``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from pensieve.engine.scheduler import ScheduledChunk


@runtime_checkable
class Runner(Protocol):
    """Runs one engine step's chunks; owns the KV cache behind the block ids it is given.

    Invariants: block ids handed out by the engine's pool are ``0 .. num_blocks - 1``; a chunk
    covers tokens ``[request.num_computed_tokens, + num_tokens)`` and its slots are the
    request's ``block_ids``; ``run`` returns float logits ``[S, vocab]`` for the chunks that
    complete (``chunk.completes``), in their order, on ``device``.
    """

    num_blocks: int
    device: torch.device
    # optional ``cache_plan`` (``engine/kv_plan.CachePlan``): a runner whose layers do not all
    # keep the same full-attention K/V says how they group; the engine then keeps one policy
    # per group (``engine/kv_groups.py``) and ``num_blocks`` is the first group's

    def can_carry(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether ``run`` can take these chunks' input ids from a device tensor (the previous
        step's sampled ids, not read by the host yet): what async scheduling needs."""
        ...

    def run(self, chunks: list[ScheduledChunk], carried: torch.Tensor | None = None,
            carried_rows: Sequence[int] = ()) -> torch.Tensor:
        """Run one step. With ``carried``, chunk ``i`` with ``carried_rows[i] >= 0`` is a
        one-token decode of ``carried[carried_rows[i]]``."""
        ...
