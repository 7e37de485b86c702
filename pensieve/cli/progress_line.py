"""A one-line live status for waits (a spinner, the elapsed time and the latest news) on a
terminal; plain lines when stderr is not one, only when the news changes."""

from __future__ import annotations

import sys
import time
from types import TracebackType

_SPIN = "|/-\\"


class StatusLine:
    def __init__(self, title: str) -> None:
        self.title = title
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last = ""
        self.ticks = 0

    def __enter__(self) -> StatusLine:
        if not self.tty:
            print(f"pensieve: {self.title}…", file=sys.stderr, flush=True)
        return self

    def show(self, news: str) -> None:
        self.ticks += 1
        if self.tty:
            elapsed = time.monotonic() - self.started
            text = f"{_SPIN[self.ticks % 4]} {self.title} [{elapsed:5.1f} s] {news}"
            sys.stderr.write("\r\x1b[K" + text[:200])
            sys.stderr.flush()
        elif news and news != self.last:
            print(f"  {news}", file=sys.stderr, flush=True)
        self.last = news

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.tty:
            done = "ready" if kind is None else "failed"
            sys.stderr.write(f"\r\x1b[K{self.title}: {done} in "
                             f"{time.monotonic() - self.started:.1f} s\n")
            sys.stderr.flush()
