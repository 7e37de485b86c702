"""Logits → next token ids: greedy at temperature 0, else temperature, top-k, top-p, seeded.

Rows with logits processors (grammar masks, a forced end of thinking) are masked in place
first, so every sampling mode only ever picks an allowed token.

One row's trouble is that row's alone: a processor that raises, or a row whose logits hold
NaN or +inf or nothing finite, fails only that row (``SampledRows.failed``); the other rows
are sampled as usual. Temperatures below ``GREEDY_BELOW`` are greedy: dividing by a tiny
temperature overflows float32 (1e-40 is allowed by the API).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pensieve.engine.bitmask import BitmaskApplier
from pensieve.engine.logits_processors import (
    LogitsProcessor, MaskingProcessor, active_masks, apply_processors,
)
from pensieve.engine.types import SamplingParams

log = logging.getLogger(__name__)

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
    masks: dict[int, tuple[BitmaskApplier, list[int], list[torch.Tensor]]] = {}
    _fill_together(processors)
    with torch.inference_mode():  # the model's logits are inference tensors: mask in place
        for i, procs in enumerate(processors):
            if not procs:
                continue
            try:
                for applier, mask in apply_processors(procs, logits[i], defer_masks=True):
                    group = masks.setdefault(id(applier), (applier, [], []))
                    group[1].append(i)
                    group[2].append(mask)
            except Exception as exc:
                failed[i] = f"logits processor failed: {type(exc).__name__}: {exc}"
        for applier, rows, row_masks in masks.values():  # a batch's grammar masks at once
            try:
                applier.apply_rows(logits, rows, row_masks)
            except Exception as exc:
                failed.update({i: f"applying a grammar mask failed: {type(exc).__name__}: {exc}"
                               for i in rows})
    return failed


def _fill_together(processors: Sequence[Sequence[LogitsProcessor] | None]) -> None:
    """Let each class of masking processor fill its rows' masks in one go (xgrammar fills a
    batch on its own threads); a failure here only means each row fills its own later."""
    by_class: dict[type, list[MaskingProcessor]] = {}
    for procs in processors:
        for proc in active_masks(procs) if procs else ():
            by_class.setdefault(type(proc), []).append(proc)
    for cls, group in by_class.items():
        if len(group) > 1:
            try:
                cls.fill_together(group)
            except Exception:
                log.warning("filling %d masks together failed; each row fills its own",
                            len(group), exc_info=True)


def sample_ids(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens as an int64 tensor on the logits' device, and a bool mask of rows that could
    not be sampled (their id is 0, a valid input for a next step), without waiting for the
    device: async scheduling feeds the ids to the next step before the host reads them.

    Batched: the rows that sample (temperature ≥ ``GREEDY_BELOW``) go through temperature,
    top-k and top-p together and draw by the exponential race (argmax of p / E, E ~ Exp(1):
    the same distribution as a multinomial draw; taken in log space, no softmax), a few
    kernels a step whatever the batch. A
    seeded row draws its E from its own generator, so its tokens depend only on its seed and
    its logits — never on the rows batched with it."""
    with torch.inference_mode():
        # one pass over the vocabulary: a row's max is NaN where it holds a NaN (max propagates
        # it), +inf where it holds +inf, -inf where every token is masked; else its argmax's
        top, ids = logits.max(dim=-1)
        bad = torch.isnan(top) | torch.isinf(top)
        rows = [i for i, p in enumerate(params) if not is_greedy(p)]
        if rows:
            whole = len(rows) == len(params)
            index = None if whole else _to_device(rows, torch.long, logits.device)
            picked = logits if index is None else logits.index_select(0, index)
            picked_bad = bad if index is None else bad.index_select(0, index)
            # sanitise failed rows so sampling never sees them (a device assert on CUDA)
            picked = torch.where(picked_bad.unsqueeze(-1), torch.zeros((), dtype=logits.dtype,
                                                                       device=logits.device), picked)
            drawn = _sample_batch(picked, [params[i] for i in rows], [generators[i] for i in rows])
            ids = drawn if index is None else ids.index_copy_(0, index, drawn)
        ids = ids.masked_fill(bad, 0)
    return ids, bad


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a sync: a pageable host-to-device copy waits
    for the GPU's queue (the forward in flight), a pinned one with ``non_blocking`` does not."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row of ``logits`` [n, V] with each row's temperature, top-k and top-p.
    Every decision is made on the host's copy of the parameters: nothing here waits for the
    device."""
    device, vocab = logits.device, logits.shape[-1]
    temps = _to_device([p.temperature for p in params], torch.float32, device)
    rows = logits.float() / temps.unsqueeze(-1)
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]  # 2.0: keeps every token
    if any(top_k) or any(p < 1.0 for p in top_p):
        rows = _top_k_top_p(rows, top_k, top_p)
    race = torch.empty_like(rows)
    if any(g is None for g in generators):
        _exponential(race)
    for i, gen in enumerate(generators):
        if gen is not None:
            _exponential(race[i], gen)
    # the race in log space: argmax(p / E) = argmax(log p - log E), and log p is the row less
    # its log-sum-exp, one constant a row — so no softmax. A masked token (-inf) never wins; a
    # row that overflowed to +inf (huge logits over a temperature ≥ GREEDY_BELOW) takes its
    # first +inf, its argmax, as the softmax form's NaN fallback did
    return (rows - race.log_()).argmax(dim=-1)


def _exponential(out: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """``out`` filled with Exp(1) draws as -log(U), U uniform on [tiny, 1): never 0 (a zero draw
    would let a masked token win the race: -inf - log 0 is NaN, which argmax takes), on every
    device. Not ``exponential_``: on the CPU it drew 152k floats in 2.4 ms against 0.4 this way
    — ~4% of a 1.5B model's CPU decode step at the default temperature."""
    return out.uniform_(torch.finfo(out.dtype).tiny, 1.0, generator=gen).log_().neg_()


WINDOW = 256  # the top-p cut is looked for among each row's WINDOW best tokens first


def _top_k_top_p(rows: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Rows [n, V] with tokens outside each row's top-k (ties with the k-th kept) and outside
    the smallest set reaching its top-p mass set to -inf; 0 / ≥ 1.0 leave a row whole.

    A nucleus is nearly always a few dozen tokens: it is found among each row's best
    ``WINDOW`` (widened 8× while some row's mass there is short of its top-p), not by sorting
    all V (a 152k vocabulary's sort was ~12% of a CPU decode step); the full sort is the
    fallback. The same tokens are kept but for ties at the cut (kept here; the sort's order
    decides there)."""
    window, vocab = max(WINDOW, *top_k), rows.shape[-1]
    while window * 4 <= vocab and rows.device.type == "cpu":  # on a GPU: no host read, sort
        cut = _window_cut(rows, top_k, top_p, window)
        if cut is not None:
            return rows.masked_fill(rows < cut, float("-inf"))
        window *= 8
    return _sorted_cut(rows, top_k, top_p)


def _window_cut(rows: torch.Tensor, top_k: list[int], top_p: list[float],
                window: int) -> torch.Tensor | None:
    """Each row's lowest kept logit [n, 1], or None where some row's top-p cut lies past its
    best ``window`` tokens."""
    device = rows.device
    best = rows.topk(window, dim=-1).values  # sorted, descending
    low = torch.full((rows.shape[0], 1), float("-inf"), device=device)
    if any(top_k):
        at = _to_device([max(k, 1) - 1 for k in top_k], torch.long, device)
        kth = best.gather(1, at.unsqueeze(-1))
        whole = _to_device([k == 0 for k in top_k], torch.bool, device)
        low = kth.masked_fill(whole.unsqueeze(-1), float("-inf"))
        best = best.masked_fill(best < low, float("-inf"))
    if any(p < 1.0 for p in top_p):
        top = best[:, :1]  # float64 sums: a 152k row's float32 cumsum drifts ~1e-4 near p
        mass = torch.exp(rows - top).masked_fill(rows < low, 0.0).double().sum(-1, keepdim=True)
        cum = torch.exp(best - top).double().cumsum(dim=-1) / mass
        ps = _to_device(top_p, torch.float32, device).unsqueeze(-1)  # 2.0: the whole row
        cutting = ps < 1.0
        if bool((cutting & (cum[:, -1:] < ps)).any()):  # a host read (CPU only): widen or sort
            return None
        last = (cum < ps).sum(dim=-1, keepdim=True).clamp(max=window - 1)  # first reaching p
        low = torch.where(cutting, torch.maximum(low, best.gather(1, last)), low)
    return low


def _sorted_cut(rows: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    device = rows.device
    ordered, order = torch.sort(rows, dim=-1, descending=True)
    if any(top_k):
        at = _to_device([max(k, 1) - 1 for k in top_k], torch.long, device)
        kth = ordered.gather(1, at.unsqueeze(-1))
        if not all(top_k):
            whole = _to_device([k == 0 for k in top_k], torch.bool, device)
            kth = kth.masked_fill(whole.unsqueeze(-1), float("-inf"))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        ps = _to_device(top_p, torch.float32, device).unsqueeze(-1)
        probs = torch.softmax(ordered.double(), dim=-1)  # float64: no drift over 152k sums
        drop = probs.cumsum(dim=-1) - probs >= ps  # the mass before this token reached top_p
        drop[:, 0] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(rows).scatter_(1, order, ordered)


def make_generator(seed: int | None, device: str) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
