"""Kernel plans timed at one start, kept for the next on the same GPU, software and kernels.

``cuda_int4_tune`` times every candidate kernel and tile per weight shape at start: on a fresh
machine each candidate is a Triton compile, 8-25 s of an H100 start. The plan it arrives at
depends only on the GPU, the software (torch, Triton), the dtype, the shape and the kernels'
own code, so it is written here once and read back by later starts, which then check the
chosen kernels once against the dequantised weight instead of timing them all (and compile
only those, from Triton's own cache). A JSON file per kind and code version under
``$XDG_CACHE_HOME/pensieve/tune`` (``PENSIEVE_TUNE_CACHE=DIR`` elsewhere, ``=0`` off); a file
that does not read is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parent


def cache_dir() -> Path | None:
    env = os.environ.get("PENSIEVE_TUNE_CACHE")
    if env == "0":
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pensieve" / "tune"


FULL_ENV = "PENSIEVE_TUNE_FULL"


def full_race() -> bool:
    """Whether the tuners race every candidate (``PENSIEVE_TUNE_FULL=1``). By default they leave
    out the families that never won a bucket on an H100 in the served runs of session 13
    (Qwen2.5-7B, GLM-4.7-Flash and gpt-oss shapes: e.g. the dequantising GEMM at 2048 rows,
    3x slower than dequantise + cuBLAS everywhere), keeping one fallback tile each; every
    compile a candidate costs is start time (~0.4 s each, ~400 at a cold start)."""
    return os.environ.get(FULL_ENV) == "1"


def _code_hash(sources: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in sources:
        try:
            h.update((_PKG / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()[:16]


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    """The GPU, its compute capability, torch, Triton and the dtype."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device)
    cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return f"{name}|sm{cap}|torch {torch.__version__}|triton {triton_version}|{dtype}"


class TuneCache:
    """The plans of one ``kind`` of layer whose kernels live in ``sources`` (files of this
    package: their contents are part of the file name, so an edit starts afresh)."""

    def __init__(self, kind: str, sources: tuple[str, ...], root: Path | None = None) -> None:
        self._root, self._name = root, f"{kind}-{_code_hash(sources)}"
        self._plans: dict[str, Any] | None = None

    @property
    def path(self) -> Path | None:
        """The file (the environment is read when first asked: ``PENSIEVE_TUNE_CACHE``)."""
        root = cache_dir() if self._root is None else self._root
        race = "-full" if full_race() else ""  # a plan of the whole race is kept apart
        return None if root is None else root / f"{self._name}{race}.json"

    def _load(self) -> dict[str, Any]:
        if self._plans is None:
            self._plans = {}
            if self.path is not None and self.path.exists():
                try:
                    self._plans = dict(json.loads(self.path.read_text()))
                except (OSError, ValueError, TypeError) as exc:
                    log.warning("tune cache %s unreadable (%s): timing afresh", self.path, exc)
        return self._plans

    def get(self, key: str) -> Any | None:
        return self._load().get(key)

    def checked(self, key: str, decode: Callable[[Any], Any],
                works: Callable[[Any], bool]) -> Any | None:
        """The plan kept under ``key``, decoded, where it decodes and still ``works`` (its
        kernels checked against the reference once); else None — a start then times afresh."""
        raw = self.get(key)
        if raw is None:
            return None
        try:
            plan = decode(raw)
        except (KeyError, TypeError, ValueError):
            return None
        return plan if works(plan) else None

    def put(self, key: str, value: Any) -> None:
        plans = self._load()
        plans[key] = value
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(plans, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError as exc:  # a cache: never the start's failure
            log.warning("tune cache %s not written: %s", self.path, exc)
