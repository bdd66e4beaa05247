"""Generation with the published script's flags: keyframe prompts → frames.

    python scripts/generation.py -frame_path data/sky -rank 8 -interval 10 [--parity release]

Reads <frame_path>/results/rank{r}_interval{T}/prompts.promptus (written by
inversion.py), writes the regenerated frames 00000.png, ... next to it and prints
the PSNR of every frame against the originals and the mean.
"""

import argparse
import sys
from pathlib import Path

from promptus.commands.common import add_model_args, add_verbosity_args, run_command
from promptus.config import PARITIES, PARITY_OURS, PARITY_RELEASE, CodecConfig
from promptus.errors import PromptusError

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-frame_path", default=str(ROOT / "data" / "sky"))
    p.add_argument("-rank", type=int, default=CodecConfig.rank)
    p.add_argument("-interval", type=int, default=CodecConfig.interval)
    p.add_argument("--backend", default="auto")
    p.add_argument("--parity", default=PARITY_OURS, choices=PARITIES,
                   help="'release': the public release's own numerics (fp32 under autocast, truncation), "
                        "to reproduce its frames (default: ours)")
    add_model_args(p)
    add_verbosity_args(p)
    return run_command("generation", generate, p.parse_args(argv))


def generate(args) -> int:
    import torch

    from promptus.backends import backend_for_clip, default_dtype, resolve_device
    from promptus.bitstream import read
    from promptus.decoder import Decoder
    from promptus.metrics import clip_psnr
    from promptus.models import load_models
    from promptus.video import FrameWriter, read_frames

    folder = Path(args.frame_path) / "results" / f"rank{args.rank}_interval{args.interval}"
    src = folder / "prompts.promptus"
    if not src.is_file():
        raise PromptusError(f"{src} does not exist; run scripts/inversion.py -frame_path {args.frame_path} "
                            f"-rank {args.rank} -interval {args.interval} first")
    bs = read(src)
    h = bs.header
    device = resolve_device(args.device)
    dtype = torch.float32 if args.parity == PARITY_RELEASE else default_dtype(device)
    models = load_models(args.model, device=device, dtype=dtype, taesd=args.taesd, vae=False,
                         checkpoints_dir=args.checkpoints)
    backend = backend_for_clip(h, models, name=args.backend, device=device, parity=args.parity)
    decoder = Decoder(backend, models.identity(), parity=args.parity)
    originals = read_frames(args.frame_path, h.width, h.height, max_frames=h.frame_count)
    out = folder / "frames"
    scores = []
    with FrameWriter(out, h.fps, force=True) as w:  # the script's own results folder, as the release
        for seg in decoder.decode(bs):
            frames = seg.frames.cpu()
            w.write_batch(frames)
            for i, f in enumerate(frames):
                idx = seg.start + i
                scores.append(clip_psnr(originals[idx][None], f[None]))
                if not args.quiet:
                    print(f"frame: {idx}, psnr: {scores[-1]:.2f}")
    print(f"mean psnr: {sum(scores) / len(scores):.2f} dB over {len(scores)} frames → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
