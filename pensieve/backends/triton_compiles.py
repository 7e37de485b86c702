"""Triton compiles that happen while serving, logged: a request that pays one waits ~0.5–2 s.

The start-time warm-up (``engine/warm_up.py``) runs the step shapes that compile kernels, so
after it a compile means a shape (a row count of 1, divisible by 16 or not; a new constexpr) it
did not cover — a follow-up turn's first token seconds late with nothing else to show why.
``watch()`` chains Triton's JIT hooks (``triton.knobs.runtime``: ``jit_cache_hook`` before a
compile, ``jit_post_compile_hook`` after): each compile is counted and timed, at debug level
during start and as a warning naming the kernel and its specialisation once ``serving()`` was
called. Without Triton, or a Triton without those hooks, it does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("pensieve.triton")

_lock = threading.Lock()
_state: dict[str, Any] = {"installed": False, "serving": False, "count": 0, "seconds": 0.0}
_started: dict[int, float] = {}  # thread id → when its compile began


def _knobs() -> Any | None:
    try:
        from triton import knobs
    except Exception:  # noqa: BLE001 - no Triton, or one from before the knobs module
        return None
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        return None
    return runtime


def watch() -> bool:
    """Install the hooks once (keeping any already set); True when they are in place."""
    runtime = _knobs()
    if runtime is None:
        return False
    with _lock:
        if _state["installed"]:
            return True
        before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook

        def on_cache_miss(*args: Any, **kwargs: Any) -> Any:
            _started[threading.get_ident()] = time.perf_counter()
            # a truthy answer would make Triton skip the compile: pass the previous hook's on
            return before(*args, **kwargs) if before is not None else None

        def on_compiled(*args: Any, **kwargs: Any) -> Any:
            began = _started.pop(threading.get_ident(), None)
            seconds = time.perf_counter() - began if began is not None else 0.0
            _record(str(kwargs.get("repr", "?")), seconds, bool(kwargs.get("is_manual_warmup")))
            return after(*args, **kwargs) if after is not None else None

        runtime.jit_cache_hook, runtime.jit_post_compile_hook = on_cache_miss, on_compiled
        _state["installed"] = True
    return True


def _record(kernel: str, seconds: float, manual: bool) -> None:
    with _lock:
        _state["count"] += 1
        _state["seconds"] += seconds
        serving = _state["serving"]
    if serving and not manual:
        log.warning("Triton compiled a kernel while serving (%.0f ms; a shape the start-time "
                    "warm-up did not cover): %s", seconds * 1e3, kernel[:400])
    else:
        log.debug("Triton compiled %s in %.0f ms", kernel[:200], seconds * 1e3)


def serving() -> tuple[int, float]:
    """From now on a compile is a warning; returns (compiles, seconds) so far (start-up's)."""
    with _lock:
        _state["serving"] = True
        return _state["count"], _state["seconds"]


def compiles() -> tuple[int, float]:
    """(compiles, seconds) since ``watch()``."""
    with _lock:
        return _state["count"], _state["seconds"]
