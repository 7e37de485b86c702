"""Per-request logits processors: stateful objects that shape one row of logits before sampling
and see the token that was sampled.

A request carries an ordered list of them (thinking budget first, then a grammar). While a
processor ``holds`` (thinking is open), the processors after it are paused: they neither mask
the row nor see the tokens, so a tool-call grammar applies to the answer, not to the thinking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pensieve.engine.bitmask import BitmaskApplier
from pensieve.engine.types import ThinkingBudget


class LogitsProcessor:
    """The interface. ``apply`` runs once per sampled token, before sampling; ``accept`` once
    after, with the token chosen (also when an earlier processor forced it)."""

    def apply(self, logits: torch.Tensor) -> None:
        """Mask ``logits`` (one row [V], float) in place: -inf for forbidden tokens."""

    def accept(self, token_id: int) -> None:
        """Advance the state past ``token_id``."""

    @property
    def holds(self) -> bool:
        """While True, the processors after this one are paused."""
        return False

    @property
    def done(self) -> bool:
        """True when nothing but the end of the turn may follow: the engine stops the request."""
        return False


class MaskingProcessor(LogitsProcessor):
    """A processor whose whole effect on a row is a packed allowed-token bitmask (a grammar).
    The sampler collects a batch's masks and applies them together
    (``BitmaskApplier.apply_rows``): one copy and a few kernels a step on a GPU, not per row."""

    masks: BitmaskApplier

    @classmethod
    def fill_together(cls, processors: Sequence["MaskingProcessor"]) -> None:
        """Compute the next masks of many processors of this class at once (a step's rows),
        ahead of their ``next_mask`` calls; by default nothing (each fills its own)."""

    def next_mask(self) -> torch.Tensor | None:
        """The packed mask (int32 words, on the CPU) for the next token; None: all allowed."""
        return None

    def apply(self, logits: torch.Tensor) -> None:
        mask = self.next_mask()
        if mask is not None:
            self.masks.apply(logits, mask)


def active_masks(processors: Sequence[LogitsProcessor]) -> list[MaskingProcessor]:
    """The masking processors that will mask this row now (not paused by a holding one)."""
    active = []
    for proc in processors:
        if isinstance(proc, MaskingProcessor):
            active.append(proc)
        if proc.holds:
            break
    return active


def apply_processors(processors: Sequence[LogitsProcessor], logits: torch.Tensor, *,
                     defer_masks: bool = False) -> list[tuple[BitmaskApplier, torch.Tensor]]:
    """Run the processors not paused over one row. With ``defer_masks`` a masking processor's
    mask is returned instead of applied (masks and the other processors' edits commute: a
    mask only sets -inf), for the caller to apply a batch's masks at once."""
    deferred: list[tuple[BitmaskApplier, torch.Tensor]] = []
    for proc in processors:
        if defer_masks and isinstance(proc, MaskingProcessor):
            mask = proc.next_mask()
            if mask is not None:
                deferred.append((proc.masks, mask))
        else:
            proc.apply(logits)
        if proc.holds:
            break
    return deferred


def accept_token(processors: Sequence[LogitsProcessor], token_id: int) -> bool:
    """Feed ``token_id`` to every processor not paused; True when one says the turn is done."""
    for proc in processors:
        was_holding = proc.holds  # the token that ends a hold still belongs to the hold
        proc.accept(token_id)
        if was_holding:
            return False
        if proc.done:
            return True
    return False


def force_token(logits: torch.Tensor, token_id: int) -> None:
    """Leave ``token_id`` as the only finite logit of the row."""
    logits.fill_(float("-inf"))
    logits[token_id] = 0.0


class ThinkingBudgetProcessor(LogitsProcessor):
    """Counts thinking tokens; once the budget is spent, forces the close marker token by token.

    If the model was already part-way through writing the close marker when the budget ran
    out, forcing continues from where it stopped (no doubled ``</``).
    """

    def __init__(self, budget: ThinkingBudget) -> None:
        self.budget = budget
        self.is_open = budget.starts_open
        self.num_thinking_tokens = 0
        self._recent: list[int] = []  # the last few tokens, to spot markers
        self._keep = max(len(budget.close_ids), len(budget.open_ids))
        self._forcing: int | None = None  # index into close_ids of the next forced token

    @property
    def holds(self) -> bool:
        return self.is_open

    def apply(self, logits: torch.Tensor) -> None:
        if not self.is_open:
            return
        limit = self.budget.budget_tokens
        if self._forcing is None and limit is not None and self.num_thinking_tokens >= limit:
            self._forcing = self._close_prefix_written()
        if self._forcing is not None:
            force_token(logits, self.budget.close_ids[self._forcing])

    def accept(self, token_id: int) -> None:
        self._recent = (self._recent + [token_id])[-self._keep :]
        if self.is_open:
            self.num_thinking_tokens += 1
            if self._forcing is not None:
                self._forcing += 1
            if self._ends_with(self.budget.close_ids) or self._forcing == len(self.budget.close_ids):
                self.is_open = False
                self._forcing = None
        elif self.budget.open_ids and self._ends_with(self.budget.open_ids):
            self.is_open = True

    def _ends_with(self, marker: tuple[int, ...]) -> bool:
        n = len(marker)
        return len(self._recent) >= n and tuple(self._recent[-n:]) == marker

    def _close_prefix_written(self) -> int:
        """How many leading tokens of the close marker the output already ends with."""
        close = self.budget.close_ids
        for n in range(min(len(close) - 1, len(self._recent)), 0, -1):
            if tuple(self._recent[-n:]) == close[:n]:
                return n
        return 0
