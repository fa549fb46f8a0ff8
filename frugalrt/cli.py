"""``frugalrt`` command line: a thin layer over the Python API.

Each subcommand is a function registered with :func:`command`; it receives parsed arguments and
returns an exit code. Errors derived from :class:`FrugalError` print one clear line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from frugalrt.errors import FrugalError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn`` as subcommand ``name``; ``configure`` adds its arguments."""

    def wrap(fn: Handler) -> Handler:
        _COMMANDS[name] = (help, configure, fn)
        return fn

    return wrap


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugalrt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, configure, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        configure(p)
        p.set_defaults(_handler=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._handler(args) or 0)
    except FrugalError as e:
        print(f"frugalrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --- subcommands (each section owned by one area: export, targets, runtime, devices, nn) ---------


if __name__ == "__main__":
    sys.exit(main())
