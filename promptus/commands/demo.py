"""``promptus demo``: the project's main job, end to end on one machine.

Encode the project's sample clip (data/sky, made on first use) with the best
model available — SD-Turbo when its weights are present, else the built-in tiny
model, saying which — write the .promptus file, show its layout, decode it, and
print the bitrate and PSNR.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..config import CPU_ITERS, CPU_ITERS_FIRST, TINY_SIZE, CodecConfig, TrainConfig
from ..errors import PromptusError
from .common import add_encode_args, add_model_args, add_threads_arg, resolve_perceptual, use_threads
from .encode import print_encode_summary, run_encode

_CHECKOUT = Path(__file__).resolve().parents[2]
# In a source checkout the sample clip lives in its data/; an installed package makes it under ./data.
SAMPLE = (_CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()) / "data" / "sky"
#: Frames of the sample clip (all of them go into a --full run).
SAMPLE_FRAMES = 141
#: The demo's frames and iterations: a short run by default, the published iterations on the whole clip with --full.
QUICK = {"max_frames": 21, "iters_first": CPU_ITERS_FIRST, "iters": CPU_ITERS}
FULL = {"max_frames": SAMPLE_FRAMES, "iters_first": TrainConfig.iters_first, "iters": TrainConfig.iters}


def register(subparsers) -> None:
    m = subparsers.add_parser(
        "demo", help="the main job: encode and decode the sample clip",
        description="Encode the project's sample clip (data/sky, made on first use) with the best model available "
                    "(SD-Turbo when its weights are present, else the tiny test model), decode it, and print the "
                    f"bitrate and PSNR. By default a short run: {QUICK['max_frames']} frames, "
                    f"{QUICK['iters_first']}/{QUICK['iters']} iterations (about a minute on two CPU cores with the "
                    f"tiny model); --full encodes all {SAMPLE_FRAMES} frames with the published "
                    f"{FULL['iters_first']}/{FULL['iters']} iterations (hours; meant for SD-Turbo on a GPU).")
    m.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    m.add_argument("--clip", default=None, help="another clip to use instead of data/sky")
    m.add_argument("--full", action="store_true",
                   help=f"the long run: all {SAMPLE_FRAMES} frames at the published iteration counts")
    both = "{}; {} with --full"
    add_encode_args(m, defaults={
        "size": (None, f"default: {TINY_SIZE} with the tiny model, {CodecConfig.width} with SD-Turbo"),
        "iters_first": (None, "default: " + both.format(QUICK["iters_first"], FULL["iters_first"])),
        "iters": (None, "default: " + both.format(QUICK["iters"], FULL["iters"])),
        "max_frames": (None, "default: " + both.format(QUICK["max_frames"], FULL["max_frames"])),
        "init_latent": (None, f"default: {TrainConfig.init_latent} with SD-Turbo, taesd with the tiny model"),
        "perceptual": ("auto", "default: auto"),
    })
    add_model_args(m, auto_help="SD-Turbo from checkpoints/ when present, else the tiny model, saying so")
    add_threads_arg(m)
    m.set_defaults(func=run, resume=False)


def resolve_settings(args: argparse.Namespace, tiny: bool) -> None:
    """Fill in the demo's defaults that depend on --full and on the model (what ``--help`` promises)."""
    run = FULL if args.full else QUICK
    for name, value in run.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.size is None:
        args.size = TINY_SIZE if tiny else CodecConfig.width
    if args.init_latent is None:
        args.init_latent = "taesd" if tiny else TrainConfig.init_latent


def run(args: argparse.Namespace) -> int:
    import torch

    from ..backends import backend_for_clip, default_dtype, resolve_device
    from ..bitstream import describe, read
    from ..decoder import Decoder
    from ..files import check_output_path
    from ..metrics import clip_psnr
    from ..models import find_default_weights, load_models
    from ..video import FrameWriter, ensure_sample_clip, read_frames

    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = check_output_path(args.out, "folder")
    device = resolve_device(args.device)
    spec = args.model
    if spec == "auto":
        spec = find_default_weights(args.checkpoints) or "tiny"
        if spec == "tiny":
            print(f"demo: no SD-Turbo weights under {args.checkpoints}/ — using the built-in tiny random-weight "
                  "model, which cannot reconstruct real images (see README 'Model weights')")
        else:
            print(f"demo: using SD-Turbo weights from {spec}")
    tiny = spec == "tiny"
    args.model = spec
    resolve_settings(args, tiny)
    resolve_perceptual(args, "demo")

    clip = args.clip or str(ensure_sample_clip(SAMPLE))
    models = load_models(spec, device=device, dtype=default_dtype(device), taesd=args.taesd,
                         vae=args.init_latent == "vae", checkpoints_dir=args.checkpoints)
    use_threads(args, models.name, device)
    print(f"demo: encoding {args.max_frames} frames of {clip} at {args.size}×{args.size}, rank {args.rank}, "
          f"interval {args.interval}, {args.iters_first}/{args.iters} iterations on {device}")
    path = out / "demo.promptus"
    res = run_encode(args, clip, path, models=models)
    print(describe(path.read_bytes()))

    bs = read(path)
    backend = backend_for_clip(bs.header, models, device=device, offload_models=True)
    t0 = time.perf_counter()
    decoded = []
    # The demo's own output folder: each run replaces the frames of the last one.
    with FrameWriter(out / "decoded", res.fps, force=True, kind="folder") as pngs, \
            FrameWriter(out / "decoded.mp4", res.fps) as mp4:
        for seg in Decoder(backend, models.identity()).decode(bs):
            frames = seg.frames.cpu()
            decoded.append(frames)
            pngs.write_batch(frames)
            mp4.write_batch(frames)
    dt = time.perf_counter() - t0
    decoded = torch.cat(decoded)
    if decoded.shape[0] != res.frame_count:
        raise PromptusError(f"decoded {decoded.shape[0]} frames but the clip has {res.frame_count}")
    original = read_frames(clip, args.size, args.size, max_frames=res.frame_count)
    print_encode_summary(res, rate=False)  # the layout above gave the bitrate
    print(f"demo: decoded {decoded.shape[0]} frames with {backend.describe()} in {dt:.2f} s → {out / 'decoded'}/, "
          f"{out / 'decoded.mp4'}")
    print(f"demo: PSNR of the clip's mean MSE: decoded frames against the originals "
          f"{clip_psnr(original, decoded):.2f} dB; decoder vs encoder closed loop "
          f"{clip_psnr(res.reconstruction, decoded):.2f} dB (inf = identical; on a CPU `promptus decode` gives these "
          f"frames with the same thread count, {torch.get_num_threads()} here: docs/determinism.md)")
    print(f"demo: done in {time.perf_counter() - t_start:.0f} s ({time.process_time() - cpu_start:.0f} CPU-seconds "
          f"in this process, {torch.get_num_threads()} torch thread(s))")
    return 0
