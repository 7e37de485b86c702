"""``PENSIEVE_STEP_TIMES=DIR``: every served engine step's timing as a CSV line, for benches.

One file a process (``DIR/steps-<pid>.csv``): the step's start (seconds, monotonic), its wall
time, the tokens it ran, the requests running after it and whether it was launched on the
previous step's ids still on the device (async scheduling's chained step). Unlike the profiler
(``backends/step_profile.py``) it syncs nothing, so it shows what a served decode really does —
e.g. whether steps chain, and how the loop's period compares with the device's time a step.
``bench/step_times.py`` summarises the files. Off (one attribute test a step) unless set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

ENV = "PENSIEVE_STEP_TIMES"
HEADER = "start_s,took_ms,tokens,running,chained\n"
FLUSH_EVERY = 256


class StepTimes:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"steps-{os.getpid()}.csv"
        self._file: TextIO = self.path.open("w", buffering=1 << 16)
        self._file.write(HEADER)
        self._pending = 0

    def record(self, start_s: float, took_s: float, tokens: int, running: int, chained: bool) -> None:
        self._file.write(f"{start_s:.6f},{took_s * 1e3:.3f},{tokens},{running},{int(chained)}\n")
        self._pending += 1
        if self._pending >= FLUSH_EVERY:
            self._file.flush()
            self._pending = 0

    def flush(self) -> None:
        """Write what is buffered (the engine loop calls it when it goes idle: a server killed
        after its last request still leaves every step of it in the file)."""
        if self._pending:
            self._file.flush()
            self._pending = 0

    def close(self) -> None:
        self._file.close()


def from_env(environ: dict[str, str] | None = None) -> StepTimes | None:
    value = (os.environ if environ is None else environ).get(ENV)
    return StepTimes(Path(value)) if value else None
