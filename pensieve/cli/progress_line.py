"""A one-line live status for waits (a spinner, the elapsed time and the latest news) on a
terminal; plain lines when stderr is not one, only when the news changes."""

from __future__ import annotations

import logging
import sys
import threading
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


class Phase:
    """A live line ``<spinner> loading weights… 12.3 s`` on a terminal while a long step runs
    (the CPU kernel build, the model load), redrawn by a thread; log records clear it before
    they print. Silent when stderr is not a terminal (logs say the same)."""

    def __init__(self, title: str, interval_s: float = 0.25) -> None:
        self.title = title
        self.interval_s = interval_s
        self.tty = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._filters: list[tuple[logging.Handler, logging.Filter]] = []

    def _clear(self, record: logging.LogRecord) -> bool:
        sys.stderr.write("\r\x1b[K")
        return True

    def _spin(self) -> None:
        started = time.monotonic()
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            sys.stderr.write(f"\r\x1b[K{_SPIN[n % 4]} {self.title}… "
                             f"{time.monotonic() - started:.1f} s")
            sys.stderr.flush()

    def __enter__(self) -> Phase:
        if self.tty:
            for handler in logging.getLogger().handlers:
                flt = logging.Filter()
                flt.filter = self._clear  # type: ignore[method-assign]
                handler.addFilter(flt)
                self._filters.append((handler, flt))
            self._thread = threading.Thread(target=self._spin, name="pensieve-phase", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        for handler, flt in self._filters:
            handler.removeFilter(flt)
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()
