"""Packed token bitmasks (32 tokens per int32 word, bit set = allowed), as xgrammar fills
them, applied to a row of logits."""

from __future__ import annotations

import numpy as np
import torch


class BitmaskApplier:
    """Sets the logits a packed bitmask (32 tokens per int32, bit set = allowed) forbids to -inf.

    On CPU through numpy (~40 µs for a 49k row): single-threaded on purpose, as torch's
    OpenMP kernels for a row this small cost milliseconds when the cores are busy. Elsewhere
    through a byte → 8 penalties table on the logits' device.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        self._table = torch.zeros(256, 8).masked_fill_(bits == 0, float("-inf"))
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """``logits`` [V] in place; ``bitmask`` [ceil(V/32)] int32 on CPU."""
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            allowed = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")
            np.putmask(logits.numpy(), allowed[: logits.shape[-1]] == 0, -np.inf)
            return
        key = (logits.device, logits.dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self._table.to(device=logits.device, dtype=logits.dtype)
        index = bitmask.view(torch.uint8).to(device=logits.device, dtype=torch.long)
        logits += table.index_select(0, index).view(-1)[: logits.shape[-1]]

    def apply_rows(self, logits: torch.Tensor, rows: list[int], bitmasks: list[torch.Tensor]) -> None:
        """``logits`` [N, V] in place: row ``rows[i]`` masked by ``bitmasks[i]`` (int32 words
        on CPU). On the CPU row by row (numpy, as ``apply``); on a device in one go — one
        host-to-device copy from pinned memory and a handful of kernels for the whole batch,
        however many rows are constrained, instead of a copy and kernels per row."""
        if not rows:
            return
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            for row, bitmask in zip(rows, bitmasks):
                self.apply(logits[row], bitmask)
            return
        key = (logits.device, logits.dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self._table.to(device=logits.device, dtype=logits.dtype)
        words = torch.stack(bitmasks)
        packed = torch.cat([words.view(torch.uint8).view(-1),
                            torch.tensor(rows, dtype=torch.int32).view(torch.uint8)])
        if logits.device.type == "cuda":
            packed = packed.pin_memory()  # torch's caching host allocator: safe to reuse
        packed = packed.to(device=logits.device, non_blocking=True)
        nbytes = words.numel() * 4
        index = packed[:nbytes].view(len(rows), -1).long()
        penalties = table.index_select(0, index.view(-1)).view(len(rows), -1)[:, : logits.shape[-1]]
        row_ids = packed[nbytes:].view(torch.int32).long()
        logits.index_add_(0, row_ids, penalties)


def token_bits(token_ids: frozenset[int], vocab_size: int) -> torch.Tensor:
    """A packed bitmask (int32 words) with the bits of ``token_ids`` set."""
    bits = torch.zeros((vocab_size + 31) // 32 * 32, dtype=torch.bool)
    bits[[t for t in token_ids if 0 <= t < vocab_size]] = True
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    words = (bits.view(-1, 32).to(torch.int64) * weights).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
