"""``hf:org/repo[:file.gguf | :QUANT][@revision]`` pulled through ``huggingface_hub``.

One GGUF (named, or picked by a quant tag such as ``Q4_K_M``; a split GGUF's shards are
fetched and merged into one file), or a whole safetensors / MLX folder (the files a server
needs: configs, tokenizer, weights). ``huggingface_hub`` lists the repo (``model_info`` with
file metadata: sizes, LFS sha256, the commit), builds the ``resolve`` URLs, the auth headers
and the HTTP session; the bytes stream into ``<file>.incomplete`` in the pull's staging folder
(huggingface_hub 2.x deletes its own partial files on failure, so it cannot resume a pull
across runs): a cut connection is retried from where it stopped, and a pull run again resumes
with an HTTP Range request. Every file is checked against the hub's size and LFS sha256.

``HF_ENDPOINT`` (read at each call) points it at a mirror; ``HF_TOKEN`` authenticates.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pensieve.store.errors import StoreError
from pensieve.store.manifest import sha256_file

SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
FOLDER_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken",
                   "tokenizer*", "*.py")
SKIP_PREFIXES = ("original/", ".")


@dataclass(frozen=True)
class HubSource:
    repo: str
    pick: str | None = None  # a file name ending .gguf, a quant tag, or None (the folder)
    revision: str = "main"

    @property
    def text(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf:{self.repo}{rev}" + (f":{self.pick}" if self.pick else "")


def parse_hub(spec: str) -> HubSource:
    """``org/repo``, ``org/repo:pick``, ``org/repo@rev:pick`` (the ``hf:`` already removed)."""
    repo, _, pick = spec.partition(":")
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise StoreError(f"hf:{spec}: want hf:ORG/REPO, hf:ORG/REPO:FILE.gguf or "
                         "hf:ORG/REPO:QUANT (e.g. hf:Qwen/Qwen2.5-Coder-7B-Instruct-GGUF:Q4_K_M)")
    return HubSource(repo, pick or None, revision or "main")


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int | None
    sha256: str | None  # the LFS sha256 the hub declares, if any


@dataclass(frozen=True)
class HubFetch:
    """What a hub pull downloaded into the staging folder."""

    files: tuple[Path, ...]  # in order (a split GGUF's shards first to last)
    commit: str
    shards: bool  # the files are one split GGUF to merge


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def fetch(source: HubSource, staging: Path) -> HubFetch:
    """Download ``source``'s files into ``staging`` (resuming a previous attempt there)."""
    api_files, commit = _listing(source)
    names = choose_files(source, api_files)
    _check_space(staging, [api_files[n] for n in names], source)
    paths = []
    for name in names:
        paths.append(_download(source, name, commit, staging, api_files[name]))
    return HubFetch(tuple(paths), commit, shards=len(names) > 1 and names[0].endswith(".gguf"))


def _check_space(staging: Path, files: list[HubFile], source: HubSource) -> None:
    """Refuse before downloading when the disk cannot hold the files (twice for a split GGUF,
    which is joined beside its shards)."""
    import shutil

    need = sum(f.size or 0 for f in files) * (2 if len(files) > 1 and
                                               files[0].name.endswith(".gguf") else 1)
    free = shutil.disk_usage(staging).free
    if need > free:
        raise StoreError(f"{source.text} needs {need / 1e9:.1f} GB and {staging.parent} has "
                         f"{free / 1e9:.1f} GB free; free some space (or set PENSIEVE_HOME)")


def _listing(source: HubSource) -> tuple[dict[str, HubFile], str]:
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint()).model_info(source.repo, revision=source.revision,
                                                     files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear line
        raise hub_error(exc, source) from None
    files = {s.rfilename: HubFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None)
             for s in info.siblings or ()}
    if not info.sha:
        raise StoreError(f"{source.text}: the hub at {endpoint()} gave no commit for "
                         f"{source.revision}; retry, or pin one with hf:{source.repo}@COMMIT")
    return files, info.sha


def choose_files(source: HubSource, files: dict[str, HubFile]) -> list[str]:
    """The files ``source`` asks for among the repo's ``files``, in download order."""
    ggufs = sorted(n for n in files if n.endswith(".gguf"))
    pick = source.pick
    if pick is None:
        if "config.json" in files:
            return sorted(n for n in files if _folder_file(n))
        if len(_groups(ggufs)) == 1:
            return _groups(ggufs)[0]
        if not ggufs:
            raise StoreError(f"{source.text}: the repo has neither config.json nor a .gguf file")
        raise StoreError(f"{source.text} holds {len(_groups(ggufs))} GGUFs; pick one: "
                         + ", ".join(f"hf:{source.repo}:{_tag(g[0])}" for g in _groups(ggufs)))
    if pick.endswith(".gguf"):
        if pick not in files:
            raise StoreError(f"{source.text}: no file {pick} in {source.repo}; it has "
                             + (", ".join(ggufs[:12]) or "no .gguf files"))
        m = SHARD_RE.match(pick)
        return _shards_of(m.group("stem"), ggufs) if m else [pick]
    groups = [g for g in _groups(ggufs) if _has_tag(g[0], pick)]
    if len(groups) == 1:
        return groups[0]
    tags = ", ".join(sorted({_tag(g[0]) for g in _groups(ggufs)})) or "none"
    if not groups:
        raise StoreError(f"{source.text}: no GGUF in {source.repo} matches {pick!r}; "
                         f"quant tags there: {tags}")
    raise StoreError(f"{source.text}: {pick!r} matches {len(groups)} GGUFs "
                     f"({', '.join(g[0] for g in groups)}); name the file instead")


def _folder_file(name: str) -> bool:
    if name.startswith(SKIP_PREFIXES) or "/" in name:
        return False
    return any(fnmatch.fnmatch(name.lower(), p) for p in FOLDER_PATTERNS)


def _groups(ggufs: list[str]) -> list[list[str]]:
    """Single GGUFs alone, a split GGUF's shards together (in order)."""
    out: dict[str, list[str]] = {}
    for name in ggufs:
        m = SHARD_RE.match(name)
        out.setdefault(m.group("stem") if m else name, []).append(name)
    return [sorted(v) for _, v in sorted(out.items())]


def _shards_of(stem: str, ggufs: list[str]) -> list[str]:
    shards = sorted(n for n in ggufs if (m := SHARD_RE.match(n)) and m.group("stem") == stem)
    count = int(SHARD_RE.match(shards[0]).group("count"))
    if len(shards) != count:
        raise StoreError(f"{stem}: the repo has {len(shards)} of its {count} shards")
    return shards


def _tag(name: str) -> str:
    m = SHARD_RE.match(name)
    stem = m.group("stem") if m else name.removesuffix(".gguf")
    found = re.search(r"((?:IQ|Q|BF|F|MXFP)\d[\w]*?)$", stem.split("/")[-1].replace(".", "-")
                      .split("-")[-1], re.IGNORECASE)
    return found.group(1) if found else name


def _has_tag(name: str, tag: str) -> bool:
    base = name.rsplit("/", 1)[-1].lower()
    return re.search(rf"(?:^|[-_.]){re.escape(tag.lower())}(?:[-_.]|$)", base) is not None


_RETRIES = 3  # a connection cut mid-file is retried from where it stopped this many times


def _download(source: HubSource, name: str, commit: str, staging: Path, meta: HubFile) -> Path:
    """``name`` at ``commit`` into ``staging``, resuming ``<name>.incomplete`` left there by an
    earlier attempt (HTTP Range); checked against the hub's size and LFS sha256."""
    from huggingface_hub import hf_hub_url

    target = staging / name
    if target.is_file() and _matches(target, meta):
        return target
    url = hf_hub_url(source.repo, name, revision=commit, endpoint=endpoint())
    # keyed by the content it will have: a pull resumed after the repo moved on starts over
    partial = staging / f"{name}.{(meta.sha256 or commit)[:16]}.incomplete"
    partial.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(_RETRIES + 1):
        try:
            _stream(url, partial, meta, name)
            break
        except Exception as exc:  # noqa: BLE001
            if attempt == _RETRIES or not _transient(exc) or not partial.exists():
                raise hub_error(exc, source, name) from None
    if not _matches(partial, meta):
        partial.unlink()
        raise StoreError(f"{name}: the downloaded file's size or sha256 differs from the hub's "
                         f"({meta.size} bytes, {meta.sha256}); it was deleted, run the pull again")
    partial.rename(target)
    return target


def _stream(url: str, partial: Path, meta: HubFile, name: str) -> None:
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    from pensieve.store.progress import bar

    have = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and have == meta.size:
        return
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"
    if have:
        headers["Range"] = f"bytes={have}-"
    with get_session().stream("GET", url, headers=headers, timeout=30.0) as response:
        hf_raise_for_status(response)
        if have and response.status_code != 206:  # the server ignored the range: start over
            have = 0
        with open(partial, "ab" if have else "wb") as out, \
                bar(meta.size, name, initial=have) as update:
            for chunk in response.iter_bytes():  # as received: a cut keeps what arrived
                out.write(chunk)
                update(len(chunk))


def _transient(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("httpx", "httpcore")) or isinstance(exc, OSError) \
        and not isinstance(exc, FileNotFoundError) and _status(exc) is None


def _matches(path: Path, meta: HubFile) -> bool:
    if meta.size is not None and path.stat().st_size != meta.size:
        return False
    return meta.sha256 is None or sha256_file(path) == meta.sha256


def hub_error(exc: BaseException, source: HubSource, name: str | None = None) -> StoreError:
    """One line for a hub failure, saying what to do."""
    from huggingface_hub import errors

    what = f"{source.text}" + (f" ({name})" if name else "")
    if isinstance(exc, errors.GatedRepoError):
        return StoreError(f"{what}: the repo is gated; accept its terms on the hub and set "
                          "HF_TOKEN (or run `hf auth login`)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return StoreError(f"{what}: no such repo on {endpoint()} (check the name; a private "
                          "repo needs HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return StoreError(f"{what}: no revision {source.revision!r} in {source.repo}")
    if isinstance(exc, errors.EntryNotFoundError) and not isinstance(
            exc, errors.LocalEntryNotFoundError):
        return StoreError(f"{what}: the file is not in the repo")
    if isinstance(exc, errors.HfHubHTTPError) and _status(exc) not in (None, 429) \
            and _status(exc) < 500:
        return StoreError(f"{what}: the hub answered HTTP {_status(exc)}: {_first_line(exc)}")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return StoreError(f"{what}: HF_HUB_OFFLINE is set, so the hub is not asked; unset it, or "
                          "import a downloaded copy with `pensieve pull /path/to/model`")
    return StoreError(
        f"{what}: cannot reach the Hugging Face Hub at {endpoint()} ({_first_line(exc)}). "
        "Check the network (or set HF_ENDPOINT to a mirror) and run the pull again — it resumes; "
        "a model already on disk can be imported with `pensieve pull /path/to/model`")


def _status(exc: Any) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
