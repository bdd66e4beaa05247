"""``promptus demo``: the project's main job, end to end on one machine.

It makes a sample clip in code, builds its keyframe prompts in the public
release's folder layout, imports that folder into a .promptus file, prints the
file's layout and bitrate, and decodes every frame with the best model available.
Until the encoder lands the prompts are the encoder's initialisation (uniform
random factors), so the decoded frames show the pipeline, not a reconstruction.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .errors import PromptusError

log = logging.getLogger("promptus")


def run_demo(args) -> int:
    from .backends import default_dtype, make_backend, resolve_device
    from .bitstream import Bitstream, Header, InitLatent, Keyframe, describe, read, write
    from .config import CodecConfig
    from .decoder import Decoder
    from .legacy import load_legacy, write_legacy
    from .models import find_default_weights, load_models
    from .prompts import quantize_tensor
    from .schedule import to_model_range
    from .video import FrameWriter, synthetic_clip

    out = Path(args.out)
    device = resolve_device(args.device)
    spec = args.model
    if spec == "auto":
        spec = find_default_weights(args.checkpoints) or "tiny"
        if spec == "tiny":
            print(f"demo: no SD-Turbo weights under {args.checkpoints}/ — using the built-in tiny random-weight "
                  "model (frames are noise-like; see README 'Model weights' for the real ones)")
        else:
            print(f"demo: using SD-Turbo weights from {spec}")
    models = load_models(spec, device=device, dtype=default_dtype(device), taesd=args.taesd, vae=False,
                         checkpoints_dir=args.checkpoints)
    size = 128 if models.name == "tiny" else 512
    cfg = CodecConfig(width=size, height=size, fps=30.0, rank=8, interval=10)
    frame_count = 21

    # 1. A sample clip and its init latent (TAESD encoder: the cheap substitute of DESIGN §1).
    clip = synthetic_clip(frame_count, size, size)
    with torch.inference_mode():
        frame0 = to_model_range(clip[:1]).to(device, default_dtype(device))
        init = models.encode_init_latent(frame0, which="taesd").float().cpu().numpy()

    # 2. Keyframe prompts in the release layout (the encoder's uniform initialisation).
    gen = torch.Generator().manual_seed(0)
    keyframes = [
        Keyframe(index=k * cfg.interval,
                 U_q=quantize_tensor(torch.rand(cfg.tokens, cfg.rank, generator=gen)),
                 V_q=quantize_tensor(torch.rand(cfg.rank, cfg.embed_dim, generator=gen)))
        for k in range(cfg.keyframe_count(frame_count))
    ]
    bs = Bitstream(Header(cfg, frame_count, models.identity()), InitLatent.from_array(init, "fp32"), keyframes)
    legacy_dir = out / "legacy"
    write_legacy(bs, legacy_dir)
    print(f"demo: wrote {len(keyframes)} keyframe prompts + init.pth in the release layout to {legacy_dir}")

    # 3. Import into one .promptus file and show its layout.
    path = out / "demo.promptus"
    write(path, load_legacy(legacy_dir, fps=cfg.fps, init_precision="fp16"))
    print(describe(path.read_bytes()))

    # 4. Decode every frame.
    backend = make_backend("auto", models, device)
    t0 = time.perf_counter()
    with FrameWriter(out / "decoded", cfg.fps) as pngs, FrameWriter(out / "decoded.mp4", cfg.fps) as mp4:
        for seg in Decoder(backend, models.identity()).decode(read(path)):
            frames = seg.frames.cpu().numpy()
            pngs.write_batch(frames)
            mp4.write_batch(frames)
    dt = time.perf_counter() - t0
    print(f"demo: decoded {pngs.count} of {frame_count} frames with {backend.describe()} in {dt:.2f} s "
          f"→ {out / 'decoded'}/ and {out / 'decoded.mp4'}")
    if pngs.count != frame_count:
        raise PromptusError(f"decoded {pngs.count} frames but the clip has {frame_count}")
    return 0
