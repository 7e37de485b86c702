"""Where batches live and how much of the engine they may take, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_BATCH_DIR = Path("~/.pensieve/batches")


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """``directory`` holds one folder per batch (its requests, results and state), so a
    restarted server resumes unfinished batches and keeps finished results.
    ``concurrency``: batch requests handed to the engine at once (they run at background
    priority, so interactive requests still go first; fewer also keeps the engine's waiting
    queue, which admission control watches, short). ``max_requests`` and
    ``max_body_bytes`` cap one batch (the API's own limits: 100,000 requests, 256 MB).
    ``expiry_s``: unfinished requests of a batch this old end as ``expired`` (24 h, as the API).
    """

    directory: Path = DEFAULT_BATCH_DIR
    concurrency: int = 4
    max_requests: int = 100_000
    max_body_bytes: int = 256 * 1024 * 1024
    expiry_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory).expanduser())
        if self.concurrency < 1:
            raise ValueError(f"batch concurrency must be at least 1, got {self.concurrency}")
        if self.max_requests < 1 or self.max_body_bytes < 1:
            raise ValueError("batch limits must be positive")
        if self.expiry_s <= 0:
            raise ValueError(f"batch expiry must be positive, got {self.expiry_s}")
