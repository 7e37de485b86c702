"""Which KV blocks are free, which hold a cached prefix, and which to evict first.

Every block is either held (ref count ≥ 1) or free (ref count 0, in a free queue). A free
block may still hold a full block of some prefix — its content hash stays registered, so a
later request with the same prefix takes it back instead of recomputing. Allocation takes
free blocks in LRU order from the ordinary queue first and from the retained queue (blocks of
prompts that asked for caching) last, so side requests do not evict a session's prefix.
"""

from __future__ import annotations

from collections import OrderedDict


class OutOfBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._ordinary: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._retained: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        return len(self._ordinary) + len(self._retained)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (ref count 1); evicts cached content they held."""
        if n > self.num_free:
            raise OutOfBlocksError(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            queue = self._ordinary if self._ordinary else self._retained
            block, _ = queue.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def lookup(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def touch(self, block: int) -> None:
        """Take a reference to a block found by ``lookup`` (held or free)."""
        if self._refs[block] == 0:
            self._ordinary.pop(block, None)
            self._retained.pop(block, None)
        self._refs[block] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """Record that a held block now holds the full block with this hash."""
        if self._hash[block] is None and block_hash not in self._by_hash:
            self._hash[block] = block_hash
            self._by_hash[block_hash] = block

    def release(self, blocks: list[int], retain: bool = False, forget: bool = False) -> None:
        """Drop one reference to each; blocks reaching zero become free (most recent last).
        ``forget``: their content is of no further use (a window's past): dropped, and the
        blocks are the first to be reused."""
        for b in blocks:
            if self._refs[b] < 1:
                raise ValueError(f"block {b} released more often than held")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if forget:
                    self._forget(b)
                    self._ordinary[b] = None
                    self._ordinary.move_to_end(b, last=False)
                    continue
                queue = self._retained if retain and self._hash[b] is not None else self._ordinary
                queue[b] = None

    def forget_free(self) -> None:
        """Drop the cached content of every free block (after a warm-up's synthetic requests)."""
        for block in [*self._ordinary, *self._retained]:
            self._forget(block)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def _forget(self, block: int) -> None:
        h = self._hash[block]
        if h is not None:
            del self._by_hash[h]
            self._hash[block] = None
