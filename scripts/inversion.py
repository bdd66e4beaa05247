"""Inversion with the published script's flags: a folder of frames → keyframe prompts.

    python scripts/inversion.py -frame_path data/sky -max_id 140 -rank 8 -interval 10

As in the release, keyframes sit at 0, T, ... below max_id (so frames 0..130 for
max_id 140, T 10). Results go to <frame_path>/results/rank{r}_interval{T}/prompts.promptus.
Every option of `promptus encode` is accepted too (--model, --device, --iters, ...).
The project's sample clip data/sky is made on first use.
"""

import argparse
import sys
from pathlib import Path

from promptus.commands.common import add_encode_args, add_model_args, add_verbosity_args, run_command
from promptus.commands.encode import print_encode_summary, run_encode
from promptus.config import CodecConfig
from promptus.errors import PromptusError
from promptus.video import ensure_sample_clip, list_images

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sky"


def result_dir(frame_path, rank, interval) -> Path:
    return Path(frame_path) / "results" / f"rank{rank}_interval{interval}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-frame_path", default=str(SAMPLE), help="folder of frames 00000.png, ... (default: data/sky)")
    p.add_argument("-max_id", type=int, default=140, help="keyframes are placed below this frame index (default: 140)")
    p.add_argument("-rank", type=int, default=CodecConfig.rank)
    p.add_argument("-interval", type=int, default=CodecConfig.interval)
    add_encode_args(p, rate=False)
    add_model_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted inversion")
    add_verbosity_args(p)
    return run_command("inversion", invert, p.parse_args(argv))


def invert(args) -> int:
    if Path(args.frame_path).resolve() == SAMPLE.resolve():
        ensure_sample_clip(SAMPLE)
    if args.max_id < 1:
        raise PromptusError(f"-max_id {args.max_id} must be ≥ 1")
    available = len(list_images(args.frame_path))
    # The release loops f_id over range(0, max_id, interval): the last keyframe is the largest
    # multiple of T below max_id, and it closes the segment ending on it.
    last_keyframe = (args.max_id - 1) // args.interval * args.interval
    if last_keyframe < args.interval:
        raise PromptusError(f"-max_id {args.max_id} leaves no full segment at interval {args.interval}; "
                            f"use -max_id > {args.interval}")
    if last_keyframe >= available:
        raise PromptusError(f"-max_id {args.max_id} needs frames up to {last_keyframe} but {args.frame_path} "
                            f"has {available} frames (0..{available - 1}); use -max_id ≤ {available}")
    args.max_frames = last_keyframe + 1
    out = result_dir(args.frame_path, args.rank, args.interval) / "prompts.promptus"
    print_encode_summary(run_encode(args, args.frame_path, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
