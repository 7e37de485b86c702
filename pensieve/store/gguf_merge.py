"""Merge a split GGUF (llama.cpp's ``gguf-split``: ``name-00001-of-00003.gguf`` …) into one.

Each shard is a complete GGUF holding some of the tensors; the first carries the model's
metadata plus ``split.*`` keys. The merged file has the first shard's metadata without the
``split.*`` keys, every shard's tensor infos with offsets into one data section, then the
tensor bytes, each aligned. Metadata and tensor-info records are copied byte for byte (read
with ``gguf``'s reader for their extents), the tensor data in 8 MiB chunks.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

from pensieve.store.errors import StoreError

_CHUNK = 8 << 20
_SPLIT_PREFIX = "split."


def _extent(field) -> int:  # noqa: ANN001 - gguf.ReaderField
    return sum(int(p.nbytes) for p in field.parts)


def merge_gguf(shards: list[Path], out: Path,
               progress: Callable[[int], None] | None = None) -> None:
    """Write ``shards`` (first to last) as one GGUF at ``out`` (through a temp file)."""
    from gguf import GGUFReader

    readers = [GGUFReader(str(p)) for p in shards]
    first = readers[0]
    count = first.fields.get("split.count")
    if count is not None and int(count.contents()) != len(shards):
        raise StoreError(f"{shards[0].name} says {int(count.contents())} shards, got {len(shards)}")
    align = int(first.fields["general.alignment"].contents()) \
        if "general.alignment" in first.fields else 32
    kvs = [f for name, f in first.fields.items()
           if not name.startswith(("GGUF.", _SPLIT_PREFIX))]
    tensors = [(i, t) for i, r in enumerate(readers) for t in r.tensors]
    infos: list[bytes] = []
    offset = 0
    for i, t in tensors:
        head = _read(shards[i], t.field.offset, _extent(t.field) - 8)  # all but the offset
        infos.append(head + struct.pack("<Q", offset))
        offset += (t.n_bytes + align - 1) // align * align
    tmp = out.with_name(out.name + ".merging")
    with open(tmp, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
        for field in kvs:
            f.write(_read(shards[0], field.offset, _extent(field)))
        for info in infos:
            f.write(info)
        f.write(b"\0" * (-f.tell() % align))
        for i, t in tensors:
            _copy(shards[i], t.data_offset, t.n_bytes, f, progress)
            f.write(b"\0" * (-t.n_bytes % align))
    os.replace(tmp, out)


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise StoreError(f"{path.name}: truncated GGUF shard")
    return data


def _copy(path: Path, offset: int, size: int, out, progress) -> None:  # noqa: ANN001
    with open(path, "rb") as src:
        src.seek(offset)
        left = size
        while left:
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise StoreError(f"{path.name}: truncated GGUF shard")
            out.write(chunk)
            left -= len(chunk)
            if progress is not None:
                progress(len(chunk))
