"""Rate–distortion sweep: promptus (ranks × intervals) against x264/x265 at matched bitrates.

    python scripts/bitrate_sweep.py data/sky --ranks 2 4 8 16 --intervals 5 10 20 \
        --baselines x264 x265 --out outputs/sweep --perceptual off

The same options as `promptus sweep` (see `promptus sweep --help`); rerunning the
command resumes: finished points are reused. Writes results.csv, results.json,
bd_rate.csv and rd_*.png into --out.
"""

import argparse
import sys

from promptus.commands.common import add_verbosity_args, run_command
from promptus.commands.sweep import add_sweep_args
from promptus.commands.sweep import run as run_sweep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p)
    add_verbosity_args(p)
    return run_command("bitrate_sweep", run_sweep, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
