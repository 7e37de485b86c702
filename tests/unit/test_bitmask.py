"""Packed bitmasks: a batch's masks applied at once equal each row's mask applied alone."""

from __future__ import annotations

import torch

from pensieve.engine.bitmask import BitmaskApplier, token_bits
from pensieve.engine.logits_processors import MaskingProcessor
from pensieve.engine.sampler import apply_rows


def _masks(vocab: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [token_bits(frozenset(torch.randperm(vocab, generator=gen)[: 7 + 5 * i].tolist()), vocab)
            for i in range(n)]


def test_apply_rows_equals_row_by_row_on_both_paths():
    vocab = 1000  # not a multiple of 32: the last word's spare bits must not spill
    masks = _masks(vocab, 3)
    applier = BitmaskApplier(vocab)
    for dtype in (torch.float32, torch.bfloat16):  # numpy path, and the table path devices take
        logits = torch.randn(5, vocab).to(dtype)
        expected = logits.clone()
        for row, mask in zip((0, 2, 3), masks):
            applier.apply(expected[row], mask)
        applier.apply_rows(logits, [0, 2, 3], masks)
        assert torch.equal(logits, expected)
        allowed = torch.isfinite(logits[2].float())
        assert allowed.sum() == 12 and torch.isfinite(logits[1].float()).all()


class _Only(MaskingProcessor):
    def __init__(self, applier: BitmaskApplier, mask: torch.Tensor | None) -> None:
        self.masks, self._mask, self.calls = applier, mask, 0

    def next_mask(self) -> torch.Tensor | None:
        self.calls += 1
        return self._mask


class _Broken(MaskingProcessor):
    masks = BitmaskApplier(64)

    def next_mask(self) -> torch.Tensor | None:
        raise ValueError("boom")


def test_apply_rows_collects_masks_and_isolates_a_failing_row():
    vocab = 64
    applier = BitmaskApplier(vocab)
    logits = torch.zeros(4, vocab)
    allow = token_bits(frozenset({3, 40}), vocab)
    procs = [[_Only(applier, allow)], None, [_Broken()], [_Only(applier, None)]]
    failed = apply_rows(logits, procs)
    assert list(failed) == [2] and "boom" in failed[2]
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [3, 40]
    assert torch.isfinite(logits[1]).all() and torch.isfinite(logits[3]).all()
    assert procs[0][0].calls == 1


def test_apply_rows_on_cuda_equals_the_cpu_rows():
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    vocab = 151_936  # Qwen's logits width
    masks = _masks(vocab, 8)
    applier = BitmaskApplier(vocab)
    logits = torch.randn(9, vocab)
    expected = logits.clone()
    for row, mask in zip(range(1, 9), masks):
        applier.apply(expected[row], mask)
    on_gpu = logits.cuda()
    for _ in range(3):  # pinned buffers reused by the caching host allocator
        applier.apply_rows(on_gpu, list(range(1, 9)), masks)
    assert torch.equal(on_gpu.cpu(), expected)


def test_masks_and_sampling_never_wait_for_the_gpu():
    """Async scheduling masks and samples step N+1's logits while the GPU still runs: neither
    the batched masks nor the batched sampler may synchronise with the device."""
    import pytest

    from pensieve.engine.sampler import sample_ids
    from pensieve.engine.types import SamplingParams

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    vocab = 151_936
    masks = _masks(vocab, 3)
    applier = BitmaskApplier(vocab)
    logits = torch.randn(5, vocab, device="cuda")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=50),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
              SamplingParams(temperature=0.0)]
    gens = [None, torch.Generator(device="cuda").manual_seed(1), None, None, None]
    applier.apply_rows(logits.clone(), [0], masks[:1])  # the one-time table upload may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        applier.apply_rows(logits, [1, 2, 4], masks)
        ids, bad = sample_ids(logits, params, gens)
        every = sample_ids(logits, [SamplingParams(temperature=1.0)] * 5, [None] * 5)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.shape == (5,) and every.shape == (5,) and not bad.any().item()
