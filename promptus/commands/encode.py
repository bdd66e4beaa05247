"""``promptus encode``: invert a clip into a .promptus file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backends import BASELINE, backend_names
from ..config import CPU_ITERS, CPU_ITERS_FIRST, DEFAULT_ENGINE_DIR, TINY_SIZE, CodecConfig, TrainConfig
from .common import (EncodeForecast, add_encode_args, add_model_args, add_threads_arg, codec_from_args, load_models,
                     resolve_encoder_defaults, resolve_perceptual, train_from_args, use_threads)

#: The defaults ``encode`` resolves when it knows the device and the model (``--help`` says which).
ENCODE_DEFAULTS = {
    "size": (None, f"default: {CodecConfig.width}; {TINY_SIZE} on a CPU with the tiny model"),
    "iters_first": (None, f"default: {TrainConfig.iters_first}, as published; {CPU_ITERS_FIRST} on a CPU"),
    "iters": (None, f"default: {TrainConfig.iters}, as published; {CPU_ITERS} on a CPU"),
    "perceptual": ("auto", "default: auto"),
}

# The closed loop needs a concrete backend: 'auto' could differ between encoder and decoder.
CLOSED_LOOP_BACKENDS = backend_names(simplest_first=True)  # eager first


def register(subparsers) -> None:
    e = subparsers.add_parser("encode", help="invert a clip into a .promptus file",
                              description="Invert a clip (a folder of frames or a video file) into keyframe prompts "
                                          "and write a .promptus bitstream. A checkpoint is kept after every keyframe; "
                                          "--resume continues an interrupted run.")
    e.add_argument("input", help="a folder of frames (00000.png, ...) or a video file")
    e.add_argument("-o", "--output", required=True, help="the .promptus file to write")
    add_encode_args(e, defaults=ENCODE_DEFAULTS)
    add_model_args(e)
    add_threads_arg(e)
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
    import torch

    from ..backends import backend_for_clip, resolve_device
    from ..config import CodecConfig
    from ..encoder import Encoder
    from ..video import frame_count_hint, video_fps

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
    use_threads(args, models.name, device)
    forecast = None
    if device.type == "cpu" and not isinstance(source, torch.Tensor):
        command = getattr(args, "command", None) or "encode"
        forecast = EncodeForecast(codec, train, frame_count_hint(source, args.max_frames), command)
    backend = backend_for_clip(codec, models, name=getattr(args, "closed_loop_backend", BASELINE), device=device)
    enc = Encoder(codec, train, models, device=device, vgg=args.vgg, progress=not args.quiet, backend=backend,
                  devices=devices, worker_models=worker_models, engine_dir=getattr(args, "engine_dir", None),
                  callback=forecast)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines between the progress bars, not inside them
        return enc.encode(source, output, max_frames=args.max_frames, resume=args.resume)


def encode_summary(res, *, rate: bool = True) -> str:
    """The lines ``encode`` prints: bytes, both bitrates (as ``info`` prints them; ``rate=False`` leaves them
    out for a caller that printed the file's layout) and the closed-loop PSNR."""
    from ..bitstream import file_rate

    rates = f"bitrate: {file_rate(Path(res.path).read_bytes()).describe()}\n" if rate else ""
    return (f"wrote {res.path}: {res.frame_count} frames, {len(res.keyframes)} keyframes, {res.bytes} bytes\n"
            f"{rates}"
            f"mean closed-loop PSNR {res.mean_psnr:.2f} dB (segments' PSNR of their mean MSE, weighted by frame "
            f"count)")


def print_encode_summary(res, *, rate: bool = True) -> None:
    print(encode_summary(res, rate=rate))


def run(args: argparse.Namespace) -> int:
    from ..backends import resolve_device
    from ..files import check_output_path

    check_output_path(args.output, "file")  # before the models load and the training starts
    resolve_perceptual(args, "encode")
    resolve_encoder_defaults(args, resolve_device(args.device), args.model, "encode")
    print_encode_summary(run_encode(args, args.input, args.output))
    return 0
