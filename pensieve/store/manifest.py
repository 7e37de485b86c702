"""One model's ``manifest.json``: what it is, where it came from, how to check it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pensieve.store.sampling import SamplingDefaults

MANIFEST = "manifest.json"
FORMATS = ("gguf", "hf", "mlx")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """One file of a model, relative to its folder in the store."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """``entry`` is what a server loads, relative to the model's folder: a ``.gguf`` file,
    or ``.`` for a Hugging Face / MLX folder. ``sha256`` is the entry file's hash (a folder:
    the hash of its files' ``name sha256`` lines). ``imported`` says how the files got here:
    ``download``, ``copy``, ``hardlink`` or ``symlink`` (a symlinked model depends on its
    original). ``params`` are the model's sampling defaults."""

    name: str
    source: str
    format: str
    entry: str
    sha256: str
    size: int
    architecture: str | None
    context_length: int | None
    files: tuple[FileEntry, ...] = ()
    imported: str = "download"
    params: SamplingDefaults = field(default_factory=SamplingDefaults)
    pulled_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        data["params"] = self.params.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["files"] = tuple(FileEntry(**f) for f in data.get("files", ()))
        data["params"] = SamplingDefaults.from_json(data.get("params"))
        return cls(**data)

    def with_params(self, params: SamplingDefaults) -> Manifest:
        return replace(self, params=params)


def read_manifest(folder: Path) -> Manifest:
    return Manifest.from_json(json.loads((folder / MANIFEST).read_text()))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Atomically: a reader sees the old manifest or the new one, never half of one."""
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)


def sha256_file(path: Path, progress: Any = None) -> str:
    """sha256 of ``path``; ``progress(n)`` (if given) is called with each chunk's size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def folder_digest(files: tuple[FileEntry, ...]) -> str:
    lines = "".join(f"{f.name} {f.sha256}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def describe(path: Path) -> tuple[str, str | None, int | None]:
    """(format, architecture, context length) of a GGUF file or a model folder, read from
    the GGUF metadata or ``config.json`` (no tensor is read)."""
    if path.is_dir():
        config = _json(path / "config.json")
        fmt = "mlx" if _is_mlx(path, config) else "hf"
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        arch = config.get("model_type")
        ctx = config.get("max_position_embeddings") or text.get("max_position_embeddings")
        return fmt, arch, int(ctx) if isinstance(ctx, int) else None
    from pensieve.loaders.gguf_file import GGUFFile

    gf = GGUFFile(path)
    arch = gf.get("general.architecture")
    ctx = gf.get(f"{arch}.context_length") if arch else None
    return "gguf", arch, int(ctx) if ctx is not None else None


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_mlx(folder: Path, config: dict[str, Any]) -> bool:
    """MLX-community folders carry a ``quantization`` block in config.json (mlx-lm's) or
    name their weights ``weights.*.safetensors`` / ship no ``model*.safetensors``."""
    if isinstance(config.get("quantization"), dict):
        return True
    return any(folder.glob("weights*.safetensors")) and not any(folder.glob("model*.safetensors"))
