"""A launched step whose sampled ids the host has not read yet (async scheduling), and the
pinned buffers its ids land in."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pensieve.engine.request import Request

FAILED_ROW = -1  # the host's id for a row the sampler could not sample


@dataclass
class InFlight:
    """A launched step whose sampled ids the host has not read yet."""

    requests: list[Request]  # the requests it samples for, in row order
    ids: torch.Tensor  # [S] int64 on the device: the next step's input
    host: torch.Tensor  # [S] int64, filled by a non-blocking copy (pinned on CUDA)
    ready: torch.cuda.Event | None  # recorded after that copy; None on CPU
    failed: dict[int, str] = field(default_factory=dict)  # rows whose processors raised

    def host_ids(self) -> list[int]:
        """The sampled ids on the host (waiting for their copy), ``FAILED_ROW`` where a row
        failed."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class Landing:
    """Where launched steps' ids land on the host. On CUDA two pinned buffers and events,
    alternating between the step in flight and the one being read (allocated once: no pinned
    allocation or free per step); elsewhere the ids themselves."""

    def __init__(self, max_rows: int, pinned: bool) -> None:
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        if pinned:
            self._buffers = [(torch.empty(max_rows, dtype=torch.long, pin_memory=True),
                              torch.cuda.Event()) for _ in range(2)]
        self._launched = 0

    def launch(self, sampled: list[Request], ids: torch.Tensor, bad: torch.Tensor,
               failed: dict[int, str]) -> InFlight:
        """``bad`` rows (not sampleable) feed id 0 to the next step and read back as
        ``FAILED_ROW``, as do the ``failed`` rows (their processors raised)."""
        for req in sampled:
            req.num_inflight += 1
        if failed:
            bad = bad.clone()
            bad[list(failed)] = True
        marked = ids.masked_fill(bad, FAILED_ROW)
        if ids.device.type != "cuda":
            return InFlight(sampled, ids, marked, None, failed)
        host, ready = self._buffers[self._launched % 2]
        self._launched += 1
        host = host[: ids.shape[0]]
        host.copy_(marked, non_blocking=True)
        ready.record()
        return InFlight(sampled, ids, host, ready, failed)
