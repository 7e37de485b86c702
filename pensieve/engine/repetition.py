"""Loop guard: the DRY ("don't repeat yourself") penalty over a request's own output.

Small models under long agent prompts fall into verbatim loops ("I'm a little bit different.
I'm a little bit different. …") and, greedy, never leave them. DRY lowers the logit of each
token that would extend a sequence already written earlier in the output, by
``multiplier · base^(n - allowed_length)`` where ``n`` is how many tokens already repeat —
short repeats (a word, ``": "``) cost nothing, a sentence said twice becomes very expensive.
Matches never run across a sequence breaker (tokens holding a newline, ``:``, ``"`` or
``*``), so line-structured text (code, JSON) is judged line by line. Only the output is
compared, never the prompt: copying a path or a name out of the conversation is free.

State is one integer per output position: ``match[j]`` is the length of the longest common
suffix of ``out[:j+1]`` and the whole output, updated in one vector step per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pensieve.engine.logits_processors import LogitsProcessor
from pensieve.engine.types import DryParams

DEFAULT_BREAKERS = (":", '"', "*")
MAX_EXPONENT = 40  # base**40 is already far past any logit gap; keeps the float finite


def breaker_ids(decode: Callable[[int], str], vocab_size: int,
                breakers: Iterable[str] = DEFAULT_BREAKERS) -> torch.Tensor:
    """Boolean [vocab_size]: tokens whose text contains a breaker."""
    marks = tuple(breakers)
    flags = torch.zeros(vocab_size, dtype=torch.bool)
    for token_id in range(vocab_size):
        try:
            text = decode(token_id)
        except (IndexError, KeyError, ValueError):
            continue
        if any(m in text for m in marks):
            flags[token_id] = True
    return flags


class DryProcessor(LogitsProcessor):
    """The DRY penalty for one request (see the module docstring)."""

    def __init__(self, params: DryParams, breakers: torch.Tensor, capacity: int = 256) -> None:
        self.params = params
        self.breakers = breakers
        self.tokens = torch.empty(capacity, dtype=torch.long)
        self.match = torch.zeros(capacity, dtype=torch.long)
        self.n = 0

    def apply(self, logits: torch.Tensor) -> None:
        n, p = self.n, self.params
        if n < 2:
            return
        # match[j] for j < n-1: tokens repeated if out[j+1] came next; the last position
        # matches itself and is not a candidate.
        lengths = self.match[: n - 1]
        hits = torch.nonzero(lengths >= p.allowed_length).flatten()
        if hits.numel() == 0:
            return
        candidates = self.tokens[hits + 1]
        repeat = lengths[hits]
        worst = torch.zeros(logits.shape[-1], dtype=torch.long)
        worst.scatter_reduce_(0, candidates, repeat, reduce="amax")
        penalised = torch.nonzero(worst).flatten()
        exponent = (worst[penalised] - p.allowed_length).clamp(max=MAX_EXPONENT).to(torch.float32)
        penalty = p.multiplier * p.base ** exponent
        logits[penalised] -= penalty.to(logits.device, logits.dtype)

    def accept(self, token_id: int) -> None:
        n = self.n
        if n == self.tokens.numel():
            self.tokens = torch.cat([self.tokens, torch.empty_like(self.tokens)])
            self.match = torch.cat([self.match, torch.zeros_like(self.match)])
        self.tokens[n] = token_id
        is_breaker = bool(self.breakers[token_id]) if token_id < self.breakers.numel() else False
        if n and not is_breaker:
            # new suffix match ending at j = old match ending at j-1, plus one, where out[j] == token
            same = self.tokens[1:n] == token_id
            prev = self.match[: n - 1] + 1
            self.match[1:n] = torch.where(same, prev, torch.zeros_like(prev))
            self.match[0] = int(self.tokens[0] == token_id)
        else:
            self.match[:n] = 0
        self.match[n] = 0  # the newest position: its match with itself is not counted
        self.n = n + 1
