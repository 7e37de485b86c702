"""Where a request's KV lives: its block table, prefix-cache hits and newly cached blocks.

Full blocks are identified by a hash chain: block i's hash covers its tokens and block
i-1's hash, so equal hashes mean equal whole prefixes. Hits are shared (ref counted) across
requests and sessions; the ``BlockPool`` decides what to evict.
"""

from __future__ import annotations

import hashlib
from array import array

from pensieve.engine.block_pool import BlockPool
from pensieve.engine.request import Request


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_cache: bool = True) -> None:
        self.pool = pool
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache

    def match_prefix(self, req: Request) -> int:
        """Attach cached blocks of the request's longest cached prefix; returns tokens hit.

        At least one token is always left to compute, since its logits are needed.
        """
        if not self.enable_prefix_cache or req.block_ids:
            return 0
        bs, ids = self.block_size, req.all_ids
        max_blocks = (len(ids) - 1) // bs
        parent = b""
        for i in range(max_blocks):
            h = block_hash(parent, ids[i * bs : (i + 1) * bs])
            block = self.pool.lookup(h)
            if block is None:
                break
            self.pool.touch(block)
            req.block_ids.append(block)
            req.block_hashes.append(h)
            parent = h
        hit = len(req.block_ids) * bs
        req.num_computed_tokens = hit
        if req.num_cached_tokens == 0:  # keep the first admission's figure across preemption
            req.num_cached_tokens = hit
        return hit

    def chunk_tokens(self, req: Request, n: int) -> int:
        """Where the next chunk of ``n`` tokens must end early (never, with one table)."""
        return n

    def reserve(self, req: Request, num_new_tokens: int) -> bool:
        """Make sure ``req`` has blocks for its next ``num_new_tokens`` tokens."""
        total = req.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size) - len(req.block_ids)
        if needed <= 0:
            return True
        if needed > self.pool.num_free:
            return False
        req.block_ids.extend(self.pool.allocate(needed))
        return True

    def commit(self, req: Request) -> None:
        """Register the request's newly filled blocks in the prefix cache."""
        if not self.enable_prefix_cache:
            return
        bs, ids = self.block_size, None
        # a step in flight has computed tokens the host cannot hash yet: they wait for the next commit
        num_full = min(req.num_computed_tokens, req.num_known_tokens) // bs
        for i in range(len(req.block_hashes), num_full):
            ids = ids or req.all_ids
            parent = req.block_hashes[-1] if req.block_hashes else b""
            h = block_hash(parent, ids[i * bs : (i + 1) * bs])
            self.pool.register(req.block_ids[i], h)
            req.block_hashes.append(h)

    def free(self, req: Request) -> None:
        """Release the request's blocks, tail first so a prefix's end is evicted before its start."""
        self.pool.release(list(reversed(req.block_ids)), retain=req.params.retain_prefix)
        req.block_ids = []
        req.block_hashes = []

    def forget_free(self) -> None:
        """Drop every free block's cached content (after a warm-up's synthetic requests)."""
        self.pool.forget_free()

    def num_free_for(self, num_requests: int) -> bool:
        """Whether there is a block for each of ``num_requests`` decodes."""
        return self.pool.num_free >= num_requests
