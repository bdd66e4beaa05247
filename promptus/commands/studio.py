"""``promptus studio``: the Promptus Studio web page on this machine (needs the ``studio`` extra)."""

from __future__ import annotations

import argparse
import logging
import signal

from ..errors import PromptusError
from ..studio.uploads import DEFAULT_MAX_UPLOAD_MB, MB, UploadLimits
from .common import add_model_args, add_threads_arg, honour_ctrl_c, use_threads


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "studio", help="a web page to encode a clip, follow and abort the work, and compare the result",
        description="Serve Promptus Studio: upload a clip (or pick the sample), choose a bitrate preset or every "
                    "setting, watch the encode (abort and resume it), then compare the regenerated video with the "
                    "original, with the real bitrate and per-frame PSNR/SSIM, and time the decoder backends. With "
                    "SD-Turbo weights in checkpoints/ it uses them, else the tiny test model (and says so).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest upload accepted, in MB (default: {DEFAULT_MAX_UPLOAD_MB})")
    p.add_argument("--workdir", default=None,
                   help="folder for the sessions' temporary files (default: a new folder in the system's temp dir)")
    p.add_argument("--vgg", default=None, help="local VGG-19 weights for the perceptual loss")
    add_model_args(p)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from ..studio.app import build_studio
    except ImportError as e:
        raise PromptusError(f"the studio needs Gradio ({e}); install it with: pip install 'promptus[studio]'") from e

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests, not news
    if args.max_upload_mb < 1:
        raise PromptusError(f"--max-upload-mb {args.max_upload_mb}: give at least 1")
    blocks = build_studio(args.model, checkpoints=args.checkpoints, device=args.device, taesd=args.taesd,
                          vgg=args.vgg, limits=UploadLimits(max_bytes=args.max_upload_mb * MB), workdir=args.workdir)
    studio = blocks.promptus_studio
    use_threads(args, studio.model.models.name, studio.model.device)  # encodes run in this process
    print(f"studio: model {studio.model.spec} on {studio.model.device}; open http://{args.host}:{args.port}/ "
          "(Ctrl-C stops it)", flush=True)
    # A service manager stops servers with SIGTERM: close as on Ctrl-C, removing the sessions' files.
    signal.signal(signal.SIGTERM, _interrupt)
    honour_ctrl_c()
    try:
        studio.launch(args.host, args.port, quiet=True)
    finally:
        studio.close()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
