"""A benchmark's baseline against itself: repeated runs, their median, and earlier runs on this machine.

A speed-up is only as honest as its baseline. An encoder row of 16.7× once came from a
published-loop time 35 % slower than that loop's earlier run (1 797 against 1 328 ms per
iteration); against the earlier time it was 12.4×. So the benches repeat their baseline,
report the median, and say so when

* the repeats spread more than :data:`FAR_OFF` between them, or
* the median is more than :data:`FAR_OFF` off the median of the earlier runs of the same
  baseline (same GPU, torch, workload) remembered in ``bench-baselines.json`` beside the
  weights memo (``$PROMPTUS_CACHE_DIR``, else ``~/.cache/promptus``).

The flags are printed under the bench's table and kept in its JSON. The history file is a
cache: unreadable or hostile content is ignored and rewritten, it is bounded in size, and
one that cannot be written is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1
#: A baseline further than this fraction off its repeats or its earlier runs is flagged.
FAR_OFF = 0.2
#: Runs kept per baseline, and baselines kept in all.
KEEP_RUNS = 20
KEEP_BASELINES = 200
MAX_BYTES = 1 << 20
_lock = threading.Lock()


def history_path() -> Path:
    """``bench-baselines.json`` in the weights memo's folder."""
    from ..weights_memo import memo_path

    return memo_path().with_name("bench-baselines.json")


def _read() -> dict[str, list[float]]:
    from ..files import read_cache_json

    runs = read_cache_json(history_path(), what="bench baseline history", limit=MAX_BYTES, format=FORMAT,
                           field="runs")
    return {k: [float(v) for v in vs if _usable(v)][-KEEP_RUNS:]
            for k, vs in (runs or {}).items() if isinstance(k, str) and isinstance(vs, list)}


def _usable(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def median(runs: list[float]) -> float:
    """The median of the finite, positive runs (NaN when there are none)."""
    good = [float(v) for v in runs if _usable(v)]
    return statistics.median(good) if good else math.nan


def spread_flag(name: str, runs: list[float], unit: str) -> str | None:
    """A flag when ``runs`` of one baseline in one process spread more than :data:`FAR_OFF`."""
    good = [float(v) for v in runs if _usable(v)]
    if len(good) < 2 or max(good) / min(good) - 1 <= FAR_OFF:
        return None
    return (f"{name}: its {len(good)} runs spread {max(good) / min(good) - 1:.0%} ({min(good):.1f}–{max(good):.1f} "
            f"{unit}); the median {statistics.median(good):.1f} is used, but the machine was not steady")


def check_and_record(name: str, workload: dict, value: float, unit: str, *, lower_is_faster: bool = True,
                     record: bool = True) -> str | None:
    """A flag when ``value`` (this run's median of baseline ``name`` on ``workload``: GPU, torch, sizes, ...)
    is more than :data:`FAR_OFF` off the median of the earlier runs remembered for it; then ``value`` is
    remembered too (``record``). ``lower_is_faster``: ms per iteration (True) or frames per second (False)."""
    if not _usable(value):
        return None
    key = json.dumps({"baseline": name, **workload}, sort_keys=True, default=str)
    with _lock:
        history = _read()
        earlier = history.get(key, [])
        flag = None
        if earlier:
            ref = statistics.median(earlier)
            off = value / ref - 1
            slower = off > 0 if lower_is_faster else off < 0
            if abs(off) > FAR_OFF:
                flag = (f"{name}: {value:.1f} {unit} is {abs(off):.0%} off the median of {len(earlier)} earlier "
                        f"run{'s' if len(earlier) > 1 else ''} on this machine ({ref:.1f} {unit}): "
                        f"{'slower' if slower else 'faster'}, so the speed-ups against it read "
                        f"{'high' if slower else 'low'} by as much")
        if record:
            history.pop(key, None)  # re-inserted last: the least recently run baselines go first
            history[key] = (earlier + [float(value)])[-KEEP_RUNS:]
            kept = dict(list(history.items())[-KEEP_BASELINES:])
            _write(kept)
    return flag


def _write(runs: dict[str, list[float]]) -> None:
    from ..files import write_json_atomic

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while len(runs) > 1 and len(json.dumps({"format": FORMAT, "runs": runs})) > MAX_BYTES * 0.9:
            runs.pop(next(iter(runs)))
        write_json_atomic(path, {"format": FORMAT, "runs": runs})
    except OSError as e:  # a history that cannot be written is skipped: the bench's figures stand
        log.debug("bench history %s not written (%s)", path, e)


__all__ = ["FAR_OFF", "check_and_record", "history_path", "median", "spread_flag"]
