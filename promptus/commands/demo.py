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

from ..config import CodecConfig
from ..errors import ModelNotFoundError, PromptusError
from .common import add_encode_args, add_model_args
from .encode import print_encode_summary, run_encode

_CHECKOUT = Path(__file__).resolve().parents[2]
# In a source checkout the sample clip lives in its data/; an installed package makes it under ./data.
SAMPLE = (_CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()) / "data" / "sky"
#: Frame size of the demo with the tiny model (it cannot reconstruct real images; small is enough).
TINY_SIZE = 128


def register(subparsers) -> None:
    m = subparsers.add_parser("demo", help="the main job: encode and decode the sample clip",
                              description="Encode the project's sample clip (data/sky, made on first use) with the "
                                          "best model available (SD-Turbo when its weights are present, else the tiny "
                                          "test model), decode it, and print the bitrate and PSNR.")
    m.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    m.add_argument("--clip", default=None, help="another clip to use instead of data/sky")
    add_encode_args(m, iters=(300, 100))
    m.set_defaults(size=None, max_frames=21, resume=False)
    add_model_args(m)
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..backends import default_dtype, make_backend, resolve_device
    from ..bitstream import describe, read
    from ..decoder import Decoder
    from ..losses import load_vgg19
    from ..metrics import clip_psnr
    from ..models import find_default_weights, load_models
    from ..video import FrameWriter, ensure_sample_clip, read_frames

    out = Path(args.out)
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
    if args.size is None:
        args.size = TINY_SIZE if tiny else CodecConfig.width
    if args.init_latent == "vae" and tiny:
        args.init_latent = "taesd"
    if args.perceptual == "on" and args.vgg is None:
        try:
            load_vgg19(None)
        except ModelNotFoundError:
            print("demo: no VGG-19 weights here — perceptual loss off (lower quality; pass --vgg PATH to use it)")
            args.perceptual = "off"

    clip = args.clip or str(ensure_sample_clip(SAMPLE))
    models = load_models(spec, device=device, dtype=default_dtype(device), taesd=args.taesd,
                         vae=args.init_latent == "vae", checkpoints_dir=args.checkpoints)
    print(f"demo: encoding {args.max_frames} frames of {clip} at {args.size}×{args.size}, rank {args.rank}, "
          f"interval {args.interval}, {args.iters_first}/{args.iters} iterations on {device}")
    path = out / "demo.promptus"
    res = run_encode(args, clip, path, models=models)
    print(describe(path.read_bytes()))

    bs = read(path)
    backend = make_backend("auto", models, device, batch=bs.header.interval, size=bs.header.width,
                           offload_models=True)
    t0 = time.perf_counter()
    decoded = []
    # The demo's own output folder: each run replaces the frames of the last one.
    with FrameWriter(out / "decoded", res.fps, force=True) as pngs, FrameWriter(out / "decoded.mp4", res.fps) as mp4:
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
    print_encode_summary(res)
    print(f"demo: decoded {decoded.shape[0]} frames with {backend.describe()} in {dt:.2f} s → {out / 'decoded'}/, "
          f"{out / 'decoded.mp4'}")
    print(f"demo: PSNR of the clip's mean MSE: decoded frames against the originals "
          f"{clip_psnr(original, decoded):.2f} dB; decoder vs encoder closed loop "
          f"{clip_psnr(res.reconstruction, decoded):.2f} dB (inf = identical)")
    return 0
