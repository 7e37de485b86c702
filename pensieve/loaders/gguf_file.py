"""A GGUF file opened for reading: its metadata and its tensors' raw bytes.

Why not ``gguf.GGUFReader``: it builds a numpy memmap view for every part of every
field, which takes ~4 s on SmolLM2's 49k-token vocabulary (2-core machine) — more than
the whole ready-in-3-s budget. This reader parses the same layout with ``struct`` in
~0.1 s and hands tensor bytes out as zero-copy ``torch.uint8`` views of an mmap.
Layout (little-endian, versions 2 and 3): magic ``GGUF``, u32 version, u64 tensor
count, u64 kv count, the kv pairs, the tensor infos, padding to ``general.alignment``,
then tensor data at the offsets the infos give.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pensieve.loaders.checkpoint import CheckpointError
from pensieve.loaders.device_read import DeviceReader

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT32: "f", GGUFValueType.FLOAT64: "d",
    GGUFValueType.BOOL: "?",
}
_MAX_DIMS = 8
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives. ``shape`` is in torch order (GGUF's ``ne`` reversed)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute, from the start of the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; truncation → CheckpointError."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path}: GGUF file is truncated or malformed (reading {what} at byte "
                f"{self.pos} needs {n} bytes, file has {self.size})"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{self.path}: {what} is not valid UTF-8 ({exc})") from exc

    def _strings(self, count: int, what: str) -> list[str]:
        """``count`` length-prefixed strings: the vocab's ~100k entries, so a tight loop
        with one bounds check at the end (a slice past the end just comes back short)."""
        self.need(count * 8, what)
        buf, pos, out = self.buf, self.pos, []
        length_at = _U64.unpack_from
        try:
            for _ in range(count):
                (n,) = length_at(buf, pos)
                out.append(buf[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
        except struct.error:
            pos = self.size + 1  # a length prefix past the end: reported below
        except UnicodeDecodeError as exc:
            if pos + 8 + n <= self.size:
                raise CheckpointError(f"{self.path}: {what} holds invalid UTF-8 ({exc})") from exc
            pos = self.size + 1  # the file ends inside this string
        if pos > self.size:
            raise CheckpointError(
                f"{self.path}: GGUF file is truncated or malformed (string array {what} "
                f"runs past the end of the file, {self.size} bytes)"
            )
        self.pos = pos
        return out

    def _skip_strings(self, count: int, what: str) -> _Deferred:
        """Step over ``count`` strings, reading only their lengths; their text is decoded when
        the key is first read (``_Metadata``): a start that takes the vocabulary from a
        cache never decodes its ~300k strings."""
        self.need(count * 8, what)
        buf, pos, size = self.buf, self.pos, self.size
        length_at = _U64.unpack_from
        start = pos
        try:
            for _ in range(count):
                pos += 8 + length_at(buf, pos)[0]
        except struct.error:
            pos = size + 1
        if pos > size:
            raise CheckpointError(
                f"{self.path}: GGUF file is truncated or malformed (string array {what} "
                f"runs past the end of the file, {self.size} bytes)"
            )
        self.pos = pos
        return _Deferred(self, start, count, what)

    def value(self, vtype: int, what: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what)
        try:
            fmt = _SCALARS[GGUFValueType(vtype)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{self.path}: unknown GGUF value type {vtype} in {what}")
        return self.unpack(fmt, what)

    def array(self, what: str) -> list[Any]:
        etype = self.unpack("I", what)
        count = self.unpack("Q", what)
        if etype == GGUFValueType.STRING:
            if count >= LAZY_STRINGS:
                return self._skip_strings(count, what)
            return self._strings(count, what)
        if etype == GGUFValueType.ARRAY:
            return [self.array(what) for _ in range(count)]
        try:
            fmt = _SCALARS[GGUFValueType(etype)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{self.path}: unknown GGUF array type {etype} in {what}")
        n = struct.calcsize("<" + fmt) * count
        self.need(n, what)
        values = np.frombuffer(self.buf, dtype="<" + fmt, count=count, offset=self.pos)
        self.pos += n
        return values.tolist()


LAZY_STRINGS = 4096  # string arrays of at least this many entries are decoded when first read


@dataclass
class _Deferred:
    """A string array not decoded yet: where it starts."""

    cursor: _Cursor
    pos: int
    count: int
    what: str

    def decode(self) -> list[str]:
        cur = _Cursor(self.cursor.buf, self.cursor.path)
        cur.pos = self.pos
        return cur._strings(self.count, self.what)


class _Metadata(dict):
    """The key/value pairs; a large string array is decoded on its first read."""

    def _resolve(self, key: str, value: Any) -> Any:
        if isinstance(value, _Deferred):
            value = value.decode()
            super().__setitem__(key, value)
        return value

    def __getitem__(self, key: str) -> Any:
        return self._resolve(key, super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        return self._resolve(key, super().get(key, default))

    def values(self):  # noqa: ANN201
        return [self[k] for k in self]

    def items(self):  # noqa: ANN201
        return [(k, self[k]) for k in self]

    def __eq__(self, other: object) -> bool:
        return dict(self.items()) == other

    __hash__ = None  # type: ignore[assignment]


class GGUFFile:
    """Metadata and tensor bytes of one GGUF file (kept mapped while referenced)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: DeviceReader | None = None
        try:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: writable private pages, so torch.frombuffer needs no copy
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError as exc:  # mmap of an empty file
            raise CheckpointError(f"{self.path}: empty file, not a GGUF model") from exc
        cur = _Cursor(self._buf, self.path)
        self.version, kv_count, tensor_count = self._read_header(cur)
        self.metadata: dict[str, Any] = _Metadata()
        for _ in range(kv_count):
            key = cur.string("metadata key")
            self.metadata[key] = cur.value(cur.unpack("I", f"type of {key}"), key)
        self.tensors = self._read_tensor_infos(cur, tensor_count)

    def _read_header(self, cur: _Cursor) -> tuple[int, int, int]:
        cur.need(4, "magic")
        if bytes(self._buf[0:4]) != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (bad magic bytes)")
        cur.pos = 4
        version = cur.unpack("I", "version")
        if version not in (2, 3):
            hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
            raise CheckpointError(f"{self.path}: unsupported GGUF version {version}{hint}")
        tensor_count = cur.unpack("Q", "tensor count")
        kv_count = cur.unpack("Q", "metadata count")
        # each kv needs >= 12 bytes and each tensor info >= 24: reject absurd counts early
        cur.need(kv_count * 12 + tensor_count * 24, "header counts")
        return version, kv_count, tensor_count

    def _read_tensor_infos(self, cur: _Cursor, count: int) -> dict[str, GGUFTensorInfo]:
        raw = []
        for _ in range(count):
            name = cur.string("tensor name")
            n_dims = cur.unpack("I", f"dims of {name}")
            if n_dims > _MAX_DIMS:
                raise CheckpointError(f"{self.path}: tensor {name} claims {n_dims} dimensions")
            ne = [cur.unpack("Q", f"shape of {name}") for _ in range(n_dims)]
            type_id = cur.unpack("I", f"type of {name}")
            raw.append((name, ne, type_id, cur.unpack("Q", f"offset of {name}")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (cur.pos + align - 1) // align * align
        return {name: self._tensor_info(name, ne, t, data_start + off)
                for name, ne, t, off in raw}

    def _tensor_info(self, name: str, ne: list[int], type_id: int, offset: int) -> GGUFTensorInfo:
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise CheckpointError(f"{self.path}: tensor {name} has unknown ggml type id {type_id}")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        count = int(np.prod(ne, dtype=np.int64)) if ne else 1
        if ne and ne[0] % block:
            raise CheckpointError(
                f"{self.path}: tensor {name} row of {ne[0]} is not a multiple of the "
                f"{ggml_type.name} block size {block}"
            )
        nbytes = count // block * type_size
        if offset + nbytes > len(self._buf):
            raise CheckpointError(
                f"{self.path}: GGUF file is truncated: tensor {name} needs bytes "
                f"{offset}..{offset + nbytes} but the file has {len(self._buf)}"
            )
        return GGUFTensorInfo(name, ggml_type, tuple(reversed(ne)), offset, nbytes)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a flat ``torch.uint8`` view of the mapped file."""
        info = self.tensors[name]
        return torch.frombuffer(self._buf, dtype=torch.uint8, count=info.nbytes,
                                offset=info.offset)

    def raw_to(self, name: str, device: torch.device | str) -> torch.Tensor:
        """The tensor's bytes as a new uint8 tensor on ``device``, read from the file through
        pinned buffers (``device_read.DeviceReader``), not through the map."""
        if self._reader is None or self._reader.device != torch.device(device):
            self._reader = DeviceReader(self.path, device)
        info = self.tensors[name]
        return self._reader.read(info.offset, info.nbytes)

    def close_reader(self) -> None:
        """Let ``raw_to``'s file handle and pinned buffers go (the loader is done)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def release(self, name: str) -> None:
        """Drop the mapped pages of ``name``'s bytes from this process (``MADV_DONTNEED``:
        they were only read, so a later read maps them from the file again). Loading calls it
        after each tensor is converted, so the whole file is never resident on top of the
        converted copies (1 GB of a 1.5B Q4_K_M model's peak)."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        info = self.tensors[name]
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = info.offset + info.nbytes
        if end > start:
            try:
                self._buf.madvise(advice, start, end - start)
            except (OSError, ValueError):
                pass

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)
