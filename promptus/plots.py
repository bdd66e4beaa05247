"""Rate–distortion curves of a sweep: data first (:func:`rd_curves`), then figures (matplotlib, Agg, PNG).

A curve is a list of (kbit/s, quality) points sorted by rate: one per baseline
codec (all its points of a clip), and one per promptus keyframe interval (its
points over the ranks). ``clip=None`` averages over clips: a point (codec, rank,
interval) is averaged only when every clip has it (baseline points are named
after the promptus point whose bitrate they match, so they align across clips).
"""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RANDOM_WEIGHT_MODELS
from .files import atomic_write

METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "lpips": "LPIPS (lower is better)"}


@dataclass
class Curve:
    label: str
    codec: str
    interval: int | None  # promptus curves: the keyframe interval; baselines: None
    kbps: list[float]
    quality: list[float]


def _usable(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _points(rows: list[dict[str, Any]], clip: str | None, metric: str) -> dict[tuple, tuple[float, float]]:
    """{(codec, rank, interval): (kbps, quality)} for one clip, or averaged over every clip (clip=None)."""
    if clip is not None:
        return {(r["codec"], r["rank"], r["interval"]): (r["kbps_all_bytes"], r[metric]) for r in rows
                if r["clip"] == clip and _usable(r.get(metric)) and _usable(r.get("kbps_all_bytes"))}
    clips = sorted({r["clip"] for r in rows})
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for c in clips:
        for key, p in _points(rows, c, metric).items():
            groups[key].append(p)
    return {k: (sum(p[0] for p in v) / len(v), sum(p[1] for p in v) / len(v)) for k, v in groups.items()
            if len(v) == len(clips)}


def curve_points(rows: list[dict[str, Any]], clip: str | None, codec: str, metric: str,
                 interval: int | None = None) -> tuple[list[float], list[float]]:
    """(kbps, quality) of one curve sorted by rate; ``interval`` selects a promptus curve."""
    pts = sorted(p for (c, _, t), p in _points(rows, clip, metric).items()
                 if c == codec and (interval is None or t == interval))
    return [p[0] for p in pts], [p[1] for p in pts]


def rd_curves(rows: list[dict[str, Any]], metric: str, clip: str | None = None) -> list[Curve]:
    """The curves of one plot: promptus per interval (ascending), then each baseline, in row order."""
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    curves = []
    intervals = sorted({r["interval"] for r in rows if r["codec"] == "promptus"})
    random = random_weight_model(rows)
    note = f" ({random} model, random weights)" if random else ""
    for t in intervals:
        k, q = curve_points(rows, clip, "promptus", metric, interval=t)
        if k:
            curves.append(Curve(f"promptus T={t}{note}", "promptus", t, k, q))
    for codec in codecs:
        if codec != "promptus":
            k, q = curve_points(rows, clip, codec, metric)
            if k:
                curves.append(Curve(codec, codec, None, k, q))
    return curves


def random_weight_model(rows: list[dict[str, Any]]) -> str | None:
    """The built-in random-weight model the promptus rows were made with, if any (its curve is no real quality)."""
    models = {r.get("model") for r in rows if r.get("codec") == "promptus"}
    random = sorted(m for m in models if m in RANDOM_WEIGHT_MODELS)
    return ", ".join(random) or None


def plotted_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics that have at least one value (MS-SSIM and LPIPS may be unavailable)."""
    return [m for m in METRIC_LABELS if any(_usable(r.get(m)) for r in rows)]


def _kbps_label(value: float, _pos=None) -> str:
    return f"{value:g}"


def rd_figure(rows: list[dict[str, Any]], clip: str | None = None, metrics: list[str] | None = None):
    """A matplotlib Figure (Agg canvas, no pyplot state): one panel per metric, quality against kbit/s."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    metrics = metrics or plotted_metrics(rows)
    fig = Figure(figsize=(5.0 * max(1, len(metrics)), 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    n_clips = len({r["clip"] for r in rows})
    title = f"{clip}" if clip is not None else f"mean over {n_clips} clip{'s' if n_clips != 1 else ''}"
    random = random_weight_model(rows)
    warning = (f"\npromptus curves: the built-in {random} model with random weights — they show the rate, not what "
               "SD-Turbo's pictures look like" if random else "")
    fig.suptitle(f"rate–distortion: {title}{warning}")
    for ax, metric in zip(axes, metrics):
        for c in rd_curves(rows, metric, clip):
            style = dict(marker="o", linestyle="-") if c.codec == "promptus" else dict(marker="s", linestyle="--")
            ax.plot(c.kbps, c.quality, label=c.label, **style)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_kbps_label))
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(FuncFormatter(_kbps_label))
        ax.set_xlabel("kbit/s (all bytes of the file)")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_title(METRIC_LABELS[metric].split(" (")[0])
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    return fig


def describe_figure(fig) -> list[dict[str, Any]]:
    """What a figure shows, read back from its artists: per panel its metric and each line's label and points."""
    out = []
    for ax in fig.axes:
        lines = [{"label": ln.get_label(), "points": len(ln.get_xdata())} for ln in ax.get_lines()]
        out.append({"ylabel": ax.get_ylabel(), "curves": lines})
    return out


def save_rd_plots(rows: list[dict[str, Any]], out_dir: str | os.PathLike, *, clips: list[str] | None = None
                  ) -> list[dict[str, Any]]:
    """``rd_<clip>.png`` per clip and ``rd_mean.png`` (over clips); returns what each shows and its pixel size."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = clips or list(dict.fromkeys(r["clip"] for r in rows))
    metrics = plotted_metrics(rows)
    info = []
    for clip in [*clips, None]:
        fig = rd_figure(rows, clip, metrics)
        shown = describe_figure(fig)
        png = out_dir / f"rd_{'mean' if clip is None else clip}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write(png, buf.getbuffer())
        with Image.open(png) as im:
            size = im.size
        info.append({"png": str(png), "clip": clip, "width": size[0], "height": size[1], "panels": shown})
    return info
