"""Keep a CPU server's resident memory near what it holds (glibc's malloc; no-ops elsewhere).

PyTorch's CPU tensors come from ``malloc``. glibc serves requests above a threshold with their
own ``mmap`` and returns them on ``free`` — but it raises that threshold to the size of every
such block freed (up to 32 MiB), so after loading a model (hundreds of large temporaries) the
next tensors of up to 32 MiB come from the brk heap, where freed space between live blocks
stays resident: 300 MB of heap for 96 MB of weights, measured on the default model. So the
server fixes the threshold before it loads anything (``bound_heap``), which also keeps a
prefill's transient dequantised weights and activations out of the heap, and hands the
free pages left by loading back afterwards (``release_free_memory``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
MMAP_THRESHOLD = 1 << 20  # blocks from 1 MiB up get their own mapping, returned on free


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def bound_heap(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix malloc's mmap threshold (which also stops its dynamic raising); False if not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_memory() -> None:
    """Return the free pages of malloc's heap to the system (after loading a model)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
