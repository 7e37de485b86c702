"""Progress of a long weight load: a log line every few seconds, and one at the end.

A 30B file converts for seconds on a GPU but for minutes on a host; either way the start log
(which ``pensieve start`` shows while it waits) says how far the tensors are.
"""

from __future__ import annotations

import logging
import time

import torch

from pensieve.loaders.gguf_file import GGUFFile

log = logging.getLogger("pensieve.loaders")

EVERY_S = 5.0


class LoadProgress:
    """Counts the tensors of ``names`` as ``done`` and logs the share of their bytes done."""

    def __init__(self, gf: GGUFFile, names: list[str], device: torch.device | None) -> None:
        self.gf, self.device = gf, device
        self.total = sum(gf.tensors[n].nbytes for n in names)
        self.count, self.tensors, self.bytes = len(names), 0, 0
        self.started = self.last = time.perf_counter()

    def done(self, name: str) -> None:
        self.tensors += 1
        self.bytes += self.gf.tensors[name].nbytes
        now = time.perf_counter()
        if now - self.last >= EVERY_S:
            self.last = now
            log.info("converting the GGUF's tensors%s: %d/%d, %.1f of %.1f GB [%.0f s]",
                     self._where(), self.tensors, self.count, self.bytes / 1e9, self.total / 1e9,
                     now - self.started)

    def finish(self) -> None:
        if not self.count:
            return
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - self.started
        log.info("converted %d tensors, %.2f GB%s [%.2f s, %.1f GB/s]", self.tensors,
                 self.bytes / 1e9, self._where(), took, self.bytes / 1e9 / max(took, 1e-9))

    def _where(self) -> str:
        return "" if self.device is None else f" on {self.device}"
