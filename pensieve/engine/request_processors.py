"""Which logits processors a request gets, in which order, and the tables they share: the
grammar compiler (built by the first constrained request) and the loop guard's breaker ids
(built by the first loop-guarded request)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from pensieve.engine.config import EngineConfig
from pensieve.engine.grammar import GrammarCompiler
from pensieve.engine.logits_processors import LogitsProcessor, ThinkingBudgetProcessor
from pensieve.engine.repetition import DryProcessor, breaker_ids
from pensieve.engine.types import SamplingParams

if TYPE_CHECKING:
    from pensieve.loaders.tokenizer import TextTokenizer


class RequestProcessors:
    """Builds each request's processors over one tokenizer and vocabulary."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, config: EngineConfig) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._config = config
        self.compiler: GrammarCompiler | None = None  # built by the first constrained request
        self._dry_breakers: torch.Tensor | None = None

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler, built on first use (GrammarUnavailableError without xgrammar)."""
        if self.compiler is None:
            self.compiler = GrammarCompiler(self._tokenizer, self._vocab_size,
                                            workers=self._config.grammar_workers,
                                            timeout_s=self._config.grammar_timeout_s)
        return self.compiler

    def build(self, params: SamplingParams, tokens_left: Callable[[], int]) -> list[LogitsProcessor]:
        """The loop guard first (it sees every token, thinking included), then the thinking
        budget: while thinking is open it pauses the grammar after it. ``tokens_left``: what
        the request may still generate (the grammar closes its structure in time)."""
        processors: list[LogitsProcessor] = []
        if params.dry is not None and params.dry.multiplier > 0:
            if self._dry_breakers is None:
                self._dry_breakers = breaker_ids(lambda i: self._tokenizer.decode([i]), self._vocab_size)
            processors.append(DryProcessor(params.dry, self._dry_breakers))
        if params.thinking_budget is not None:
            processors.append(ThinkingBudgetProcessor(params.thinking_budget))
        if params.grammar is not None:
            processors.append(self.grammars.constraint(params.grammar, tokens_left))
        return processors
