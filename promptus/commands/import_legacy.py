"""``promptus import-legacy``: a folder of the public release → one .promptus file."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..bitstream import CODECS, ENTROPY_CHOICES
from ..config import INIT_PRECISIONS, CodecConfig

log = logging.getLogger("promptus")


def register(subparsers) -> None:
    L = subparsers.add_parser("import-legacy", help="convert a public-release prompt folder to .promptus",
                              description="Convert a folder of the public Promptus release (frame_XXXXX.prompt + "
                                          "init.pth) into one .promptus file. The dequantized factors stay bit-exact.")
    L.add_argument("folder", help="folder holding frame_XXXXX.prompt and init.pth")
    L.add_argument("-o", "--output", required=True, help="the .promptus file to write")
    L.add_argument("--fps", type=float, default=CodecConfig.fps,
                   help=f"frame rate of the clip (default: {CodecConfig.fps:g})")
    L.add_argument("--init-precision", choices=INIT_PRECISIONS, default="fp32",
                   help="how the init latent is stored: fp32 (exact, 64 KiB at 512²), fp16 or int8 (default: fp32)")
    L.add_argument("--interval", type=int, default=None,
                   help="keyframe interval; inferred from the keyframe spacing (needed only for a single keyframe)")
    L.add_argument("--entropy", choices=ENTROPY_CHOICES, default="auto",
                   help=f"lossless coding of the quantized factors: auto keeps the smallest of {'/'.join(CODECS)}, "
                        "none stores raw, a coder's name tries only that one (default: auto)")
    L.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bitstream import describe, write
    from ..files import check_output_path
    from ..legacy import load_legacy

    check_output_path(args.output, "file")
    bs = load_legacy(args.folder, fps=args.fps, init_precision=args.init_precision, interval=args.interval)
    n = write(args.output, bs, entropy=args.entropy)
    log.info("wrote %s (%d bytes)", args.output, n)
    if not args.quiet:
        print(describe(Path(args.output).read_bytes()))
    return 0
