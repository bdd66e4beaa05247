"""``promptus engines build|list|clean``: the TensorRT engine cache.

For now a thin wrapper over the parser and actions that
:mod:`promptus.backends.tensorrt` still holds; they move here when that module is split.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from ..backends.tensorrt import add_engines_parser

    p = add_engines_parser(subparsers)  # its actions set their own func; a bare `engines` prints help
    p.set_defaults(func=lambda args: run(args, p))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """A bare ``promptus engines`` (no action): the help, exit code 2."""
    if parser is not None:
        parser.print_help()
    return 2
