"""Make the project's sample clip: a sky with drifting clouds as PNG frames (deterministic).

    python scripts/make_sample_clip.py [--out data/sky] [--frames 141] [--size 128]

`promptus demo` and scripts/inversion.py make it on first use; this script only
makes it ahead of time or at another size.
"""

import argparse
import shutil
from pathlib import Path

from promptus.video import ensure_sample_clip

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "data" / "sky"), help="output folder (default: data/sky)")
    p.add_argument("--frames", type=int, default=141, help="number of frames (default: 141)")
    p.add_argument("--size", type=int, default=128, help="frame size in pixels (default: 128)")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    ensure_sample_clip(out, a.frames, a.size)
    print(f"wrote {a.frames} frames of {a.size}×{a.size} to {out}")


if __name__ == "__main__":
    main()
