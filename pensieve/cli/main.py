"""`pensieve` console script: sub-commands."""

from __future__ import annotations

import argparse
import sys

from pensieve.cli import claude, models_cmd, pull, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pensieve", description="Local LLM server speaking the Anthropic Messages API"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(sub)
    claude.add_parser(sub)
    pull.add_parser(sub)
    models_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["claude"]:  # its arguments mostly belong to Claude Code: no argparse here
        return claude.run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (serve.StartupError, ValueError) as exc:
        print(f"pensieve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
