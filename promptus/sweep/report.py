"""Sweep results: Bjøntegaard deltas per curve, results.json/csv and bd_rate.csv."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from ..files import atomic_write, write_json_atomic
from .config import SweepConfig
from .jobs import COLUMNS, SETTINGS_COLUMNS

BD_METRICS = ("psnr", "ssim")


def bd_rates(rows: list[dict[str, Any]], clips: list[str], intervals: list[int], baselines: list[str]
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """BD-rate (and BD-quality) of each promptus interval curve against each baseline, per clip and averaged.

    The promptus curve of interval T runs over the ranks; a baseline's curve is
    all its points of the clip. Rates are the achieved kbit/s (all bytes). None
    where the quality ranges don't overlap; the mean is over the clips with a value.
    """
    from ..metrics import bd_quality, bd_rate
    from ..plots import curve_points

    per_clip = []
    for clip in clips:
        for base in baselines:
            for metric in BD_METRICS:
                anchor = curve_points(rows, clip, base, metric)
                for t in intervals:
                    test = curve_points(rows, clip, "promptus", metric, interval=t)
                    overlap = None
                    if anchor[1] and test[1]:
                        lo, hi = max(min(anchor[1]), min(test[1])), min(max(anchor[1]), max(test[1]))
                        overlap = [lo, hi] if hi > lo else None
                    per_clip.append({
                        "clip": clip, "promptus_interval": t, "baseline": base, "metric": metric,
                        "bd_rate_pct": bd_rate(*anchor, *test), "bd_quality": bd_quality(*anchor, *test),
                        "quality_overlap": overlap, "promptus_points": len(test[0]), "baseline_points": len(anchor[0]),
                    })
    means = []
    for base in baselines:
        for metric in BD_METRICS:
            for t in intervals:
                sel = [e for e in per_clip if (e["baseline"], e["metric"], e["promptus_interval"]) == (base, metric, t)]
                vals = [e["bd_rate_pct"] for e in sel if e["bd_rate_pct"] is not None]
                qs = [e["bd_quality"] for e in sel if e["bd_quality"] is not None]
                means.append({"promptus_interval": t, "baseline": base, "metric": metric,
                              "bd_rate_pct": sum(vals) / len(vals) if vals else None,
                              "bd_quality": sum(qs) / len(qs) if qs else None,
                              "clips_with_overlap": len(vals), "clips": len(sel)})
    return per_clip, means


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def write_results(out: Path, cfg: SweepConfig, rows, earlier, bd, bd_mean, plots, failures, clips) -> None:
    """results.json (config, clips, notes, rows, BD-rates, plots, failures), results.csv and bd_rate.csv.

    ``rows`` are this run's points and ``earlier`` those of other settings already in ``out``
    (earlier runs'): results.csv/json hold both, each with its settings columns, so that runs
    accumulate; the BD-rates and plots are this run's.
    """
    unavailable = {}
    for r in rows:
        try:
            q = json.loads(Path(out, "points", r["clip"], r["point"] + ".json").read_text())["quality"]["summary"]
            for k, v in q["unavailable"].items():
                unavailable.setdefault(k, v)
        except (OSError, ValueError, KeyError):
            pass
    write_json_atomic(out / "results.json", {
        "config": cfg.to_dict(),
        "clips": [dataclasses.asdict(c) for c in clips],
        "notes": {
            "kbps_all_bytes": "every byte of the file (.promptus, or the baseline's mp4 container) × 8 / "
                              "(frame count / fps) / 1000",
            "severe_psnr_share": f"share of frames with PSNR < {cfg.psnr_threshold:g} dB",
            "severe_lpips_share": f"share of frames with LPIPS > {cfg.lpips_threshold:g} (null without LPIPS)",
            "psnr": "mean of per-frame PSNR over RGB (inf when frames are identical); psnr_clip: PSNR of the mean MSE",
            "bd_rate_pct": "Bjøntegaard delta rate of promptus (test) against the baseline (anchor); negative: "
                           "promptus needs fewer bits at equal quality; null where the quality ranges don't overlap",
            "encode_s": "promptus: wall time of the encoder run that finished the point (after a resume, only "
                        "that run; points/CLIP/POINT.json lists every keyframe's seconds); baselines: ffmpeg time "
                        "of the kept encode (both passes for two-pass ABR); search_s: every rate-control attempt",
            "baselines": "8-bit 4:2:0 (yuv420p) in mp4, two-pass ABR or a CRF search to within the tolerance; "
                         "within_tolerance false: the target was out of the codec's reach on this clip",
            "settings": "a digest of every input of a point that its name does not show (iterations, size, model "
                        "and its weights' digest, perceptual loss, seed, init latent, backend, threads, device, the "
                        "clip's frames; for a baseline its preset, tolerance and target); rows with the same "
                        "settings form one sweep. Rows of earlier runs with other settings stay in this file; "
                        "bd_rate and the plots are this run's (settings_this_run)",
            "kbps_factors": "promptus: the keyframe factor codes as stored, without scales, zero points, header, "
                            "init latent and framing (the 'factor codes only' rate of promptus info)",
            "unavailable": unavailable,
        },
        "settings_this_run": sorted({r["settings"] for r in rows}),
        "rows": rows + earlier, "bd_rate": bd, "bd_rate_mean": bd_mean, "plots": plots, "failures": failures,
    })
    atomic_write(out / "results.csv", _csv_text(rows + earlier, COLUMNS + SETTINGS_COLUMNS))
    bd_cols = ["clip", "promptus_interval", "baseline", "metric", "bd_rate_pct", "bd_quality", "promptus_points",
               "baseline_points"]
    atomic_write(out / "bd_rate.csv", _csv_text(bd + [dict(e, clip="mean") for e in bd_mean], bd_cols))
