"""Logits → next token ids: greedy at temperature 0, else temperature, top-k, top-p, seeded.

Rows with logits processors (grammar masks, a forced end of thinking) are masked in place
first, so every sampling mode only ever picks an allowed token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pensieve.engine.logits_processors import LogitsProcessor, apply_processors
from pensieve.engine.types import SamplingParams


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    processors: Sequence[Sequence[LogitsProcessor] | None] | None = None,
) -> list[int]:
    """One token per row of ``logits`` [N, V] (float32); ``processors[i]`` masks row i."""
    with torch.inference_mode():  # the model's logits are inference tensors: mask in place
        for i, procs in enumerate(processors or ()):
            if procs:
                apply_processors(procs, logits[i])
    return sample_ids(logits, params, generators).tolist()


def sample_ids(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """The tokens as an int64 tensor on the logits' device, without waiting for the device:
    async scheduling feeds them to the next step before the host reads them."""
    with torch.inference_mode():
        ids = logits.argmax(dim=-1)
        for i, p in enumerate(params):
            if p.temperature > 0.0:
                ids[i] = _sample_row(logits[i], p, generators[i])
    return ids


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        row = _top_p_filter(row, p.top_p)
    probs = torch.softmax(row, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[0]


def _top_p_filter(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``top_p``."""
    sorted_logits, order = torch.sort(row, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token
    drop[0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(row).scatter_(0, order, sorted_logits)


def make_generator(seed: int | None, device: str) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
