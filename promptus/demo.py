"""``promptus demo``: the project's main job, end to end on one machine.

Encode the project's sample clip (data/sky, made on first use) with the best
model available — SD-Turbo when its weights are present, else the built-in tiny
model, saying which — write the .promptus file, show its layout, decode it, and
print the bitrate and PSNR.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .errors import ModelNotFoundError, PromptusError

log = logging.getLogger("promptus")

_CHECKOUT = Path(__file__).resolve().parent.parent
# In a source checkout the sample clip lives in its data/; an installed package makes it under ./data.
SAMPLE = (_CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()) / "data" / "sky"


def run_demo(args) -> int:
    from .backends import default_dtype, make_backend, resolve_device
    from .bitstream import describe, read
    from .cli import print_encode_summary, run_encode
    from .decoder import Decoder
    from .encoder import psnr_uint8
    from .losses import load_vgg19
    from .models import find_default_weights, load_models
    from .video import FrameWriter, ensure_sample_clip, read_frames

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
        args.size = 128 if tiny else 512
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

    backend = make_backend("auto", models, device)
    t0 = time.perf_counter()
    decoded = []
    with FrameWriter(out / "decoded", res.fps) as pngs, FrameWriter(out / "decoded.mp4", res.fps) as mp4:
        for seg in Decoder(backend, models.identity()).decode(read(path)):
            frames = seg.frames.cpu()
            decoded.append(frames)
            pngs.write_batch(frames)
            mp4.write_batch(frames)
    dt = time.perf_counter() - t0
    import torch

    decoded = torch.cat(decoded)
    if decoded.shape[0] != res.frame_count:
        raise PromptusError(f"decoded {decoded.shape[0]} frames but the clip has {res.frame_count}")
    original = read_frames(clip, args.size, args.size, max_frames=res.frame_count)
    print_encode_summary(res)
    print(f"demo: decoded {decoded.shape[0]} frames with {backend.describe()} in {dt:.2f} s → {out / 'decoded'}/, "
          f"{out / 'decoded.mp4'}")
    print(f"demo: PSNR of the decoded frames against the originals {psnr_uint8(decoded, original):.2f} dB; "
          f"decoder vs encoder closed loop {psnr_uint8(decoded, res.reconstruction):.2f} dB (inf = identical)")
    return 0
