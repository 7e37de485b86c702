"""Recurrent layers' state: a slot per running request, and checkpoints for prefix hits.

A recurrent layer (Gated DeltaNet, Mamba) keeps no per-token cache: its state after token ``p``
cannot be rebuilt from blocks, so a prefix hit needs a copy of the state at exactly the hit
point. The scheduler ends prefill chunks at checkpoint positions (multiples of ``interval``, a
multiple of the block size, and the prompt's last full block; a chunk spanning several ends at
its last one, so checkpoints are an interval apart or a step's budget apart, whichever is
more); after such a chunk the runner
copies the slot into a checkpoint, registered under the prefix hash of the blocks before it
(the same hash chain as the blocks'). Checkpoints live in a bounded pool with the blocks' rules
(``BlockPool``): ref counted while being written or restored, then free but still findable,
evicted LRU, a session's (``retain_prefix``) after everyone else's.
"""

from __future__ import annotations

from pensieve.engine.block_pool import BlockPool


class StateCheckpoints:
    def __init__(self, num_slots: int, num_checkpoints: int, interval: int, block_size: int) -> None:
        if num_slots < 1:
            raise ValueError("recurrent layers need at least one state slot")
        self.interval = interval
        self.block_size = block_size
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self.num_slots = num_slots
        self.pool = BlockPool(num_checkpoints) if num_checkpoints > 0 else None

    # slots: the running requests' live state
    def take_slot(self) -> int:
        if not self._free_slots:
            raise RuntimeError("no recurrent state slot free: more requests run than max_num_seqs")
        return self._free_slots.pop()

    def give_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    # checkpoints: the state at block-aligned prefix positions
    def lookup(self, prefix_hash: bytes) -> int | None:
        return self.pool.lookup(prefix_hash) if self.pool is not None else None

    def take(self, checkpoint: int) -> None:
        """Hold a checkpoint found by ``lookup`` until it is restored into a slot."""
        assert self.pool is not None
        self.pool.touch(checkpoint)

    def new(self) -> int | None:
        """A checkpoint to write (evicting the least recently used free one); None when every
        checkpoint is held or there are none: the state is then simply not kept."""
        if self.pool is None or self.pool.num_free == 0:
            return None
        return self.pool.allocate(1)[0]

    def register(self, checkpoint: int, prefix_hash: bytes) -> None:
        assert self.pool is not None
        self.pool.register(checkpoint, prefix_hash)

    def release(self, checkpoint: int, retain: bool = False) -> None:
        assert self.pool is not None
        self.pool.release([checkpoint], retain=retain)

    def last_boundary(self, start: int, end: int, prompt_len: int) -> int | None:
        """The last checkpoint position in ``(start, end]``: a multiple of the interval or the
        prompt's last full block; None where there is none. A chunk is cut there, so one
        chunk costs one checkpoint and a budget above the interval is not split into many."""
        prompt_end = prompt_len // self.block_size * self.block_size
        if start < prompt_end <= end:
            return prompt_end
        if self.interval and end // self.interval * self.interval > start:
            return end // self.interval * self.interval
        return None

    def is_boundary(self, position: int, prompt_len: int) -> bool:
        if position <= 0 or position % self.block_size:
            return False
        return (self.interval > 0 and position % self.interval == 0) or \
            position == prompt_len // self.block_size * self.block_size

    def forget_free(self) -> None:
        if self.pool is not None:
            self.pool.forget_free()

    @property
    def num_cached(self) -> int:
        return self.pool.num_cached if self.pool is not None else 0
