"""A request's life inside the engine, as an explicit state machine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.stop_checker import StopChecker
from pensieve.engine.types import FinishReason, GenerationDelta, SamplingParams

if TYPE_CHECKING:
    from pensieve.engine.kv_groups import RequestCache


class RequestStatus(enum.Enum):
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"  # its grammar compiles; not yet schedulable
    WAITING = "waiting"  # queued, no KV yet (or preempted and waiting to recompute)
    RUNNING = "running"  # has KV blocks; prefilling or decoding
    FINISHED = "finished"  # finish_reason says why


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    generator: torch.Generator | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full, cached blocks
    # hybrid layouts (engine/kv_groups.py): the other layer groups' tables, its state slot and
    # checkpoint copies; None where every layer is full attention
    cache: RequestCache | None = None
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_new_cached_tokens: int = 0  # prompt tokens this request added to the prefix cache
    num_inflight: int = 0  # tokens sampled on the device whose ids the host has not read yet
    arrival_step: int = 0  # the scheduler step at which it was queued (ageing)
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    error: str | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens whose ids the host has."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens plus those sampled by a step still in flight (async scheduling)."""
        return self.num_known_tokens + self.num_inflight

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: FinishReason, stop_sequence: str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_sequence = stop_sequence

    def delta(self, text: str, token_ids: list[int] | None = None) -> GenerationDelta:
        """The news of this request for its caller: ``text`` and ``token_ids`` of this step,
        with its cumulative counters, its finish reason and error once it has ended."""
        return GenerationDelta(
            request_id=self.request_id,
            text=text,
            token_ids=token_ids or [],
            finish_reason=self.finish_reason,
            stop_sequence=self.stop_sequence,
            error=self.error,
            num_prompt_tokens=len(self.prompt_ids),
            num_cached_tokens=self.num_cached_tokens,
            num_new_cached_tokens=self.num_new_cached_tokens,
            num_output_tokens=len(self.output_ids),
        )
