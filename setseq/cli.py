"""The `setseq` command: a thin face over the packages. Each subcommand lives in its own module
under `setseq/` exposing `register(subparsers)`, which adds a parser whose `func` runs it."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `setseq --help` lists them.
COMMANDS = ["info", "convert", "personalize", "generate", "export", "pretrain", "demo", "bench"]
# Ordinary mistakes with files (an --out that is a folder, an unwritable folder): one line, not a traceback.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """A usage error in one line (argparse prints the whole usage first: 12 lines for `setseq generate`)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    except (ValueError, *PATH_ERRORS) as err:  # bad input: one clear line, non-zero exit
        print(f"setseq {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: Exception) -> str:
    """The error's message; an OSError's without its errno prefix, with the paths it names."""
    if not isinstance(err, OSError) or err.strerror is None:
        return str(err)
    paths = " -> ".join(repr(str(p)) for p in (err.filename, err.filename2) if p is not None)
    return f"{paths}: {err.strerror.lower()}" if paths else err.strerror.lower()


if __name__ == "__main__":
    sys.exit(main())
