"""One constrained request's grammar: wait for the compile, mask each token, advance.

``GrammarConstraint`` is the ``MaskingProcessor`` that ``GrammarCompiler.constraint`` hands the
engine for a request with a ``GrammarSpec``: ``ready()`` says when the request may run (compiled,
failed, or degraded after the compiler's timeout), ``next_mask`` gives the packed mask for the next
token (``fill_together`` fills a step's rows in one xgrammar batch call), ``accept`` advances the
matcher, and ``done`` says when nothing but the end of the turn may follow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from pensieve.engine import grammar
from pensieve.engine.grammar import GrammarCompiler
from pensieve.engine.logits_processors import MaskingProcessor
from pensieve.engine.types import GrammarSpec

log = logging.getLogger("pensieve.engine.grammar")


class GrammarConstraint(MaskingProcessor):
    """One request's matcher. The engine runs the request once ``ready()``; a constraint used
    before that (tests) waits for its compile at the first ``apply``.

    Compile timeout: ``ready()`` past ``compiler.timeout_s`` without a compiled grammar falls
    back to ``spec.fallback`` (compiled under a timeout of its own), else drops the constraint;
    both are logged as warnings naming the grammar.

    Closing: when ``tokens_left()`` falls to the last quarter of the request's budget (at most
    ``CLOSING_RESERVE`` tokens), the answer is steered to its end. Inside a structure the
    tokens that close — made only of ``"``, ``]`` and ``}`` — are preferred whenever the
    grammar allows one: inside a string (where any letter is allowed) those starting with
    ``"``, elsewhere those starting with ``]`` or ``}``; between calls, the end of turn rather
    than another call. Free text is left alone. A call that would be cut by max_tokens (a
    small model looping inside a string, or calling again and again) ends valid instead.

    A grammar that failed to compile, or a token the matcher refuses (which masking makes
    impossible unless another processor forced it), leaves the request unconstrained with a
    warning rather than failing it.
    """

    CLOSING_RESERVE = 64

    def __init__(
        self, spec: GrammarSpec, compiler: GrammarCompiler,
        tokens_left: Callable[[], int] | None = None,
    ) -> None:
        self.spec = spec
        self._compiler = compiler
        self.masks = compiler.masks
        self._compiled: Future | None = compiler.submit(spec)  # None: dropped before compiling
        self._deadline = time.monotonic() + compiler.timeout_s
        self._fell_back = False
        self._tokens_left = tokens_left
        self._reserve: int | None = None  # fixed at the first apply, from the budget then
        self._matcher: Any = None
        self._broken = False
        self._bitmask = torch.empty(0)
        self._filled = False  # the bitmask already holds the mask for the next token
        self._free = False  # ... and that mask allows every token
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def compiling(self) -> Future | None:
        """The compile this constraint waits for, while it is not done."""
        future = self._compiled
        return None if future is None or future.done() else future

    @property
    def degraded(self) -> bool:
        """The grammar in force is not the one asked for (fallback, or none)."""
        return self._fell_back or self._broken

    def ready(self, now: float | None = None) -> bool:
        """True once the request can run: compiled, failed (unconstrained), or degraded after
        the compile timeout. Never blocks."""
        if self.compiling is None:
            return True
        now = time.monotonic() if now is None else now
        ready_at = self._compiler.backend_ready_at
        if ready_at is None:
            if not self._compiler.backend_failed():
                return False  # the vocabulary's one-time build: bounded, not this grammar's cost
            ready_at = now - self._compiler.timeout_s
        if now < max(self._deadline, ready_at + self._compiler.timeout_s):
            return False
        waited = self._compiler.timeout_s
        fallback = self.spec.fallback
        if fallback is not None and not self._fell_back:
            log.warning("grammar %s not compiled within %.1f s: its fallback %s is used for this "
                        "request", self._name(), waited, fallback.label or fallback.kind)
            self._fell_back = True
            self._compiled = self._compiler.submit(fallback)
            self._deadline = now + waited
            return self.compiling is None
        self._compiled = None
        self._drop(f"not compiled within {waited:.1f} s")
        return True

    def _name(self) -> str:
        return self.spec.label or self.spec.kind

    def next_mask(self) -> torch.Tensor | None:
        matcher = self._ready_matcher()
        if matcher is None:
            return None
        if not self._filled and not matcher.fill_next_token_bitmask(self._bitmask):
            return None  # everything allowed
        free, self._filled, self._free = self._free, False, False
        if free:
            return None
        mask = self._bitmask[0]
        return self._closing_mask(mask) if self._closing() else mask

    def _closing_mask(self, mask: torch.Tensor) -> torch.Tensor:
        comp = self._compiler
        in_text = bool((mask & comp.letter_bits).any())  # inside a string, or free text
        if (mask & comp.stop_bits).any():  # the grammar may end here
            return mask if in_text else mask & comp.stop_bits  # free text runs on; calls stop
        closers = mask & (comp.close_string_bits if in_text else comp.close_bracket_bits)
        return closers if closers.any() else mask

    def _closing(self) -> bool:
        if self._tokens_left is None:
            return False
        left = self._tokens_left()
        if self._reserve is None:
            self._reserve = min(self.CLOSING_RESERVE, left // 4)
        return left <= self._reserve

    def accept(self, token_id: int) -> None:
        matcher = self._ready_matcher()
        if matcher is None:
            return
        self._filled = self._free = False
        if not matcher.accept_token(token_id):
            self._drop(f"the grammar refused token {token_id}")
            return
        if matcher.is_completed() and not matcher.is_terminated():
            # Fill the next mask now: if it allows nothing but end of turn, the turn is over.
            matcher.fill_next_token_bitmask(self._bitmask)
            self._filled = True
            self._done = not bool((self._bitmask[0] & self._compiler.non_stop_bits).any())

    @classmethod
    def fill_together(cls, processors: "Sequence[MaskingProcessor]") -> None:
        """Fill the next masks of a step's constrained rows in one xgrammar call, on its own
        threads (``BatchGrammarMatcher``) rather than one after another on the engine's: with
        8 rows over a 128k vocabulary the serial fills outlasted the GPU's forward pass."""
        groups: dict[int, tuple[GrammarCompiler, list[GrammarConstraint], list[Any]]] = {}
        for proc in processors:
            if not isinstance(proc, GrammarConstraint) or proc._filled:
                continue
            matcher = proc._ready_matcher()
            if matcher is not None:
                group = groups.setdefault(id(proc._compiler), (proc._compiler, [], []))
                group[1].append(proc)
                group[2].append(matcher)
        for compiler, constraints, matchers in groups.values():
            if len(matchers) < 2:
                continue
            bitmask = compiler.batch_bitmask(len(matchers))
            compiler.batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask)
            free = (bitmask[: len(matchers)] == -1).all(dim=-1).tolist()
            for row, (constraint, is_free) in enumerate(zip(constraints, free)):
                constraint._bitmask[0].copy_(bitmask[row])
                constraint._filled, constraint._free = True, is_free

    def _ready_matcher(self) -> Any:
        if self._matcher is None and not self._broken and self._compiled is not None:
            try:
                compiled = self._compiled.result()
            except Exception as exc:
                self._drop(f"it did not compile ({exc})")
                return None
            self._matcher = grammar.xgr.GrammarMatcher(compiled)
            self._bitmask = grammar.xgr.allocate_token_bitmask(1, self._compiler.vocab_size)
        return self._matcher

    def _drop(self, why: str) -> None:
        log.warning("grammar %s dropped, generating unconstrained: %s", self._name(), why)
        self._broken = True
        self._matcher = None
