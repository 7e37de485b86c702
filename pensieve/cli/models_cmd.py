"""``pensieve models`` (list the store) and ``pensieve rm NAME`` (remove one)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pensieve.cli.pull import add_store_arg
from pensieve.store.errors import StoreError
from pensieve.store.store import store_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models in the store")
    p.add_argument("--json", action="store_true", help="the manifests as JSON")
    add_store_arg(p)
    p.set_defaults(func=list_models)
    r = sub.add_parser("rm", help="remove a model from the store")
    r.add_argument("names", nargs="+", metavar="NAME")
    add_store_arg(r)
    r.set_defaults(func=remove)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def list_models(ns: argparse.Namespace) -> int:
    store = store_from(ns.store, os.environ)
    manifests = store.list()
    if ns.json:
        print(json.dumps([m.to_json() for m in manifests], indent=2))
        return 0
    if not manifests:
        print(f"no models in {store.root}; add one with `pensieve pull SOURCE` "
              "(`pensieve pull --list` shows the catalogue)")
        _print_default()
        return 0
    rows = [("NAME", "SIZE", "FORMAT", "ARCH", "CONTEXT", "SAMPLING", "SOURCE")]
    for m in manifests:
        rows.append((m.name, _size(m.size), m.format, m.architecture or "?",
                     str(m.context_length or "?"), m.params.describe(), m.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    _print_default()
    return 0


def _print_default() -> None:
    """The embedded model `pensieve serve` runs without --model, and its sampling defaults."""
    from pensieve.loaders.default_model import DefaultModelMissing, default_model_path
    from pensieve.store.sampling import known_file_params

    try:
        path = default_model_path()
    except DefaultModelMissing:
        return
    print(f"\nwithout --model: {path.name} ({_size(path.stat().st_size)}, embedded), "
          f"sampling {known_file_params(path).describe()}")


def remove(ns: argparse.Namespace) -> int:
    store = store_from(ns.store, os.environ)
    status = 0
    for name in ns.names:
        try:
            manifest = store.remove(name)
        except StoreError as exc:
            print(f"pensieve: error: {exc}", file=sys.stderr)
            status = 1
            continue
        linked = manifest is not None and manifest.imported == "symlink"
        note = " (a symlink: the original is kept)" if linked else ""
        print(f"removed {name}{note}")
    return status
