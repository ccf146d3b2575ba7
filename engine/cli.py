"""`pairuni` console script. Each subcommand lives in its own module, listed below.

A module in `COMMAND_MODULES` defines `register(subparsers)`, which adds its parser(s) and
sets `func` (called with the parsed args; its return value is the exit code).
Modules are imported lazily, so `pairuni --help` stays fast and a missing optional
dependency only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES: list[str] = [f"{__package__}.{name}" for name in ("train_cli", "data.cli", "plan", "probe", "export",
                                                                       "evaluate", "parity")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairuni", description="PairGRPO for unified VLMs (Janus-Pro).")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (by default: one line naming the key or file)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def user_error(command: str, args, exc: Exception, prefix: str = "", suffix: str = "") -> int:
    """A subcommand's error: one line `pairuni COMMAND: PREFIX MESSAGE SUFFIX` on stderr and exit code 2; with
    `pairuni --debug`, the exception itself (full traceback). An OSError's line names its file(s)."""
    if getattr(args, "debug", False):
        raise exc
    message = " ".join(str(exc).split("\n"))
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
        message += f": {exc.filename}"
    print(f"pairuni {command}: {prefix}{message}{suffix}", file=sys.stderr)
    return 2


def run_command(register, command: str, argv: list[str] | None = None) -> int:
    """`python -m engine.<module>`: one subcommand's parser (`register`) run on `argv` (default: sys.argv)."""
    parser = argparse.ArgumentParser(prog="pairuni")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([command, *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
