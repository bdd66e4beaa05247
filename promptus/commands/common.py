"""What several commands share: model, verbosity and encoder options, model loading, running a command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from ..config import INIT_LATENT_SOURCES, INIT_PRECISIONS, CodecConfig, TrainConfig
from ..errors import PromptusError

log = logging.getLogger("promptus")

MODEL_HELP = (
    "model weights: 'auto' (checkpoints/sd_turbo.safetensors or checkpoints/sd-turbo if present), "
    "'tiny' (built-in random-weight test model), a single .safetensors/.ckpt file, a diffusers folder, "
    "or a hub id such as stabilityai/sd-turbo (needs internet)"
)


def add_model_args(p: argparse.ArgumentParser, default_model: str = "auto") -> None:
    """--model, --taesd, --device and --checkpoints."""
    p.add_argument("--model", default=default_model, help=MODEL_HELP + f" (default: {default_model})")
    p.add_argument("--taesd", default=None,
                   help="TAESD weights: a diffusers folder or hub id (default: checkpoints/taesd, or madebyollin/taesd when online)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--checkpoints", default="checkpoints", help="folder searched by --model auto (default: checkpoints)")


def add_verbosity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="print debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")


def add_encode_args(p: argparse.ArgumentParser, *, rate: bool = True, iters: tuple[int, int] | None = None) -> None:
    """The encoder's options (shared by ``encode``, ``demo``, ``sweep`` and the scripts).

    Defaults come from :class:`CodecConfig` and :class:`TrainConfig`; ``iters``
    overrides the two iteration counts (the demo runs fewer).
    """
    codec, train = CodecConfig(), TrainConfig()
    published = (train.iters_first, train.iters)
    iters = iters or published
    if rate:
        p.add_argument("--rank", type=int, default=codec.rank,
                       help=f"prompt rank r: sets the bitrate (default: {codec.rank})")
        p.add_argument("--interval", type=int, default=codec.interval,
                       help=f"keyframe interval T (default: {codec.interval})")
    p.add_argument("--size", type=int, default=codec.width,
                   help=f"frame size in pixels, a multiple of {codec.latent_factor} (default: {codec.width})")
    p.add_argument("--fps", type=float, default=None,
                   help=f"frame rate (default: the video's, else {codec.fps:g})")
    p.add_argument("--iters-first", type=int, default=iters[0],
                   help=f"iterations for keyframe 0 (default: {iters[0]}; the published value is {published[0]})")
    p.add_argument("--iters", type=int, default=iters[1],
                   help=f"iterations for each later keyframe (default: {iters[1]}; the published value is {published[1]})")
    p.add_argument("--max-frames", type=int, default=None, help="encode only the first N frames")
    p.add_argument("--init-latent", choices=INIT_LATENT_SOURCES, default=train.init_latent,
                   help="init latent from the SD VAE encoder (published) or TAESD's (cheaper) "
                        f"(default: {train.init_latent})")
    p.add_argument("--init-precision", choices=INIT_PRECISIONS, default=train.init_precision,
                   help=f"storage of the init latent (default: {train.init_precision})")
    p.add_argument("--perceptual", choices=["on", "off"], default="on" if train.perceptual else "off",
                   help="VGG-19 perceptual loss; off needs no VGG weights but gives lower quality (default: on)")
    p.add_argument("--vgg", default=None, help="local VGG-19 weights (torchvision's vgg19-dcbb9e9d.pth)")
    p.add_argument("--seed", type=int, default=codec.seed,
                   help=f"latent noise seed (default: {codec.seed}, as published)")


def codec_from_args(args, fps: float = CodecConfig.fps, **changes) -> CodecConfig:
    """The codec settings of the encoder options (``--rank``/``--interval`` where the parser has them)."""
    values = dict(width=args.size, height=args.size, fps=fps, seed=args.seed)
    for name in ("rank", "interval"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    values.update(changes)
    return CodecConfig(**values)


def train_from_args(args) -> TrainConfig:
    """The trainer settings of the encoder options."""
    return TrainConfig(iters_first=args.iters_first, iters=args.iters, perceptual=args.perceptual == "on",
                       init_latent=args.init_latent, init_precision=args.init_precision)


def load_models(args, device, *, need_vae: bool = False, dtype=None):
    """The models named by ``--model``/``--taesd``/``--checkpoints`` on ``device``, in ``dtype``
    (default: the decoder's precision)."""
    from ..backends import default_dtype
    from ..models import load_models as load

    t0 = time.perf_counter()
    models = load(args.model, device=device, dtype=dtype or default_dtype(device), taesd=args.taesd, vae=need_vae,
                  checkpoints_dir=args.checkpoints)
    log.info("loaded model %r on %s in %.1f s", models.name, device, time.perf_counter() - t0)
    return models


def setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="promptus: %(message)s")


def run_command(prog: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``func(args)`` as a command: user errors and Ctrl-C become messages and exit codes.

    What input or the machine can cause — a :class:`PromptusError`, or an ``OSError``
    (a full disk, a permission, a vanished file) — becomes ``PROG: error: …`` and exit
    status 1. Anything else is a bug in promptus and keeps its traceback.
    """
    setup_logging(args)
    try:
        return func(args)
    except PromptusError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (long jobs resume: run the same command again, with --resume for encode)",
              file=sys.stderr)
        return 130
