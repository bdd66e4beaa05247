"""The ``promptus`` command: decode, info, import-legacy, demo."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__  # noqa: F401 (re-exported for --version)
from .errors import BitstreamError, PromptusError

log = logging.getLogger("promptus")

MODEL_HELP = (
    "model weights: 'auto' (checkpoints/sd_turbo.safetensors or checkpoints/sd-turbo if present), "
    "'tiny' (built-in random-weight test model), a single .safetensors/.ckpt file, a diffusers folder, "
    "or a hub id such as stabilityai/sd-turbo (needs internet)"
)


def _add_model_args(p: argparse.ArgumentParser, default_model: str = "auto") -> None:
    p.add_argument("--model", default=default_model, help=MODEL_HELP + f" (default: {default_model})")
    p.add_argument("--taesd", default=None,
                   help="TAESD weights: a diffusers folder or hub id (default: checkpoints/taesd, or madebyollin/taesd when online)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--checkpoints", default="checkpoints", help="folder searched by --model auto (default: checkpoints)")


def _load_models(args, device, *, need_vae: bool = False):
    from .backends import default_dtype
    from .models import load_models

    t0 = time.perf_counter()
    models = load_models(args.model, device=device, dtype=default_dtype(device), taesd=args.taesd,
                         vae=need_vae, checkpoints_dir=args.checkpoints)
    log.info("loaded model %r on %s in %.1f s", models.name, device, time.perf_counter() - t0)
    return models


# ------------------------------------------------------------------ decode


def cmd_decode(args) -> int:
    from tqdm import tqdm

    from .backends import make_backend, resolve_device
    from .bitstream import Header, iter_records
    from .decoder import Decoder
    from .video import FrameWriter

    src = Path(args.file)
    if not src.is_file():
        raise PromptusError(f"{src} does not exist or is not a file")
    device = resolve_device(args.device)
    models = _load_models(args, device)
    backend = make_backend(args.backend, models, device)
    decoder = Decoder(backend, models.identity())
    log.info("decoding %s with %s", src, backend.describe())

    t0 = time.perf_counter()
    with open(src, "rb") as f:
        records = iter_records(f)
        first = next(records)  # the header: needed for fps and the frame count
        assert isinstance(first, Header)
        header = first

        def items():
            yield header
            yield from records

        bar = tqdm(total=header.frame_count, unit="frame", desc="decode", disable=args.quiet)
        writer = FrameWriter(args.output, header.fps)
        try:
            try:
                for seg in decoder.stream(items()):
                    writer.write_batch(seg.frames)
                    bar.update(seg.frames.shape[0])
            except BitstreamError as e:
                if not args.allow_partial or writer.count == 0:
                    raise
                log.warning("%s\nkeeping the %d frames decoded before the damage (--allow-partial)", e, writer.count)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
    dt = time.perf_counter() - t0
    print(f"wrote {writer.count} frames to {args.output} in {dt:.1f} s ({writer.count / dt:.1f} frame/s, {backend.describe()})")
    return 0


# -------------------------------------------------------------------- info


def cmd_info(args) -> int:
    from .bitstream import describe

    path = Path(args.file)
    if not path.is_file():
        raise PromptusError(f"{path} does not exist or is not a file")
    print(describe(path.read_bytes()))
    return 0


# ----------------------------------------------------------- import-legacy


def cmd_import_legacy(args) -> int:
    from .bitstream import describe, write
    from .legacy import load_legacy

    bs = load_legacy(args.folder, fps=args.fps, init_precision=args.init_precision, interval=args.interval)
    n = write(args.output, bs, entropy=args.entropy)
    log.info("wrote %s (%d bytes)", args.output, n)
    if not args.quiet:
        print(describe(Path(args.output).read_bytes()))
    return 0


# -------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="promptus",
        description="Promptus: video compressed into prompts for SD-Turbo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'promptus COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"promptus {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="print debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("decode", help="regenerate the frames of a .promptus file",
                       description="Regenerate every frame of a .promptus bitstream with SD-Turbo + TAESD.")
    d.add_argument("file", help="the .promptus file")
    d.add_argument("-o", "--output", required=True, help="output: a .mp4/.mov/.mkv file or a folder for PNG frames")
    _add_model_args(d)
    d.add_argument("--backend", default="auto", choices=["auto", "torch"], help="network backend (default: auto)")
    d.add_argument("--allow-partial", action="store_true",
                   help="on a truncated or corrupted file, keep the frames decoded before the damage")
    d.set_defaults(func=cmd_decode)

    i = sub.add_parser("info", help="print a .promptus file's header, layout and bitrate",
                       description="Print the header, the bytes of every part and the bitrate (all bytes, and factors only).")
    i.add_argument("file", help="the .promptus file")
    i.set_defaults(func=cmd_info)

    L = sub.add_parser("import-legacy", help="convert a public-release prompt folder to .promptus",
                       description="Convert a folder of the public Promptus release (frame_XXXXX.prompt + init.pth) "
                                   "into one .promptus file. The dequantized factors stay bit-exact.")
    L.add_argument("folder", help="folder holding frame_XXXXX.prompt and init.pth")
    L.add_argument("-o", "--output", required=True, help="the .promptus file to write")
    L.add_argument("--fps", type=float, default=30.0, help="frame rate of the clip (default: 30)")
    L.add_argument("--init-precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="how the init latent is stored: fp32 (exact, 64 KiB at 512²), fp16 or int8 (default: fp32)")
    L.add_argument("--interval", type=int, default=None,
                   help="keyframe interval; inferred from the keyframe spacing (needed only for a single keyframe)")
    L.add_argument("--entropy", choices=["auto", "none"], default="auto",
                   help="lossless coding of the quantized factors: auto keeps the smallest of raw/zlib/lzma/bz2")
    L.set_defaults(func=cmd_import_legacy)

    m = sub.add_parser("demo", help="the main job: build a sample clip's prompts and decode them",
                       description="Make a sample prompt folder in the public release's layout, import it, "
                                   "print its layout and decode it with the best model available "
                                   "(SD-Turbo when its weights are present, else the tiny test model).")
    m.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    _add_model_args(m)
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="promptus: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except PromptusError as e:
        print(f"promptus: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("promptus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
