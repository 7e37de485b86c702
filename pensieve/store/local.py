"""Import a model already on disk (a ``.gguf`` or a model folder) into the store.

``auto`` hard-links each file when the store is on the same filesystem (no extra space; the
store's copy survives the original's deletion) and copies otherwise; ``copy`` always copies;
``symlink`` links to the original (no space, but the model breaks if the original moves).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pensieve.store.errors import StoreError
from pensieve.store.progress import bar

MODES = ("auto", "copy", "hardlink", "symlink")


def import_path(source: Path, staging: Path, mode: str = "auto") -> tuple[str, str]:
    """Put ``source`` into ``staging``; (entry relative to ``staging``, the mode used)."""
    if mode not in MODES:
        raise StoreError(f"--link must be one of {', '.join(MODES)}, got {mode!r}")
    source = source.expanduser().resolve()
    if not source.exists():
        raise StoreError(f"{source}: no such file or folder")
    if source.is_dir() and not (source / "config.json").is_file():
        raise StoreError(f"{source}: a model folder needs a config.json (pass a .gguf file "
                         "inside it instead, if that is the model)")
    if source.is_file() and not _is_gguf(source):
        raise StoreError(f"{source}: not a GGUF file (want a .gguf or a model folder)")
    entry = source.name if source.is_file() else "."
    if mode == "symlink":
        if source.is_file():
            (staging / source.name).symlink_to(source)
        else:
            entry = "model"
            (staging / entry).symlink_to(source, target_is_directory=True)
        return entry, "symlink"
    used = set()
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        rel = path.name if source.is_file() else path.relative_to(source)
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        used.add(_place(path, target, mode))
    return entry, "hardlink" if used == {"hardlink"} else "copy"


def _place(path: Path, target: Path, mode: str) -> str:
    target.unlink(missing_ok=True)
    if mode in ("auto", "hardlink"):
        try:
            os.link(path, target)
            return "hardlink"
        except OSError as exc:
            if mode == "hardlink":
                raise StoreError(f"cannot hard-link {path} into the store ({exc.strerror}): "
                                 "another filesystem? use --link copy or --link symlink") from None
    size = path.stat().st_size
    with bar(size, f"copy {path.name}") as update, open(path, "rb") as src, \
            open(target, "wb") as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)
            update(len(chunk))
    shutil.copystat(path, target)
    return "copy"


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
