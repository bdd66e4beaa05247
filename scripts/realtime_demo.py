"""Real-time decoding with the published demo's flags.

    python scripts/realtime_demo.py -prompt_dir data/sky/results/rank8_interval10 -batch 10 -visualize

-prompt_dir is a folder of the public release (frame_XXXXX.prompt + init.pth), a
folder holding prompts.promptus, or a .promptus file. Frames are regenerated with the
fastest backend that works here (--backend to choose) through the pipelined decoder
and the frames per second are printed. -visualize writes the frames to
<prompt_dir>/realtime.mp4 and, where a display and OpenCV exist, shows them.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from promptus.commands.common import add_model_args, add_verbosity_args, run_command
from promptus.config import CodecConfig
from promptus.errors import PromptusError


def load(prompt_dir: Path, fps: float):
    from promptus.bitstream import read
    from promptus.legacy import load_legacy

    if prompt_dir.is_file():
        return read(prompt_dir)
    if (prompt_dir / "prompts.promptus").is_file():
        return read(prompt_dir / "prompts.promptus")
    return load_legacy(prompt_dir, fps=fps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-prompt_dir", required=True, help="release prompt folder, folder with prompts.promptus, or a file")
    p.add_argument("-batch", type=int, default=CodecConfig.interval, help="frames per engine call: must equal the keyframe interval")
    p.add_argument("-visualize", action="store_true", help="write realtime.mp4 (and show frames if a display exists)")
    p.add_argument("--fps", type=float, default=CodecConfig.fps,
                   help=f"frame rate for a release folder (default: {CodecConfig.fps:g})")
    p.add_argument("--backend", default="auto", help="auto, tensorrt, compile, torch or eager")
    p.add_argument("--repeat", type=int, default=1, help="decode the clip this many times (steady-state FPS)")
    add_model_args(p)
    add_verbosity_args(p)
    return run_command("realtime_demo", run, p.parse_args(argv))


def run(args) -> int:
    from promptus.backends import default_dtype, make_backend, resolve_device
    from promptus.decoder import Decoder
    from promptus.models import load_models
    from promptus.pipeline import PipelinedDecoder
    from promptus.video import FrameWriter

    src = Path(args.prompt_dir)
    bs = load(src, args.fps)
    h = bs.header
    if args.batch != h.interval:
        raise PromptusError(f"-batch {args.batch} differs from the clip's keyframe interval {h.interval}: each segment "
                            f"is one batch of T frames; use -batch {h.interval}")
    device = resolve_device(args.device)
    models = load_models(args.model, device=device, dtype=default_dtype(device), taesd=args.taesd, vae=False,
                         checkpoints_dir=args.checkpoints)
    backend = make_backend(args.backend, models, device, batch=args.batch, size=h.width)
    decoder = Decoder(backend, models.identity())
    Decoder(backend).decode_all(bs)  # warm-up: engines built, graphs captured, kernels compiled
    writer = show = None
    if args.visualize:
        out = (src.parent if src.is_file() else src) / "realtime.mp4"
        writer = FrameWriter(out, h.fps)
        if os.environ.get("DISPLAY"):
            try:
                import cv2

                def show(frames):
                    for f in frames.numpy():
                        cv2.imshow("promptus", f[:, :, ::-1])
                        cv2.waitKey(1)
            except ImportError:
                pass

    def sink(start, frames):
        if writer is not None:
            writer.write_batch(frames)
        if show is not None:
            show(frames)

    items = [h, bs.init, *bs.keyframes]
    t0 = time.perf_counter()
    n = 0
    for i in range(args.repeat):
        n += PipelinedDecoder(decoder, to_host=True).run(items, sink if (writer and i == 0) or show else None)
    dt = time.perf_counter() - t0
    if writer is not None:
        writer.close()
        print(f"wrote {writer.count} frames to {writer.out}")
    print(f"decoded {n} frames of {h.width}×{h.height} in {dt:.2f} s: {n / dt:.1f} FPS with {backend.describe()}"
          f"{' (including writing the video)' if writer else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
