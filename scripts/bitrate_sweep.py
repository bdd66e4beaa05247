"""Rate–distortion sweep: promptus (ranks × intervals) against x264/x265 at matched bitrates.

    python scripts/bitrate_sweep.py data/sky --ranks 2 4 8 16 --intervals 5 10 20 \
        --baselines x264 x265 --out outputs/sweep --perceptual off

The same options as `promptus sweep` (see `promptus sweep --help`); rerunning the
command resumes: finished points are reused. Writes results.csv, results.json,
bd_rate.csv and rd_*.png into --out.
"""

import argparse
import sys

from promptus.cli import setup_logging
from promptus.errors import PromptusError
from promptus.sweep import add_sweep_args, cmd_sweep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="print debug messages")
    args = p.parse_args(argv)
    setup_logging(args)
    try:
        return cmd_sweep(args)
    except PromptusError as e:
        print(f"bitrate_sweep: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bitrate_sweep: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
