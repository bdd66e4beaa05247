"""The ``promptus`` command: :func:`build_parser` and :func:`main`.

Every command is a module of this package listed in :data:`COMMANDS`; the order
here is the order of ``promptus --help``.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import bench, decode, demo, encode, engines, import_legacy, info, play, serve, studio, sweep
from . import eval as eval_
from .common import add_verbosity_args, run_command

#: The command modules, each with ``register(subparsers)`` and ``run(args) -> int``.
COMMANDS = (decode, encode, info, import_legacy, demo, eval_, sweep, engines, bench, serve, play, studio)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="promptus",
        description="Promptus: video compressed into prompts for SD-Turbo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'promptus COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"promptus {__version__}")
    add_verbosity_args(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command("promptus", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
