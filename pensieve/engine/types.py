"""Plain values that cross the engine boundary: what to sample, what came out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    EOS = "eos"  # the model ended its turn
    STOP_SEQUENCE = "stop_sequence"  # a user stop string matched (never in the text)
    MAX_TOKENS = "max_tokens"  # max_tokens reached
    CONTEXT = "context"  # the context window is full
    ABORTED = "aborted"  # the client went away or the request was cancelled
    ERROR = "error"  # generation failed; GenerationDelta.error says why


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated by the caller (the API layer)."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False
    retain_prefix: bool = False  # the client asked for caching: evict this prefix last


@dataclass
class GenerationDelta:
    """One step's news for one request.

    ``text`` is safe to show (complete UTF-8, no partial stop-sequence held back);
    the last delta has ``finish_reason`` set. Counters are cumulative.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache
    num_new_cached_tokens: int = 0  # prompt tokens written to the prefix cache
    num_output_tokens: int = 0
