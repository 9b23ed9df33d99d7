"""The `setseq` command: a thin face over the packages. Each subcommand lives in its own module
under `setseq/` exposing `register(subparsers)`, which adds a parser whose `func` runs it."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `setseq --help` lists them.
COMMANDS = ["info", "convert", "personalize", "generate", "export", "pretrain", "demo", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="setseq", description="Set-and-Sequence dynamic-concept personalization of video DiTs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"setseq.cmd_{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, non-zero exit
        print(f"setseq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
