"""The KV manager of hybrid layouts: one policy per layer group behind the scheduler's interface.

Same interface as ``KVCacheManager`` (``match_prefix``, ``chunk_tokens``, ``reserve``,
``commit``, ``free``), over the groups of a ``CachePlan`` (``engine/kv_plan.py``):

- full attention (latent included): a block table per request, prefix-cached as before;
- sliding window: a block table whose blocks that left the window are given back to the pool
  while the request runs (``NULL_BLOCK`` takes their place in the table). What a later prefix
  hit at position P needs is the window before P; the blocks of the window before every
  resume point (each multiple of ``window_resume_interval`` — the checkpoint interval, or a
  multiple of it spanning 4 windows — and the prompt's last full block) are
  released into the pool still registered under their hash (evictable, found again by a hit),
  the others are released forgotten, first in line for reuse;
- recurrent state: a state slot per running request and state checkpoints
  (``engine/state_checkpoints.py``).

All groups hash blocks with one chain (``kv_manager.block_hash``). A prefix hit is the longest
block-aligned prefix every group can serve: the full groups' blocks all cached, each windowed
group's blocks of the window before the hit cached, and a state checkpoint at exactly the hit
point. What the runner needs per request is in ``Request.cache`` (``RequestCache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pensieve.engine.block_pool import BlockPool
from pensieve.engine.kv_manager import KVCacheManager, block_hash
from pensieve.engine.kv_plan import FULL, WINDOW, CachePlan, first_live_block, window_resume_interval
from pensieve.engine.request import Request
from pensieve.engine.state_checkpoints import StateCheckpoints

NULL_BLOCK = -1  # a table entry whose block was freed (outside the window): the runner reads zeros


@dataclass
class RequestCache:
    """One request's place in the groups. ``tables[0]`` is ``Request.block_ids``."""

    tables: list[list[int]]  # per paged group, in the plan's order
    freed: list[int]  # per paged group: entries before this index are NULL_BLOCK (windows)
    slot: int | None = None  # recurrent state slot
    restore: int | None = None  # checkpoint the runner copies into the slot before the next chunk
    save: int | None = None  # checkpoint the runner copies the slot into after this chunk
    save_at: int = 0  # the position ``save`` holds the state of
    pending: list[tuple[int, int]] = field(default_factory=list)  # (position, checkpoint) unhashed


class GroupedKVManager:
    def __init__(self, plan: CachePlan, enable_prefix_cache: bool = True) -> None:
        self.plan = plan
        self.block_size = plan.block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.groups = plan.paged
        self.pools = [BlockPool(g.num_blocks) for g in self.groups]
        self.pool = self.pools[0]  # the engine's figures (free blocks, /metrics)
        self.windows = [g.window if g.kind == WINDOW else None for g in self.groups]
        self.full = [i for i, g in enumerate(self.groups) if g.kind == FULL]
        rec = plan.recurrent
        self.states = None if rec is None else StateCheckpoints(
            plan.state_slots, plan.checkpoints, plan.checkpoint_interval, plan.block_size)
        # windowed groups keep the window before each multiple of these for later hits
        self.resume_intervals = [0 if w is None else window_resume_interval(w, plan.checkpoint_interval)
                                 for w in self.windows]

    # ---- admission ------------------------------------------------------------------------
    def match_prefix(self, req: Request) -> int:
        """Attach the request's longest prefix every group can serve; returns tokens hit (at
        least one token is always left to compute)."""
        if req.cache is not None:
            return 0
        req.cache = RequestCache([req.block_ids] + [[] for _ in self.groups[1:]],
                                 [0] * len(self.groups))
        if self.states is not None:
            req.cache.slot = self.states.take_slot()
        hit = self._attach(req) if self.enable_prefix_cache else 0
        req.num_computed_tokens = hit
        if req.num_cached_tokens == 0:  # keep the first admission's figure across preemption
            req.num_cached_tokens = hit
        return hit

    def _attach(self, req: Request) -> int:
        bs, ids = self.block_size, req.all_ids
        hashes: list[bytes] = []
        parent = b""
        for i in range((len(ids) - 1) // bs):
            parent = block_hash(parent, ids[i * bs:(i + 1) * bs])
            hashes.append(parent)
        n = len(hashes)
        for g in self.full:  # contiguous from the start
            pool = self.pools[g]
            n = next((i for i in range(n) if pool.lookup(hashes[i]) is None), n)
        while n > 0 and not self._serves(hashes, n):
            n -= 1
        if n == 0:
            return 0
        cache = req.cache
        assert cache is not None
        for g, pool in enumerate(self.pools):
            first = 0 if self.windows[g] is None else first_live_block(n * bs, self.windows[g], bs)
            table = cache.tables[g]
            table.extend([NULL_BLOCK] * first)
            for h in hashes[first:n]:
                block = pool.lookup(h)
                assert block is not None
                pool.touch(block)
                table.append(block)
            cache.freed[g] = first
        if self.states is not None:
            checkpoint = self.states.lookup(hashes[n - 1])
            assert checkpoint is not None
            self.states.take(checkpoint)
            cache.restore = checkpoint
        req.block_hashes = hashes[:n]
        return n * bs

    def _serves(self, hashes: list[bytes], n: int) -> bool:
        """Whether every windowed group has the window before block ``n`` and the recurrent
        layers a checkpoint there."""
        if self.states is not None and self.states.lookup(hashes[n - 1]) is None:
            return False
        for g, window in enumerate(self.windows):
            if window is not None:
                first = first_live_block(n * self.block_size, window, self.block_size)
                if any(self.pools[g].lookup(h) is None for h in hashes[first:n]):
                    return False
        return True

    # ---- scheduling -----------------------------------------------------------------------
    def chunk_tokens(self, req: Request, n: int) -> int:
        """``n`` cut so that a prefill chunk ends at the last checkpoint position it reaches
        (the state is copied there after the step)."""
        if self.states is None or n <= 1:
            return n
        start = req.num_computed_tokens
        cut = self.states.last_boundary(start, start + n, len(req.prompt_ids))
        return n if cut is None else cut - start

    def reserve(self, req: Request, num_new_tokens: int) -> bool:
        """Make sure every group has blocks for the request's next ``num_new_tokens`` tokens
        (all or nothing), and a checkpoint to save into where the chunk ends on a boundary."""
        cache = req.cache
        assert cache is not None, "match_prefix first"
        total = req.num_computed_tokens + num_new_tokens
        want = -(-total // self.block_size)
        needs = [want - len(t) for t in cache.tables]
        if any(need > pool.num_free for need, pool in zip(needs, self.pools)):
            return False
        for need, pool, table in zip(needs, self.pools, cache.tables):
            if need > 0:
                table.extend(pool.allocate(need))
        states = self.states
        if (states is not None and cache.save is None and self.enable_prefix_cache
                and states.is_boundary(total, len(req.prompt_ids))):
            cache.save = states.new()
            cache.save_at = total
        return True

    def commit(self, req: Request) -> None:
        """After a step: hash the newly full blocks into every group's pool, register the
        checkpoints whose hash is known, give back blocks that left the windows."""
        cache = req.cache
        if cache is None:
            return
        if self.enable_prefix_cache:
            bs, ids = self.block_size, None
            num_full = min(req.num_computed_tokens, req.num_known_tokens) // bs
            for i in range(len(req.block_hashes), num_full):
                ids = ids or req.all_ids
                parent = req.block_hashes[-1] if req.block_hashes else b""
                h = block_hash(parent, ids[i * bs:(i + 1) * bs])
                for pool, table in zip(self.pools, cache.tables):
                    if table[i] != NULL_BLOCK:
                        pool.register(table[i], h)
                req.block_hashes.append(h)
        if self.states is not None:
            self._commit_states(req, cache)
        for g, window in enumerate(self.windows):
            if window is not None:
                self._slide(req, cache, g, window)

    def _commit_states(self, req: Request, cache: RequestCache) -> None:
        states = self.states
        assert states is not None
        if cache.restore is not None:  # the runner copied it into the slot in this step
            states.release(cache.restore)
            cache.restore = None
        if cache.save is not None:  # the runner copied the slot into it after this step
            cache.pending.append((cache.save_at, cache.save))
            cache.save = None
        keep = []
        for position, checkpoint in cache.pending:
            index = position // self.block_size - 1
            if index < len(req.block_hashes):
                states.register(checkpoint, req.block_hashes[index])
                states.release(checkpoint, retain=req.params.retain_prefix)
            else:
                keep.append((position, checkpoint))
        cache.pending = keep

    def _slide(self, req: Request, cache: RequestCache, g: int, window: int) -> None:
        """Give back the blocks no query of this request reads any more."""
        bs, table, pool = self.block_size, cache.tables[g], self.pools[g]
        first = min(first_live_block(req.num_computed_tokens, window, bs), len(table))
        for i in range(cache.freed[g], first):
            block, table[i] = table[i], NULL_BLOCK
            if block == NULL_BLOCK:
                continue
            if i < len(req.block_hashes) and self._resumes(req, i, window, self.resume_intervals[g]):
                pool.release([block], retain=req.params.retain_prefix)
            else:
                pool.release([block], forget=True)
        cache.freed[g] = max(cache.freed[g], first)

    def _resumes(self, req: Request, i: int, window: int, interval: int) -> bool:
        """Whether block ``i`` is in the window before a resume point the request reached (a
        multiple of ``interval``, or its prompt's last full block)."""
        bs, reached = self.block_size, req.num_computed_tokens
        points = [len(req.prompt_ids) // bs * bs]
        if interval:
            points.append(-(-(i + 1) * bs // interval) * interval)
        return any((i + 1) * bs <= p <= reached and first_live_block(p, window, bs) <= i
                   for p in points)

    # ---- the end --------------------------------------------------------------------------
    def free(self, req: Request) -> None:
        """Release everything the request holds, tail first (a prefix's end is evicted before
        its start); hashed blocks and checkpoints stay findable until evicted."""
        cache = req.cache
        if cache is None:
            return
        retain = req.params.retain_prefix
        for pool, table in zip(self.pools, cache.tables):
            pool.release([b for b in reversed(table) if b != NULL_BLOCK], retain=retain)
        states = self.states
        if states is not None:
            if cache.slot is not None:
                states.give_slot(cache.slot)
            if cache.restore is not None:
                states.release(cache.restore)
            unhashed = [c for _, c in cache.pending] + ([cache.save] if cache.save is not None else [])
            for checkpoint in unhashed:
                states.release(checkpoint)
        req.cache = None
        req.block_ids = []
        req.block_hashes = []

    def forget_free(self) -> None:
        """Drop every free block's and checkpoint's cached content (after a warm-up)."""
        for pool in self.pools:
            pool.forget_free()
        if self.states is not None:
            self.states.forget_free()

    def num_free_for(self, num_requests: int) -> bool:
        """Whether every group has a block for each of ``num_requests`` decodes."""
        return all(pool.num_free >= num_requests for pool in self.pools)


def kv_manager_for(plan: CachePlan | None, num_blocks: int, block_size: int,
                   enable_prefix_cache: bool) -> KVCacheManager | GroupedKVManager:
    """The manager a runner's cache plan needs: one table (no plan, or one full-attention
    group) or the grouped policies."""
    if plan is None or plan.single_table:
        return KVCacheManager(BlockPool(num_blocks), block_size, enable_prefix_cache)
    return GroupedKVManager(plan, enable_prefix_cache)
