"""Plain values that cross the engine boundary: what to sample, what came out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal


class FinishReason(enum.Enum):
    EOS = "eos"  # the model ended its turn
    STOP_SEQUENCE = "stop_sequence"  # a user stop string matched (never in the text)
    MAX_TOKENS = "max_tokens"  # max_tokens reached
    CONTEXT = "context"  # the context window is full
    ABORTED = "aborted"  # the client went away or the request was cancelled
    ERROR = "error"  # generation failed; GenerationDelta.error says why


GrammarKind = Literal["structural_tag", "json_schema", "ebnf"]


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the generated text; ``pensieve.engine.grammar`` compiles it (cached).

    ``payload`` is, by ``kind``: an xgrammar structural tag as JSON, a JSON schema as JSON
    (output in one canonical form: ``{"a": 1, "b": [2, 3]}``), or EBNF with a ``root`` rule.
    Once the grammar is complete and nothing but an end of turn may follow, the request
    finishes as if the model had sampled EOS. ``label`` only names it in logs.
    ``fallback`` is a looser grammar that compiles fast (tool calls without their argument
    schemas), used when this one does not compile in time; it is not part of the spec's
    identity (it follows from the payload).
    """

    kind: GrammarKind
    payload: str
    label: str = field(default="", compare=False)
    fallback: GrammarSpec | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("structural_tag", "json_schema", "ebnf"):
            raise ValueError(f"unknown grammar kind {self.kind!r}")


@dataclass(frozen=True)
class DryParams:
    """The DRY loop guard (``pensieve.engine.repetition``): a token that would extend a
    sequence of ``n ≥ allowed_length`` tokens already repeated in the output loses
    ``multiplier · base^(n - allowed_length)`` from its logit."""

    multiplier: float = 0.8
    base: float = 1.75
    allowed_length: int = 2

    def __post_init__(self) -> None:
        if self.multiplier < 0 or self.base < 1 or self.allowed_length < 1:
            raise ValueError(f"invalid DRY parameters {self}")


DEFAULT_DRY = DryParams()  # what --dry-multiplier M switches on (the server default is off)


@dataclass(frozen=True)
class ThinkingBudget:
    """At most ``budget_tokens`` tokens of thinking, then the close marker is forced.

    Thinking is open from the first output token when ``starts_open`` (the prompt opened it),
    and whenever the model writes ``open_ids``; it closes when the model writes ``close_ids``.
    The budget counts every token generated while thinking is open, over the whole answer.
    ``budget_tokens`` None forces nothing: thinking is only tracked, so that a grammar waits
    until it closes.
    """

    close_ids: tuple[int, ...]
    budget_tokens: int | None
    open_ids: tuple[int, ...] = ()
    starts_open: bool = False

    def __post_init__(self) -> None:
        if not self.close_ids:
            raise ValueError("a thinking budget needs the close marker's token ids")
        if self.budget_tokens is not None and self.budget_tokens < 0:
            raise ValueError(f"budget_tokens must be ≥ 0, got {self.budget_tokens}")


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
    grammar: GrammarSpec | None = None  # constrained decoding (tool calls, JSON output)
    thinking_budget: ThinkingBudget | None = None  # force the end of thinking after N tokens
    dry: DryParams | None = None  # loop guard: penalise repeating the output's own sequences
    # scheduling class: 0 interactive; higher runs only where no lower class waits (batches
    # use BACKGROUND_PRIORITY) and is preempted to seat a lower class
    priority: int = 0


BACKGROUND_PRIORITY = 1  # Message Batches: never ahead of an interactive request


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
