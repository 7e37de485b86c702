"""`pensieve` console script: sub-commands."""

from __future__ import annotations

import argparse
import gc
import sys

from pensieve.cli import claude, daemon, models_cmd, pull, run
from pensieve.cli.errors import StartupError

# Store and daemon commands never import torch (serve does, ~7 s on 2 busy cores).
LIGHT_COMMANDS = frozenset({"pull", "models", "rm", "start", "stop", "status", "logs", "ps",
                            "run"})


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pensieve", description="Local LLM server speaking the Anthropic Messages API"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    if not light:
        from pensieve.cli import convert, serve

        serve.add_parser(sub)
        convert.add_parser(sub)
    claude.add_parser(sub)
    pull.add_parser(sub)
    models_cmd.add_parser(sub)
    daemon.add_parser(sub)
    run.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["claude"]:  # its arguments mostly belong to Claude Code: no argparse here
        return claude.run(argv[1:])
    if argv[:1] == ["serve"]:
        # its imports (torch, fastapi…) make ~340k objects that the collector would walk again
        # and again as they pile up (~0.3-0.5 s of a 1.5B CPU start); serve.run turns it back on
        gc.disable()
    args = build_parser(light=argv[:1] != [] and argv[0] in LIGHT_COMMANDS).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (StartupError, ValueError) as exc:
        print(f"pensieve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
