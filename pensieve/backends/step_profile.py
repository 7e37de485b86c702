"""Where a served step's time goes: ``PENSIEVE_PROFILE_STEPS`` profiles a few engine steps.

``PENSIEVE_PROFILE_STEPS=N`` (or ``N:PATH``) runs ``torch.profiler`` (CPU, and CUDA where the
runner is on a GPU) over N steps of each kind — *decode* (one sequence, one token), *batched
decode* (several sequences, every chunk one token: a bench's 8-stream scenario) and *other*
(prefill or mixed) — after the first ``PENSIEVE_PROFILE_SKIP`` (default 8) steps of that kind,
which the start-up warm-up and kernel compiles would dominate. Each finished kind appends to
PATH (default ``pensieve-profile.txt`` in the working directory): the mean wall time of a
profiled step, the host syncs seen (``cudaStreamSynchronize``, device-to-host copies,
``aten::item``/``_local_scalar_dense``, ``aten::nonzero``), and the heaviest operators by host
and by device time. Off (no cost but one attribute test a step) unless the variable is set.

It answers what a served profile must: is a step bound by Python and launches (host time ≫
device time), by host syncs (their count per step), or by kernels (which ones).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
ENV = "PENSIEVE_PROFILE_STEPS"
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "aten::item", "aten::_local_scalar_dense", "aten::nonzero")


@dataclass
class _Kind:
    name: str
    seen: int = 0
    done: bool = False
    walls: list[float] = field(default_factory=list)
    prof: Any = None


class StepProfiler:
    """Profiles ``count`` steps of each kind after ``skip`` of that kind (module docstring)."""

    def __init__(self, count: int, path: Path, skip: int, cuda: bool) -> None:
        self.count, self.path, self.skip, self.cuda = count, path, skip, cuda
        self.kinds = {k: _Kind(k) for k in ("decode", "batched decode", "other")}

    def step(self, chunks: Sequence[Any], run: Callable[[], torch.Tensor]) -> torch.Tensor:
        decode = all(c.num_tokens == 1 for c in chunks)
        kind = self.kinds[("decode" if len(chunks) == 1 else "batched decode") if decode
                          else "other"]
        kind.seen += 1
        if kind.done or kind.seen <= self.skip:
            return run()
        if kind.prof is None:
            kind.prof = torch.profiler.profile(activities=self._activities())
            kind.prof.__enter__()
        started = time.perf_counter()
        out = run()
        if self.cuda:
            torch.cuda.synchronize()
        kind.walls.append(time.perf_counter() - started)
        if len(kind.walls) >= self.count:
            kind.prof.__exit__(None, None, None)
            self._write(kind, len(chunks))
            kind.prof, kind.done = None, True
        return out

    def _activities(self) -> list[Any]:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        return acts

    def _write(self, kind: _Kind, rows: int) -> None:
        events = kind.prof.key_averages()
        n = len(kind.walls)
        syncs = {e.key: e.count / n for e in events if e.key in SYNC_EVENTS}
        d2h = sum(e.count for e in events if e.key in ("cudaMemcpyAsync", "cudaMemcpy")) / n
        lines = [f"## {kind.name} steps: {n} profiled after {self.skip} (last one {rows} chunks)",
                 f"wall per step (synchronised): {1e3 * sum(kind.walls) / n:.2f} ms",
                 f"per step: host syncs {syncs or 'none'}; cudaMemcpy(Async) calls {d2h:.1f}",
                 "", "by host (self CPU) time:",
                 events.table(sort_by="self_cpu_time_total", row_limit=25)]
        if self.cuda:
            lines += ["by device time:", events.table(sort_by="self_cuda_time_total", row_limit=25)]
        with self.path.open("a") as f:
            f.write("\n".join(lines) + "\n\n")
        log.info("profiled %d %s steps (%.2f ms each) into %s", n, kind.name,
                 1e3 * sum(kind.walls) / n, self.path)


def from_env(device: torch.device, environ: dict[str, str] | None = None) -> StepProfiler | None:
    """The profiler ``PENSIEVE_PROFILE_STEPS`` asks for, or None; a malformed value is an error
    that names the variable (a start, not a step, is where to say so)."""
    env = os.environ if environ is None else environ
    value = env.get(ENV, "").strip()
    if not value:
        return None
    count, _, path = value.partition(":")
    skip = env.get("PENSIEVE_PROFILE_SKIP", "8")
    if not count.isdigit() or int(count) < 1 or not skip.isdigit():
        raise ValueError(f"{ENV} wants N or N:PATH with N ≥ 1 (and PENSIEVE_PROFILE_SKIP a "
                         f"count), got {value!r}")
    return StepProfiler(int(count), Path(path or "pensieve-profile.txt"), int(skip),
                        device.type == "cuda")
