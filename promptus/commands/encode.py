"""``promptus encode``: invert a clip into a .promptus file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backends import BASELINE, backend_names
from ..config import DEFAULT_ENGINE_DIR
from .common import add_encode_args, add_model_args, codec_from_args, load_models, train_from_args

# The closed loop needs a concrete backend: 'auto' could differ between encoder and decoder.
CLOSED_LOOP_BACKENDS = backend_names(simplest_first=True)  # eager first


def register(subparsers) -> None:
    e = subparsers.add_parser("encode", help="invert a clip into a .promptus file",
                              description="Invert a clip (a folder of frames or a video file) into keyframe prompts "
                                          "and write a .promptus bitstream. A checkpoint is kept after every keyframe; "
                                          "--resume continues an interrupted run.")
    e.add_argument("input", help="a folder of frames (00000.png, ...) or a video file")
    e.add_argument("-o", "--output", required=True, help="the .promptus file to write")
    add_encode_args(e)
    add_model_args(e)
    e.add_argument("--devices", default=None, metavar="LIST",
                   help="encode on several devices, one process each, summing their gradients every step: "
                        "cuda:0,cuda:1 (any list), all (every GPU), or cpu,cpu (gloo, a test); replaces --device; "
                        "--max-memory applies to each device (default: one device, --device)")
    e.add_argument("--engine-dir", default=DEFAULT_ENGINE_DIR,
                   help="with --compile-step: where the compiled training step is kept for later runs "
                        f"(<dir>/trainer/; default: {DEFAULT_ENGINE_DIR}/)")
    e.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    e.add_argument("--closed-loop-backend", default=BASELINE, choices=CLOSED_LOOP_BACKENDS,
                   help="decoder backend the closed loop regenerates segments with; decoding with the same "
                        "backend reproduces the encoder's reconstruction exactly (default: eager)")
    e.set_defaults(func=run)


def run_encode(args: argparse.Namespace, source, output, models=None):
    """Encode ``source`` to ``output`` with the encoder options in ``args``; returns the EncodeResult."""
    from ..backends import backend_for_clip, resolve_device
    from ..config import CodecConfig
    from ..encoder import Encoder
    from ..video import video_fps

    fps = args.fps or video_fps(source) or CodecConfig.fps
    codec, train = codec_from_args(args, fps), train_from_args(args)
    devices = getattr(args, "devices", None)
    if devices is not None:
        from ..distributed import ModelSource, parse_devices

        devices = parse_devices(devices)  # before the models load
        device = devices[0]
        worker_models = ModelSource(args.model, args.taesd, args.checkpoints, vae=train.init_latent == "vae")
    else:
        device, worker_models = resolve_device(args.device), None
    if models is None:
        models = load_models(args, device, need_vae=train.init_latent == "vae")
    backend = backend_for_clip(codec, models, name=getattr(args, "closed_loop_backend", BASELINE), device=device)
    enc = Encoder(codec, train, models, device=device, vgg=args.vgg, progress=not args.quiet, backend=backend,
                  devices=devices, worker_models=worker_models, engine_dir=getattr(args, "engine_dir", None))
    return enc.encode(source, output, max_frames=args.max_frames, resume=args.resume)


def encode_summary(res) -> str:
    """The lines ``encode`` prints: bytes, both bitrates (as ``info`` prints them) and the closed-loop PSNR."""
    from ..bitstream import file_rate

    rate = file_rate(Path(res.path).read_bytes())
    return (f"wrote {res.path}: {res.frame_count} frames, {len(res.keyframes)} keyframes, {res.bytes} bytes\n"
            f"bitrate: {rate.describe()}\n"
            f"mean closed-loop PSNR {res.mean_psnr:.2f} dB (segments' PSNR of their mean MSE, weighted by frame "
            f"count)")


def print_encode_summary(res) -> None:
    print(encode_summary(res))


def run(args: argparse.Namespace) -> int:
    from ..files import check_output_path

    check_output_path(args.output, "file")  # before the models load and the training starts
    print_encode_summary(run_encode(args, args.input, args.output))
    return 0
