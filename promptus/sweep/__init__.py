"""Rate–distortion sweeps: promptus at every (clip, rank, interval) against x264/x265 at matched bitrates.

``promptus sweep CLIP... --ranks 2 4 8 16 --intervals 5 10 20 --baselines x264 x265 --out DIR``

1. Each clip is cropped and resized once to ``--size`` and kept as PNG frames under
   ``DIR/clips/NAME/``: promptus and the baselines code exactly the same frames.
2. Every (clip, rank, interval) point is encoded with promptus, decoded with the
   torch backend and measured (:mod:`promptus.metrics`); its bitrate is every
   byte of the .promptus file over the clip duration (frame count / fps).
3. For every promptus point, each baseline encodes the clip at that point's
   bitrate (:mod:`promptus.baselines`: two-pass ABR, else a CRF search to within
   ``--tolerance``), is decoded by ffmpeg and measured the same way; its bitrate
   is every byte of its mp4 file over the same duration.
4. ``DIR/results.csv`` and ``DIR/results.json`` hold one row per point,
   ``DIR/bd_rate.csv`` the Bjøntegaard deltas of each promptus interval curve
   against each baseline (PSNR- and SSIM-based), and ``DIR/rd_*.png`` the plots.

Each point is a job: a pure function of a JSON-able spec (:func:`run_point`).
A point is done when ``DIR/points/CLIP/POINT.json`` exists (written atomically)
with the same inputs; a rerun skips done points and an interrupted promptus encode
continues from its checkpoint. A point's name carries a digest of every input that
changes its result (``promptus_r8_t10_3fa2c1d0``), so a run with other iterations,
size or model adds points next to the earlier ones instead of replacing them, and
results.csv/json list them all with their settings as columns. Jobs run in order in this process, or through Ray
(``--ray [ADDRESS]``; ``pip install promptus[distributed]``) on long-lived actors, one per GPU
(docs/many-gpus.md); results do not depend on how they were run (each job fixes its torch thread
count, ``--threads``).

Modules: :mod:`.config` (:class:`SweepConfig`), :mod:`.clips` (clip preparation),
:mod:`.jobs` (point specs and the job function), :mod:`.executors` (local, Ray),
:mod:`.report` (BD-rates, results files) and :mod:`.run` (:func:`run_sweep`).
The ``promptus sweep`` command and ``scripts/bitrate_sweep.py`` parse the options.
"""

from .clips import ClipInfo, prepare_clip
from .config import SweepConfig
from .executors import LocalExecutor, RayExecutor
from .jobs import (COLUMNS, SETTINGS_COLUMNS, TIMING_FIELDS, baseline_spec, finished_row, point_id, promptus_spec,
                   run_point, settings_digest)
from .report import BD_METRICS, bd_rates, write_results
from .run import SweepResult, run_sweep

__all__ = [
    "BD_METRICS", "COLUMNS", "SETTINGS_COLUMNS", "ClipInfo", "LocalExecutor", "RayExecutor", "SweepConfig", "SweepResult",
    "TIMING_FIELDS", "baseline_spec", "bd_rates", "finished_row", "point_id", "prepare_clip", "promptus_spec",
    "run_point", "run_sweep", "settings_digest", "write_results",
]
