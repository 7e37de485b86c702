"""A GGUF's tensor bytes read straight onto a device (a GPU), one copy, through pinned buffers.

``load_gguf(device=...)`` decodes each tensor where it will live: the file's bytes go to the
GPU as they are and the code layouts are made there by the same torch ops the CPU runs (a GPU
does that bit work in milliseconds; a host thread took ~2 minutes for a 30B-A3B MoE's 18 GB).
Reading through ``mmap`` would fault each 4 KiB page in and copy from pageable memory; here the
file is read with ``preadv`` into two pinned buffers in turn, each buffer's copy to the device
running while the next chunk is read. A buffer is reused only once its copy has finished
(an event), and the decoding that follows on the same stream sees the whole tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHUNK = 64 << 20  # bytes a pinned buffer holds


class DeviceReader:
    """Byte ranges of one file → uint8 tensors on ``device`` (any device: off CUDA the buffers
    are plain memory and the copies synchronous, which the tests use)."""

    def __init__(self, path: str | Path, device: torch.device | str, chunk: int = CHUNK) -> None:
        self.device = torch.device(device)
        self.chunk = chunk
        self._fd = os.open(path, os.O_RDONLY)
        cuda = self.device.type == "cuda"
        self._buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._turn = 0
        self.bytes_read = 0

    def read(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the file from ``offset``, as a new uint8 tensor on the device."""
        out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        done = 0
        while done < nbytes:
            n = min(self.chunk, nbytes - done)
            i = self._turn
            self._turn ^= 1
            if self._events[i] is not None:
                self._events[i].synchronize()  # its previous copy has left the buffer
            buf = self._buffers[i]
            self._fill(buf, offset + done, n)
            out[done:done + n].copy_(buf[:n], non_blocking=self._events[i] is not None)
            if self._events[i] is not None:
                self._events[i].record()
            done += n
        self.bytes_read += nbytes
        return out

    def _fill(self, buf: torch.Tensor, offset: int, n: int) -> None:
        view = memoryview(buf.numpy())[:n]
        got = 0
        while got < n:
            k = os.preadv(self._fd, [view[got:]], offset + got)
            if k <= 0:
                raise OSError(f"short read at byte {offset + got} of fd {self._fd}")
            got += k

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1
        self._buffers = []

    def __del__(self) -> None:
        self.close()
