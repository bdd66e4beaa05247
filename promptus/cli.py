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
    from .pipeline import PipelinedDecoder
    from .video import FrameWriter

    src = Path(args.file)
    if not src.is_file():
        raise PromptusError(f"{src} does not exist or is not a file")
    device = resolve_device(args.device)
    with open(src, "rb") as f:
        records = iter_records(f)
        header = next(records)  # the header first: it gives the fps, frame count and batch
        assert isinstance(header, Header)
        models = _load_models(args, device)
        backend = make_backend(args.backend, models, device, batch=header.interval, size=header.width,
                               engine_dir=args.engine_dir)
        decoder = PipelinedDecoder(Decoder(backend, models.identity()), to_host=True)
        log.info("decoding %s with %s", src, backend.describe())

        def items():
            yield header
            yield from records

        t0 = time.perf_counter()
        bar = tqdm(total=header.frame_count, unit="frame", desc="decode", disable=args.quiet)
        writer = FrameWriter(args.output, header.fps)

        def sink(start, frames):
            writer.write_batch(frames)
            bar.update(frames.shape[0])

        try:
            try:
                decoder.run(items(), sink)
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


# ------------------------------------------------------------------ encode


def add_encode_args(p: argparse.ArgumentParser, *, rate: bool = True, iters: tuple[int, int] = (10_000, 1_500)) -> None:
    """The encoder's options (shared by ``encode``, ``demo``, the scripts and the sweep)."""
    if rate:
        p.add_argument("--rank", type=int, default=8, help="prompt rank r: sets the bitrate (default: 8)")
        p.add_argument("--interval", type=int, default=10, help="keyframe interval T (default: 10)")
    p.add_argument("--size", type=int, default=512, help="frame size in pixels, a multiple of 8 (default: 512)")
    p.add_argument("--fps", type=float, default=None, help="frame rate (default: the video's, else 30)")
    p.add_argument("--iters-first", type=int, default=iters[0],
                   help=f"iterations for keyframe 0 (default: {iters[0]}; the published value is 10000)")
    p.add_argument("--iters", type=int, default=iters[1],
                   help=f"iterations for each later keyframe (default: {iters[1]}; the published value is 1500)")
    p.add_argument("--max-frames", type=int, default=None, help="encode only the first N frames")
    p.add_argument("--init-latent", choices=["vae", "taesd"], default="vae",
                   help="init latent from the SD VAE encoder (published) or TAESD's (cheaper) (default: vae)")
    p.add_argument("--init-precision", choices=["int8", "fp16", "fp32"], default="fp16",
                   help="storage of the init latent (default: fp16)")
    p.add_argument("--perceptual", choices=["on", "off"], default="on",
                   help="VGG-19 perceptual loss; off needs no VGG weights but gives lower quality (default: on)")
    p.add_argument("--vgg", default=None, help="local VGG-19 weights (torchvision's vgg19-dcbb9e9d.pth)")
    p.add_argument("--seed", type=int, default=88, help="latent noise seed (default: 88, as published)")


def configs_from_args(args, fps: float):
    from .config import CodecConfig, TrainConfig

    codec = CodecConfig(width=args.size, height=args.size, fps=fps, rank=args.rank, interval=args.interval,
                        seed=args.seed)
    train = TrainConfig(iters_first=args.iters_first, iters=args.iters, perceptual=args.perceptual == "on",
                        init_latent=args.init_latent, init_precision=args.init_precision)
    return codec, train


def run_encode(args, source, output, models=None):
    """Encode ``source`` to ``output`` with the CLI options in ``args``; returns the EncodeResult."""
    from .backends import resolve_device
    from .encoder import Encoder
    from .video import video_fps

    fps = args.fps or video_fps(source) or 30.0
    codec, train = configs_from_args(args, fps)
    device = resolve_device(args.device)
    if models is None:
        models = _load_models(args, device, need_vae=train.init_latent == "vae")
    enc = Encoder(codec, train, models, device=device, vgg=args.vgg, progress=not args.quiet,
                  backend=getattr(args, "closed_loop_backend", "eager"))
    return enc.encode(source, output, max_frames=args.max_frames, resume=args.resume)


def print_encode_summary(res) -> None:
    from .bitstream import layout

    recs = layout(Path(res.path).read_bytes())
    factor_bytes = sum(r.payload for r in recs if r.name.startswith("keyframe"))
    print(f"wrote {res.path}: {res.frame_count} frames, {len(res.keyframes)} keyframes, {res.bytes} bytes")
    print(f"bitrate: {res.kbps:.1f} kbit/s (all bytes), {8 * factor_bytes / res.duration_s / 1000:.1f} kbit/s "
          f"(keyframe payloads only); mean closed-loop PSNR {res.mean_psnr:.2f} dB")


def cmd_encode(args) -> int:
    res = run_encode(args, args.input, args.output)
    print_encode_summary(res)
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


# ------------------------------------------------------------------- bench


def cmd_bench(args) -> int:
    from .bench import bench_decode, bench_encode

    if args.encode:
        bench_encode(model=args.model, device=args.device, size=args.size, interval=args.interval, rank=args.rank,
                     iters=args.iters, iters_published=args.iters_published, warmup=args.warmup,
                     perceptual=args.perceptual == "on", json_path=args.json)
    else:
        bench_decode(model=args.model, device=args.device, size=args.size, batch=args.batch,
                     backends=args.backends, keyframes=args.keyframes, json_path=args.json)
    return 0


# ------------------------------------------------------------------ parser


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

    d = sub.add_parser("decode", help="regenerate the frames of a .promptus file",
                       description="Regenerate every frame of a .promptus bitstream with SD-Turbo + TAESD.")
    d.add_argument("file", help="the .promptus file")
    d.add_argument("-o", "--output", required=True, help="output: a .mp4/.mov/.mkv file or a folder for PNG frames")
    _add_model_args(d)
    d.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "compile", "torch", "eager"],
                   help="network backend: auto takes tensorrt where it can run, else compile on CUDA, else torch "
                        "(default: auto)")
    d.add_argument("--engine-dir", default="engines", help="TensorRT engine cache (default: engines/)")
    d.add_argument("--allow-partial", action="store_true",
                   help="on a truncated or corrupted file, keep the frames decoded before the damage")
    d.set_defaults(func=cmd_decode)

    e = sub.add_parser("encode", help="invert a clip into a .promptus file",
                       description="Invert a clip (a folder of frames or a video file) into keyframe prompts "
                                   "and write a .promptus bitstream. A checkpoint is kept after every keyframe; "
                                   "--resume continues an interrupted run.")
    e.add_argument("input", help="a folder of frames (00000.png, ...) or a video file")
    e.add_argument("-o", "--output", required=True, help="the .promptus file to write")
    add_encode_args(e)
    _add_model_args(e)
    e.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    e.add_argument("--closed-loop-backend", default="eager", choices=["eager", "torch", "compile", "tensorrt"],
                   help="decoder backend the closed loop regenerates segments with; decoding with the same "
                        "backend reproduces the encoder's reconstruction exactly (default: eager)")
    e.set_defaults(func=cmd_encode)

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

    m = sub.add_parser("demo", help="the main job: encode and decode the sample clip",
                       description="Encode the project's sample clip (data/sky, made on first use) with the best "
                                   "model available (SD-Turbo when its weights are present, else the tiny test "
                                   "model), decode it, and print the bitrate and PSNR.")
    m.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    m.add_argument("--clip", default=None, help="another clip to use instead of data/sky")
    add_encode_args(m, iters=(300, 100))
    m.set_defaults(size=None, max_frames=21, resume=False)
    _add_model_args(m)
    m.set_defaults(func=cmd_demo)
    from .metrics import add_eval_parser
    from .sweep import add_sweep_parser

    add_eval_parser(sub)
    add_sweep_parser(sub)
    from .backends.tensorrt import add_engines_parser

    add_engines_parser(sub)

    b = sub.add_parser("bench", help="benchmarks: a table and JSON",
                       description="Decoder backends (default): per-stage ms, end-to-end FPS with frames left on "
                                   "the GPU and copied to the host, peak memory, FLOPs and the fraction of the "
                                   "measured matmul ceiling, parity with fp32; the eager fp16 pipeline is the "
                                   "baseline. --encode: the published per-frame inversion procedure against "
                                   "promptus' batched trainer. Full-size architecture with random weights unless "
                                   "--model names real ones.")
    b.add_argument("--encode", action="store_true", help="benchmark the inversion trainer instead of decoding")
    b.add_argument("--backends", nargs="+", default=["eager", "torch", "compile", "tensorrt"],
                   help="decoder backends to time (default: eager torch compile tensorrt)")
    b.add_argument("--batch", type=int, default=10, help="frames per segment for the decoder benchmark (default: 10)")
    b.add_argument("--keyframes", type=int, default=31, help="keyframes of the timed clip (default: 31 → 301 frames)")
    b.add_argument("--model", default="random", help="'random' (full-size, random weights), 'tiny', or weights")
    b.add_argument("--device", default="auto")
    b.add_argument("--size", type=int, default=512)
    b.add_argument("--interval", type=int, default=10)
    b.add_argument("--rank", type=int, default=8)
    b.add_argument("--iters", type=int, default=10, help="timed iterations of promptus' trainer (default: 10)")
    b.add_argument("--iters-published", type=int, default=3, help="timed iterations of the published loop")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--perceptual", choices=["on", "off"], default="on")
    b.add_argument("--json", default=None, help="write the results as JSON here")
    b.set_defaults(func=cmd_bench)
    return p


def setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="promptus: %(message)s")


def add_verbosity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="print debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")


def run_command(prog: str, func, args) -> int:
    """Run ``func(args)`` as a command: user errors and Ctrl-C become messages and exit codes."""
    setup_logging(args)
    try:
        return func(args)
    except PromptusError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (long jobs resume: run the same command again, with --resume for encode)",
              file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command("promptus", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
