"""A GGUF model's weights in the CPU kernels' layout, cached on disk and mapped at start-up.

Turning a GGUF file into the kernels' layout (Q4_K → nibbles with the file's 6-bit scales,
Q6_K → int8 codes, q/k/v and gate/up stacked) took ~10 s of a 1.5B model's start on a busy
2-core machine. After the first start the built model's tensors are written here, once, off
the serving path (a background thread, to a temporary name renamed into place); later starts
map this file and hand its pages to the modules as they are (``torch.frombuffer`` over a
private mapping: no copy, the weights stay page-cache-backed and count as ``RssFile``).

One file per (GGUF file: real path, size, mtime; dtype; weight choice; the source of the code
that produces the layout, hashed): any change to them is a new key, and the entries of the
same GGUF under older keys are deleted when the new one is written. A file that fails its
checks (magic, header, size, key) is ignored and rewritten. ``PENSIEVE_PACKED_CACHE=0`` turns
the cache off; ``PENSIEVE_PACKED_CACHE=DIR`` puts it elsewhere (default
``$XDG_CACHE_HOME/pensieve/packed``).

Layout: ``PNSVPACK`` + u64 header length + JSON header (``key``, ``meta``: what each
tensor is, ``tensors``: name → dtype, shape, offset, bytes) + padding; the data from
``DATA_ALIGN``, each tensor at a multiple of ``TENSOR_ALIGN`` of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pensieve.backends.cpu_quant.codes_linear import (
    F_Q4, F_Q4K, F_Q6, F_Q8G16, CodesLinear, Q4KCodes, Q6Codes,
)
from pensieve.backends.cpu_quant.linear import Q4Linear, Q8Linear
from pensieve.backends.quantize import EMBED, HEAD
from pensieve.backends.torch_backend import ModelWeights
from pensieve.loaders.int4_codes import Int8Groups
from pensieve.loaders.tokenizer import TextTokenizer
from pensieve.models.quant_linear import Int4Groups

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the file layout or the meaning of its tensors changes (2: Q4_K's and
# Q6_K's super-block scales kept as the file's integers)
MAGIC = b"PNSVPACK"
DATA_ALIGN = 4096
TENSOR_ALIGN = 64
_HEADER = struct.Struct("<8sQ")
_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.bool)}
# the code that decides what the packed tensors hold: a change to any of it is a new key
_PKG = Path(__file__).resolve().parents[1]
SOURCES = ("loaders/gguf.py", "loaders/gguf_file.py", "loaders/int4_codes.py",
           "loaders/quants.py", "loaders/architectures.py", "models/packing.py",
           "models/quant_linear.py", "backends/quantize.py", "backends/torch_backend.py",
           "backends/packed_cache.py", "backends/cpu_quant/linear.py",
           "backends/cpu_quant/codes_linear.py", "backends/cpu_quant/build.py",
           "loaders/gguf_vocab.py", "loaders/tokenizer.py")


def cache_dir() -> Path | None:
    """Where packed files live; None when ``PENSIEVE_PACKED_CACHE=0``."""
    env = os.environ.get("PENSIEVE_PACKED_CACHE")
    if env == "0":
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pensieve" / "packed"


def _source_hash() -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        try:
            h.update((_PKG / rel).read_bytes())
        except OSError:
            h.update(rel.encode())
    for rel in sorted((_PKG / "models").glob("*.py")):  # families' weight fix-ups
        h.update(rel.read_bytes())
    # the C sources hold the packing code (pq4_pack, pq6_pack): a layout change there must
    # not meet a file packed by the old one (costs a re-pack after any kernel edit)
    for rel in sorted((_PKG / "backends" / "cpu_quant").glob("*source.py")):
        h.update(rel.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PackedEntry:
    """The cache file for one GGUF under one configuration (``path``; ``key`` in its header)."""

    path: Path
    key: str
    gguf: Path

    def siblings(self) -> list[Path]:
        """Files of the same GGUF under other keys (stale)."""
        prefix = self.path.name.rsplit("-", 1)[0] + "-"
        return [p for p in self.path.parent.glob(prefix + "*.pack") if p != self.path]


def entry_for(gguf: str | Path, *, dtype: torch.dtype, choice: str, directory: Path | None = None
              ) -> PackedEntry | None:
    """The cache entry of ``gguf`` built with ``dtype`` and the weight ``choice`` (a string
    naming everything else that changes what is built); None when the cache is off or the file
    cannot be read."""
    directory = directory or cache_dir()
    if directory is None:
        return None
    try:
        real = Path(gguf).expanduser().resolve()
        st = real.stat()
    except OSError:
        return None
    text = "\0".join([str(FORMAT), str(real), str(st.st_size), str(st.st_mtime_ns), str(dtype),
                      choice, _source_hash()])
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    where = hashlib.sha256(str(real).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "._" else "_" for c in real.stem)[:80]
    return PackedEntry(directory / f"{stem}-{where}-{key}.pack", key, real)


# --- reading --------------------------------------------------------------------------------


class PackedError(ValueError):
    """A packed file that must not be used (damaged, partial, or another key's)."""


@dataclass(frozen=True)
class Pages:
    """Whole pages of a packed file's mapping (private, never written: the file's own bytes),
    ``drop`` hands them back with ``MADV_DONTNEED``: they leave this process's resident set
    (the page cache keeps them) and the next read faults the file's bytes in again."""

    buf: mmap.mmap
    spans: tuple[tuple[int, int], ...]  # (offset in the mapping, length), page-aligned
    addresses: frozenset[int]  # where the tensors they cover start

    def drop(self) -> None:
        for start, length in self.spans:
            try:
                self.buf.madvise(mmap.MADV_DONTNEED, start, length)
            except (OSError, ValueError, AttributeError):  # no madvise here: pages stay
                return


@dataclass(frozen=True)
class Packed:
    """A packed file as read: the planned weights over its pages, its meta, the tokenizer it
    holds (if any) and the pages of the token embedding's codes (a lookup reads a few rows of
    a 100+ MB table; see ``drop_lookup_pages``)."""

    weights: ModelWeights
    meta: dict[str, Any]
    tokenizer: TextTokenizer | None
    embedding: Pages | None


def read_packed(entry: PackedEntry) -> Packed | None:
    """``entry``'s file mapped: its weights, meta, tokenizer and embedding pages; None when
    there is no file, and None (with a warning, the file deleted) when it fails its checks."""
    try:
        f = open(entry.path, "rb")
    except OSError:
        return None
    try:
        with f:
            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError as exc:  # empty file
                raise PackedError("empty file") from exc
        tensors, meta = _parse(buf, entry.key)
        tokenizer = _tokenizer(tensors, meta)
        if "tokenizer.json" in tensors:  # read once, into the tokenizer: 5 MB of RSS
            _pages(buf, [tensors["tokenizer.json"]]).drop()
        table = [t for n, t in tensors.items() if n.startswith(f"t:{EMBED}.")]
        return Packed(_weights(tensors, meta), meta, tokenizer, _pages(buf, table) if table else None)
    except (PackedError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        log.warning("packed weights %s unusable (%s): converting the GGUF again", entry.path, exc)
        _unlink(entry.path)
        return None


def _pages(buf: mmap.mmap, tensors: list[torch.Tensor]) -> Pages:
    """The whole pages inside each of ``tensors`` (views of ``buf``)."""
    base = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    spans = []
    for t in tensors:
        start = t.data_ptr() - base
        end = (start + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
        start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        if end > start:
            spans.append((start, end - start))
    return Pages(buf, tuple(spans), frozenset(t.data_ptr() for t in tensors))


def drop_lookup_pages(model: nn.Module, packed: Packed) -> bool:
    """During and after every lookup of ``model``'s token embedding, hand the table's pages
    back (every ``LOOKUP_ROWS`` rows: ``_sliced_lookup``), where
    the embedding module alone holds the packed table (an output layer reading the same codes
    reads every row each step: nothing to gain). A lookup maps whole page-cache folios around
    the rows it reads — up to ~2 MB each here, 40+ MB of a 139 MB Q4_K table after one
    1000-token prompt — that nothing reads again until the next lookup. True when hooked."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if packed.embedding is None or not isinstance(embed, nn.Module):
        return False
    table = packed.embedding.addresses
    if not table or not table <= {t.data_ptr() for t in embed.buffers()}:
        return False
    base = torch.frombuffer(packed.embedding.buf, dtype=torch.uint8, count=1).data_ptr()
    spans = [(base + start, base + start + length) for start, length in packed.embedding.spans]
    others = [t for n, t in [*model.named_buffers(remove_duplicate=False),
                             *model.named_parameters(remove_duplicate=False)]
              if not n.startswith("model.embed_tokens.")]
    for t in others:  # any other module's tensor on those pages (a view included): leave them
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        if any(lo < b and a < hi for a, b in spans):
            return False
    if not getattr(embed.forward, "drops_pages", False):
        embed.forward = _sliced_lookup(embed.forward, packed.embedding.drop)
    return True


# Rows a lookup reads between two drops: each row read maps the page-cache folio around it (up
# to 2 MB here), so a 512-token prefill chunk read at once mapped ~80 MB of the table for the
# length of the call — the peak RSS of a served prefill; 8 rows bound that to ~16 MB, for ~64
# madvise calls a chunk.
LOOKUP_ROWS = 8


def _sliced_lookup(lookup: Callable[[torch.Tensor], torch.Tensor], drop: Callable[[], None]
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``lookup`` that hands the table's pages back (``drop``) after every ``LOOKUP_ROWS`` ids."""

    def forward(ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() <= LOOKUP_ROWS:
            out = lookup(ids)
            drop()
            return out
        parts = []
        for start in range(0, flat.numel(), LOOKUP_ROWS):
            parts.append(lookup(flat[start:start + LOOKUP_ROWS]))
            drop()
        out = torch.cat(parts)
        return out.view(*ids.shape, out.shape[-1])

    forward.drops_pages = True  # type: ignore[attr-defined]
    return forward


def _parse(buf: mmap.mmap, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if len(buf) < _HEADER.size:
        raise PackedError("truncated header")
    magic, n = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC or n > len(buf) - _HEADER.size:
        raise PackedError("bad magic or header length")
    try:
        header = json.loads(bytes(buf[_HEADER.size:_HEADER.size + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackedError(f"header: {exc}") from exc
    if header.get("format") != FORMAT or header.get("key") != key:
        raise PackedError("written for another file, configuration or code version")
    data = header["data_offset"]
    if len(buf) != data + header["data_bytes"]:
        raise PackedError(f"size {len(buf)}, expected {data + header['data_bytes']} (partial write?)")
    tensors = {}
    for name, (dtype, shape, offset, nbytes) in header["tensors"].items():
        dt = _DTYPES[dtype]
        count = 1
        for d in shape:
            count *= d
        if count * dt.itemsize != nbytes or offset < 0 or offset + nbytes > header["data_bytes"]:
            raise PackedError(f"tensor {name} does not fit its bytes")
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=dt)
            continue
        tensors[name] = torch.frombuffer(buf, dtype=dt, count=count, offset=data + offset).view(shape)
    return tensors, header["meta"]


def _codes(tensors: dict[str, torch.Tensor], prefix: str, spec: dict[str, Any]
           ) -> Int4Groups | Int8Groups | Q4KCodes | Q6Codes:
    codes, scales, mins = (tensors.get(f"{prefix}.{k}") for k in ("codes", "scales", "mins"))
    if spec["fmt"] == F_Q4K:  # super-block scales: bytes, (d, dmin) as float16 bits
        return Q4KCodes(codes, scales.view(torch.uint8), mins.view(torch.float16))
    if spec["fmt"] == F_Q6:
        return Q6Codes(codes, scales.view(torch.uint8))
    scales = scales.view(torch.float16)
    mins = None if mins is None else mins.view(torch.float16)
    if spec["fmt"] == F_Q4:
        return Int4Groups.from_nibbles(codes, scales, mins, 32)
    return Int8Groups(codes, scales, mins, 16 if spec["fmt"] == F_Q8G16 else 32,
                      spec.get("kind", ""))


def _tokenizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> TextTokenizer | None:
    facts = meta.get("tokenizer")
    if facts is None or "tokenizer.json" not in tensors:
        return None
    from tokenizers import Tokenizer

    text = bytes(tensors["tokenizer.json"].numpy()).decode("utf-8")
    return TextTokenizer(Tokenizer.from_str(text), bos_token=facts["bos"], eos_token=facts["eos"],
                         add_bos=facts["add_bos"], extra_eos_ids=facts["eos_ids"])


def _weights(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ModelWeights:
    floats = {n[2:]: t for n, t in tensors.items() if n.startswith("w:")}
    modules = {path: tuple(_codes(tensors, f"m:{path}.{i}", b) for i, b in enumerate(blocks))
               for path, blocks in meta["modules"].items()}
    tables = {name: _codes(tensors, f"t:{name}", spec) for name, spec in meta["tables"].items()}
    head_q8 = None
    if meta.get("head_q8"):
        head_q8 = (tensors["q8.codes"], tensors["q8.scales"].view(torch.float16))
    return ModelWeights(floats, tables, modules, head_q8)


# --- writing --------------------------------------------------------------------------------


def _blocks(layer: nn.Module) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]] | None:
    """A built layer's row blocks as (spec, tensors), or None where it is not packable here."""
    if type(layer) is Q4Linear:
        return [({"fmt": F_Q4}, {"codes": layer.codes, "scales": layer.scales, "mins": layer.mins})]
    if type(layer) is not CodesLinear:
        return None
    out = []
    for i, fmt in enumerate(layer.part_formats):
        part = {"codes": getattr(layer, f"codes{i}"), "scales": getattr(layer, f"scales{i}")}
        if (mins := getattr(layer, f"mins{i}")) is not None:
            part["mins"] = mins
        out.append(({"fmt": fmt, "kind": "+".join(layer.kinds)}, part))
    return out


@dataclass
class Snapshot:
    """What to write: tensors by name and the meta that says how to rebuild from them."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    tokenizer: TextTokenizer | None = None  # serialised by the writer (off the ready path)


def snapshot(model: nn.Module, planned: ModelWeights, meta: dict[str, Any],
             tokenizer: TextTokenizer | None = None) -> Snapshot | None:
    """The built CPU ``model``'s packed tensors (the modules' own buffers, no copies) and
    ``planned``'s floats; None where a layer is not one this cache rebuilds (then it is not
    cached)."""
    tensors: dict[str, torch.Tensor] = {f"w:{n}": t for n, t in planned.floats.items()}
    modules: dict[str, list[dict[str, Any]]] = {}
    for path in planned.modules:
        blocks = _blocks(model.get_submodule(path))
        if blocks is None:
            return None
        modules[path] = []
        for i, (spec, parts) in enumerate(blocks):
            modules[path].append(spec)
            tensors.update({f"m:{path}.{i}.{k}": t for k, t in parts.items()})
    tables: dict[str, dict[str, Any]] = {}
    for name in planned.tables:
        layer = model.model.embed_tokens.table if name == EMBED else model.lm_head
        blocks = _blocks(layer)
        if blocks is None or len(blocks) != 1:
            return None
        spec, parts = blocks[0]
        tables[name] = spec
        tensors.update({f"t:{name}.{k}": t for k, t in parts.items()})
    head_q8 = isinstance(model.lm_head, Q8Linear)
    if planned.head_q8 is not None and not head_q8:
        return None
    if head_q8:  # a tied Q8_0 table's codes, or an untied head packed from its float weight
        tensors["q8.codes"], tensors["q8.scales"] = model.lm_head.codes, model.lm_head.scales
        if planned.head_q8 is None:
            tensors.pop("w:lm_head.weight", None)  # rebuilt from the codes, never loaded
    if any(t.device.type != "cpu" for t in tensors.values()):
        return None
    return Snapshot(tensors, {**meta, "modules": modules, "tables": tables,
                              "head_q8": head_q8}, tokenizer)


def write_packed(entry: PackedEntry, snap: Snapshot) -> Path:
    """Write ``snap`` to ``entry.path`` (temporary name, renamed into place) and delete the
    same GGUF's entries under other keys."""
    tensors, meta = dict(snap.tensors), dict(snap.meta)
    if (tok := snap.tokenizer) is not None:  # the GGUF vocabulary as built: 0.5 s a start
        text = tok.backend.to_str().encode("utf-8")
        tensors["tokenizer.json"] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        meta["tokenizer"] = {"bos": tok.bos_token, "eos": tok.eos_token, "add_bos": tok.add_bos,
                             "eos_ids": sorted(tok.eos_token_ids)}
    layout, at = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        at = -(-at // TENSOR_ALIGN) * TENSOR_ALIGN
        layout[name] = [str(t.dtype).removeprefix("torch."), list(t.shape), at, nbytes]
        at += nbytes
    header = {"format": FORMAT, "key": entry.key, "gguf": str(entry.gguf), "meta": meta,
              "tensors": layout, "data_bytes": at}
    # the data offset depends on the header's length, which holds it: fix it in two passes
    header["data_offset"] = 0
    size = len(json.dumps(header).encode()) + 32
    header["data_offset"] = -(-(_HEADER.size + size) // DATA_ALIGN) * DATA_ALIGN
    text = json.dumps(header).encode()
    if _HEADER.size + len(text) > header["data_offset"]:
        raise RuntimeError("packed header outgrew its room")
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(entry.path.parent)
    tmp = entry.path.with_name(f".{entry.path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, len(text)))
            f.write(text)
            pos = _HEADER.size + len(text)
            base = header["data_offset"]
            for name, t in tensors.items():
                offset = base + layout[name][2]
                f.write(b"\0" * (offset - pos))
                if t.numel():
                    f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
                pos = offset + layout[name][3]
        os.replace(tmp, entry.path)
    except BaseException:
        _unlink(tmp)
        raise
    for stale in entry.siblings():
        _unlink(stale)
    return entry.path


def write_in_background(entry: PackedEntry, snap: Snapshot) -> threading.Thread:
    """``write_packed`` on a daemon thread (file writes release the GIL): the server is ready
    while it runs; a failure is logged, never raised."""
    def run() -> None:
        started = time.perf_counter()
        try:
            path = write_packed(entry, snap)
            log.info("packed weights written to %s in %.1f s (later starts map it)", path,
                     time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - a cache: never the server's failure
            log.warning("could not write packed weights %s: %s", entry.path, exc)

    thread = threading.Thread(target=run, name="pensieve-packed-cache", daemon=True)
    thread.start()
    return thread


def discard(entry: PackedEntry) -> None:
    """Delete ``entry``'s file (it read but did not build)."""
    _unlink(entry.path)


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporaries of writers that died (their pid is gone)."""
    for tmp in directory.glob(".*.pack.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            _unlink(tmp)
        except (ValueError, PermissionError, OSError):
            continue


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
