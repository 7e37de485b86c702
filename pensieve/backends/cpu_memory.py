"""Keep a CPU server's resident memory near what it holds (glibc's malloc; no-ops elsewhere).

PyTorch's CPU tensors come from ``malloc``. glibc serves requests above a threshold with their
own ``mmap`` and returns them on ``free`` — but it raises that threshold to the size of every
such block freed (up to 32 MiB), so after loading a model (hundreds of large temporaries) the
next tensors of up to 32 MiB come from the brk heap, where freed space between live blocks
stays resident: 300 MB of heap for 96 MB of weights, measured on the default model. So the
server fixes the threshold before it loads anything (``bound_heap``), which also keeps a
prefill's transient dequantised weights and activations out of the heap, and hands the
free pages left by loading back afterwards (``release_free_memory``).

Once the server is up, the shared libraries' pages that start-up alone touched (torch's
static initialisers and Python bindings: ~100 MB of a CPU server's RSS, of which serving uses
~35) are unmapped from the process (``drop_library_pages``): they are clean pages of files,
kept by the page cache, so code that runs again faults its page back in (a minor fault) and
nothing is lost. Only private, non-writable mappings of ``.so`` files with no anonymous (copied)
page are touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import re
from pathlib import Path

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


MADV_DONTNEED = 4
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \d+\s*(.*)$")


def clean_library_mappings(smaps: str) -> list[tuple[int, int, int]]:
    """(start, end, resident kB) of each mapping in ``smaps`` (``/proc/PID/smaps``'s text) that
    maps a shared library privately and read-only with resident pages and no anonymous page:
    its pages are the file's, so dropping them loses nothing."""
    out: list[tuple[int, int, int]] = []
    current: list | None = None
    for line in smaps.splitlines():
        head = _MAPPING.match(line)
        if head:
            if current is not None and current[3] == 0 and current[2] > 0:
                out.append((current[0], current[1], current[2]))
            start, end, perms, name = head.groups()
            library = ".so" in Path(name.strip()).name and name.startswith("/")
            writable_or_shared = "w" in perms or "s" in perms
            current = ([int(start, 16), int(end, 16), 0, 0]
                       if library and not writable_or_shared else None)
        elif current is not None and line.startswith("Rss:"):
            current[2] = int(line.split()[1])
        elif current is not None and line.startswith("Anonymous:"):
            current[3] = int(line.split()[1])
    if current is not None and current[3] == 0 and current[2] > 0:
        out.append((current[0], current[1], current[2]))
    return out


def drop_library_pages() -> int:
    """Unmap the resident pages of this process's read-only shared-library mappings (see the
    module doc); the KiB dropped (0 where not Linux/glibc)."""
    libc = _glibc()
    if libc is None:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    dropped = 0
    for start, end, resident in clean_library_mappings(smaps):
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += resident
    log.info("dropped %.0f MiB of start-up's shared-library pages from RSS", dropped / 1024)
    return dropped
