"""Progress bars for long store work (hashing, joining, copying): tqdm on stderr, quiet when
stderr is not a terminal unless ``PENSIEVE_PROGRESS=1``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def enabled() -> bool:
    flag = os.environ.get("PENSIEVE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false")
    return sys.stderr.isatty()


@contextmanager
def bar(total: int | None, desc: str, initial: int = 0) -> Iterator[Callable[[int], None]]:
    """A byte-counting bar; yields ``update(n_bytes)``."""
    if not enabled():
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, leave=True) as t:
        yield t.update


def note(line: str) -> None:
    print(f"pensieve: {line}", file=sys.stderr, flush=True)
