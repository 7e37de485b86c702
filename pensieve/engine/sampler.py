"""Logits → next token ids: greedy at temperature 0, else temperature, top-k, top-p, seeded.

Rows with logits processors (grammar masks, a forced end of thinking) are masked in place
first, so every sampling mode only ever picks an allowed token.

One row's trouble is that row's alone: a processor that raises, or a row whose logits hold
NaN or +inf or nothing finite, fails only that row (``SampledRows.failed``); the other rows
are sampled as usual. Temperatures below ``GREEDY_BELOW`` are greedy: dividing by a tiny
temperature overflows float32 (1e-40 is allowed by the API).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pensieve.engine.logits_processors import LogitsProcessor, apply_processors
from pensieve.engine.types import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily
NON_FINITE = "the model produced non-finite logits (NaN/inf) or no allowed token"


class SamplingError(RuntimeError):
    """A row could not be sampled (raised by ``sample`` only; the engine uses ``sample_rows``)."""


@dataclass
class SampledRows:
    """``ids[i]`` is row i's token; rows in ``failed`` (row → why) have a placeholder id."""

    ids: list[int]
    failed: dict[int, str] = field(default_factory=dict)


def is_greedy(params: SamplingParams) -> bool:
    return not params.temperature >= GREEDY_BELOW  # NaN too


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    processors: Sequence[Sequence[LogitsProcessor] | None] | None = None,
) -> list[int]:
    """One token per row of ``logits`` [N, V] (float32); ``processors[i]`` masks row i.
    Raises ``SamplingError`` if any row fails."""
    rows = sample_rows(logits, params, generators, processors)
    if rows.failed:
        raise SamplingError("; ".join(f"row {i}: {why}" for i, why in sorted(rows.failed.items())))
    return rows.ids


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    processors: Sequence[Sequence[LogitsProcessor] | None] | None = None,
) -> SampledRows:
    """Like ``sample``, with failed rows reported instead of raised."""
    failed = apply_rows(logits, processors or ())
    ids, bad = sample_ids(logits, params, generators)
    for i in bad.nonzero().flatten().tolist():
        failed.setdefault(i, NON_FINITE)
    return SampledRows(ids.tolist(), failed)


def apply_rows(logits: torch.Tensor, processors: Sequence[Sequence[LogitsProcessor] | None]) -> dict[int, str]:
    """Mask each row of ``logits`` in place with its processors; the rows whose processors
    raised (row → why): a grammar that cannot mask fails its request only."""
    failed: dict[int, str] = {}
    with torch.inference_mode():  # the model's logits are inference tensors: mask in place
        for i, procs in enumerate(processors):
            if not procs:
                continue
            try:
                apply_processors(procs, logits[i])
            except Exception as exc:
                failed[i] = f"logits processor failed: {type(exc).__name__}: {exc}"
    return failed


def sample_ids(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens as an int64 tensor on the logits' device, and a bool mask of rows that could
    not be sampled (their id is 0, a valid input for a next step), without waiting for the
    device: async scheduling feeds the ids to the next step before the host reads them."""
    with torch.inference_mode():
        bad = torch.isnan(logits).any(dim=-1) | (logits == float("inf")).any(dim=-1)
        bad |= ~(logits > float("-inf")).any(dim=-1)
        if any(not is_greedy(p) for p in params):
            # sanitise failed rows so multinomial never sees them (a device assert on CUDA)
            logits = torch.where(bad.unsqueeze(-1), torch.zeros((), dtype=logits.dtype,
                                                                device=logits.device), logits)
        ids = logits.argmax(dim=-1)
        for i, p in enumerate(params):
            if not is_greedy(p):
                ids[i] = _sample_row(logits[i], p, generators[i])
        ids = ids.masked_fill(bad, 0)
    return ids, bad


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        row = _top_p_filter(row, p.top_p)
    probs = torch.softmax(row, dim=-1)
    # a finite row divided by a temperature ≥ GREEDY_BELOW can still overflow to inf for
    # huge logits; then softmax is NaN: take the argmax rather than raise
    # (no host sync: async scheduling samples without waiting for the device)
    probs = torch.nan_to_num(probs, nan=0.0)
    argmax = torch.zeros_like(probs).scatter_(0, row.argmax().view(1), 1.0)
    probs = torch.where(probs.sum() > 0, probs, argmax)
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
