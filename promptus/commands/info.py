"""``promptus info``: a .promptus file's header, layout and bitrate."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PromptusError


def register(subparsers) -> None:
    i = subparsers.add_parser("info", help="print a .promptus file's header, layout and bitrate",
                              description="Print the header, the bytes of every part and the bitrate (all bytes, and "
                                          "factors only).")
    i.add_argument("file", help="the .promptus file")
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bitstream import describe
    from ..files import read_regular

    path = Path(args.file)
    if not path.is_file():
        raise PromptusError(f"{path} does not exist or is not a file")
    print(describe(read_regular(path, what=".promptus file")))
    return 0
