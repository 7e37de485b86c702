"""Which requests run in the next step, and how many of their tokens.

Running requests go first (decodes, then the rest of chunked prefills), then waiting ones:
requests of a session that asked to keep its prefix (``retain_prefix``) before side requests,
FIFO within each — except that a request waiting ``aging_steps`` steps or more goes before
every newer arrival (ageing: a stream of session requests cannot starve a side request) —
all under one token budget, of which running prefills leave a quarter to
waiting requests while any can be admitted. Priority classes (``SamplingParams.priority``, 0
interactive, higher for background work such as Message Batches) come first: a waiting request
of a higher class is admitted only where none of a lower one waits (ageing works within a
class), and a waiting interactive request that finds every seat taken preempts the newest
running background request. When KV blocks run out the newest running request is
preempted: its blocks are freed and it waits to be recomputed from its tokens so far.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pensieve.engine.kv_manager import KVCacheManager

if TYPE_CHECKING:
    from pensieve.engine.kv_groups import GroupedKVManager
from pensieve.engine.request import Request, RequestStatus


WAITING_SHARE = 4  # 1/4 of a step's token budget is kept for waiting requests' first chunks


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_tokens: int  # tokens of it to run this step, from request.num_computed_tokens

    @property
    def completes(self) -> bool:
        """After this chunk every known token is cached, so the step samples the next one."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(
        self, kv: KVCacheManager | GroupedKVManager, max_num_seqs: int, max_num_batched_tokens: int,
        aging_steps: int = 128,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.aging_steps = aging_steps
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_steps = 0  # schedule() calls so far: the clock of ageing

    def add(self, request: Request) -> None:
        request.arrival_step = self.num_steps
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        self.num_steps += 1
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        # While requests wait for a seat, running prefills leave them part of the budget, so
        # a short request's first token does not wait for a long prefill to finish.
        if self.waiting and len(self.running) >= self.max_num_seqs:
            self._seat_urgent()
        admissible = self.waiting and len(self.running) < self.max_num_seqs
        reserve = self.max_num_batched_tokens // WAITING_SHARE if admissible else 0
        for req in sorted(self.running, key=lambda r: (r.num_pending_tokens > 1, r.params.priority)):
            if req.status is not RequestStatus.RUNNING or budget == 0:
                continue  # preempted below by an earlier request of this loop
            room = budget - reserve if req.num_pending_tokens > 1 else budget  # decodes: never held
            if room <= 0:
                continue
            n = self.kv.chunk_tokens(req, min(req.num_pending_tokens, room))
            if not self._reserve_or_preempt(req, n):
                continue
            chunks.append(ScheduledChunk(req, n))
            budget -= n
        # a request scheduled above may have been preempted for a later one's blocks
        chunks = [c for c in chunks if c.request.status is RequestStatus.RUNNING]
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self._next_waiting()
            self.kv.match_prefix(req)
            n = self.kv.chunk_tokens(req, min(req.num_pending_tokens, budget))
            if not self.kv.reserve(req, n):
                self._free(req)  # give back the prefix hits too; retry next step
                break
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk(req, n))
            budget -= n
        return chunks

    def _next_waiting(self) -> Request:
        """Within the most urgent priority class waiting: the longest-waiting request once it
        has waited ``aging_steps``; else the oldest session request, else the oldest request
        (preempted ones are in front)."""
        top = min(r.params.priority for r in self.waiting)
        candidates = [r for r in self.waiting if r.params.priority == top]
        first = min(candidates, key=lambda r: r.arrival_step)
        if self.num_steps - first.arrival_step >= self.aging_steps:
            return first
        return next((r for r in candidates if r.params.retain_prefix), candidates[0])

    def must_seat_urgent(self) -> bool:
        """Every seat is taken and a waiting request is more urgent than a running one: the
        next ``schedule`` preempts (the engine lands any step in flight first)."""
        if not self.waiting or len(self.running) < self.max_num_seqs:
            return False
        top = min(r.params.priority for r in self.waiting)
        return any(r.params.priority > top for r in self.running)

    def _seat_urgent(self) -> None:
        """Every seat is taken: preempt the newest running request of a less urgent class
        than the most urgent waiting one, so that an interactive request never waits behind
        background work (the preempted request is recomputed later from its tokens)."""
        top = min(r.params.priority for r in self.waiting)
        behind = [r for r in self.running if r.params.priority > top]
        if behind:
            self._preempt(max(behind, key=lambda r: (r.params.priority, r.arrival_step)))

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request and free its KV."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free(request)

    def _reserve_or_preempt(self, req: Request, n: int) -> bool:
        while not self.kv.reserve(req, n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _free(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
