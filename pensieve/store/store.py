"""The store on disk: ``<root>/<folder>/manifest.json`` beside the model's files.

A model's folder name is its store name made filesystem-safe (``qwen2.5-coder:1.5b`` →
``qwen2.5-coder_1.5b``); the manifest keeps the real name. A pull writes into a hidden
``.partial-<folder>`` first and renames it into place once everything is verified, so a
listed model is always complete.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from pensieve.store.catalogue import lookup
from pensieve.store.errors import ModelNotFound, ModelNotPulled, StoreError
from pensieve.store.manifest import MANIFEST, Manifest, read_manifest, write_manifest
from pensieve.store.paths import store_root

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def folder_name(name: str) -> str:
    return _UNSAFE.sub("_", name)


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise StoreError(f"invalid model name {name!r}: use letters, digits and . _ - : / "
                         "(e.g. qwen2.5-coder:1.5b)")
    return name


class ModelStore:
    """The models under ``root`` (default ``$PENSIEVE_HOME/models``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else store_root()

    def folder(self, name: str) -> Path:
        return self.root / folder_name(check_name(name))

    def partial_folder(self, name: str) -> Path:
        """Where a pull of ``name`` keeps its files until they are verified (resumable)."""
        return self.root / f".partial-{folder_name(check_name(name))}"

    def list(self) -> list[Manifest]:
        if not self.root.is_dir():
            return []
        out = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not (child / MANIFEST).is_file():
                continue
            try:
                out.append(read_manifest(child))
            except (OSError, ValueError, TypeError):
                continue  # a damaged manifest is not a model; `pensieve rm` still removes it
        return out

    def get(self, name: str) -> Manifest | None:
        folder = self.folder(name)
        if not (folder / MANIFEST).is_file():
            return None
        try:
            return read_manifest(folder)
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"the manifest of {name} is damaged ({exc}); "
                             f"remove it with `pensieve rm {name}` and pull it again") from None

    def entry_path(self, manifest: Manifest) -> Path:
        """The file or folder a server loads for ``manifest``."""
        return (self.folder(manifest.name) / manifest.entry).resolve()

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Write ``manifest`` into ``staging`` and move it into place as ``manifest.name``
        (replacing an older copy). Returns the model's folder."""
        write_manifest(staging, manifest)
        target = self.folder(manifest.name)
        if target.exists():
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
        return target

    def update(self, manifest: Manifest) -> None:
        write_manifest(self.folder(manifest.name), manifest)

    def remove(self, name: str) -> Manifest | None:
        """Delete ``name``'s folder (and any partial pull); the manifest it had, if any.
        A symlinked import's original is left alone."""
        folder = self.folder(name)
        partial = self.partial_folder(name)
        if not folder.exists() and not partial.exists():
            raise ModelNotFound(f"no model {name!r} in {self.root}; `pensieve models` lists them")
        try:
            manifest = read_manifest(folder)
        except (OSError, ValueError, TypeError):
            manifest = None
        for path in (folder, partial):
            if path.is_symlink():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
        return manifest


def resolve_manifest(name_or_path: str | Path, store: ModelStore | None = None
                     ) -> tuple[Path, Manifest | None]:
    """(path to load, the store manifest or None) for a file, a folder or a store name.

    An existing path wins (a ``.gguf`` or a model folder); then a name in the store. A
    catalogue name that is not pulled yet raises ModelNotPulled, anything else ModelNotFound,
    each with what to run next."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path, None
    store = store or ModelStore()
    manifest = store.get(text) if NAME_RE.match(text) and ".." not in text else None
    if manifest is None:
        entry = lookup(text)
        if entry is not None and entry.name != text:
            manifest = store.get(entry.name)
    if manifest is not None:
        resolved = store.entry_path(manifest)
        if not resolved.exists():
            raise StoreError(f"{manifest.name}: {resolved} is missing (a linked original moved?); "
                             f"run `pensieve pull {manifest.source}` again")
        return resolved, manifest
    entry = lookup(text)
    if entry is not None:
        raise ModelNotPulled(f"{entry.name} is not pulled yet: run `pensieve pull {entry.name}`")
    raise ModelNotFound(f"{text}: no such file, folder or model in {store.root}; "
                        "`pensieve models` lists the store, `pensieve pull SOURCE` adds one")


def resolve_model(name_or_path: str | Path, store: ModelStore | None = None) -> Path:
    """The path a server loads for ``name_or_path``: an existing ``.gguf`` / model folder,
    or the entry of a model in the store (``pensieve pull`` put it there)."""
    return resolve_manifest(name_or_path, store)[0]


def store_from(root: str | None, env: Mapping[str, str] | None = None) -> ModelStore:
    """The store ``--store`` names, else ``$PENSIEVE_HOME/models``."""
    return ModelStore(Path(root).expanduser() if root else store_root(env))
