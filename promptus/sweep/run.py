"""Running a sweep: prepare the clips, run (or reuse) every point, write the report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PromptusError, VideoError
from ..files import check_output_path, read_json, write_json_atomic
from .clips import clip_names, prepare_clip
from .config import SweepConfig
from .executors import RAY_MISSING, LocalExecutor, RayExecutor
from .jobs import baseline_spec, complete_row, finished_row, load_models, load_vgg, promptus_spec
from .report import bd_rates, write_results

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    bd: list[dict[str, Any]]
    bd_mean: list[dict[str, Any]]
    plots: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    computed: int  # points run by this call (the others were finished before)
    out: Path
    earlier: list[dict[str, Any]] = field(default_factory=list)  # rows of other settings found in out/points


def _preflight(cfg: SweepConfig) -> str:
    """Everything that can fail before any encoding: the output folder, ffmpeg, Ray, torchmetrics, matplotlib,
    weights. Returns the digest of the model weights (part of every promptus point's settings)."""
    cfg.validate()
    check_output_path(cfg.out, "folder")
    if cfg.baselines:
        from ..baselines import BASELINES, check_ffmpeg_encoders, find_ffmpeg

        cfg.ffmpeg = find_ffmpeg(cfg.ffmpeg)
        check_ffmpeg_encoders(cfg.ffmpeg, [BASELINES[b].encoder for b in cfg.baselines])
    if cfg.ray or cfg.ray_address:
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise PromptusError(RAY_MISSING) from e
    from ..metrics import require_torchmetrics

    require_torchmetrics()
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise PromptusError("the sweep's plots need matplotlib: pip install 'promptus[eval]' "
                            "(or pip install matplotlib)") from e
    if cfg.train.perceptual:
        from ..errors import ModelNotFoundError

        try:
            load_vgg(cfg.vgg)
        except ModelNotFoundError as e:
            raise PromptusError(f"{e}\n(or run the sweep with --perceptual off)") from e
    from ..backends import resolve_device

    # Load the weights once here so a missing checkpoint fails now, not in every job.
    device = "cpu" if (cfg.ray or cfg.ray_address) else str(resolve_device(cfg.device))
    models = load_models(cfg.model, cfg.taesd, cfg.checkpoints, device, cfg.train.init_latent == "vae")
    return models.identity().hexdigest


def _row_order(cfg: SweepConfig):
    codecs = ["promptus", *cfg.baselines]

    def key(row):
        return (row["clip"], codecs.index(row["codec"]), row["interval"], row["rank"])

    return key


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or finish) a sweep; write results, BD-rates and plots into ``cfg.out``."""
    from tqdm import tqdm

    model_digest = _preflight(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clips = [prepare_clip(src, name, out, size=cfg.size, fps=cfg.fps, max_frames=cfg.max_frames)
             for src, name in zip(cfg.clips, clip_names(cfg.clips))]
    short = [f"{c.name} ({c.frame_count} frames) at interval {t}" for c in clips for t in cfg.intervals
             if c.frame_count <= t]
    if short:
        raise VideoError("a clip needs more frames than the keyframe interval: " + "; ".join(short)
                         + "; drop those intervals or use longer clips")

    executor = (RayExecutor(cfg.ray_address, gpus_per_point=cfg.gpus_per_point) if (cfg.ray or cfg.ray_address)
                else LocalExecutor())
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    by_name = {c.name: c for c in clips}
    total = len(clips) * len(cfg.ranks) * len(cfg.intervals) * (1 + len(cfg.baselines))
    bar = tqdm(total=total, desc="sweep points", unit="pt", disable=not cfg.progress)
    computed = 0

    def accept(row: dict[str, Any]) -> None:
        rows[(row["clip"], row["point"])] = row
        bar.update(1)
        if row["codec"] == "promptus":  # its baselines can start now
            for b in cfg.baselines:
                spec = baseline_spec(cfg, by_name[row["clip"]], b, row)
                done = finished_row(spec)
                if done is not None:
                    accept(done)
                else:
                    executor.submit(spec, first=True)

    try:
        for clip in clips:
            for interval in cfg.intervals:
                for rank in cfg.ranks:
                    spec = promptus_spec(cfg, clip, rank, interval, model_digest=model_digest)
                    done = finished_row(spec)
                    if done is not None:
                        accept(done)
                    else:
                        executor.submit(spec)
        while executor:
            spec, result = executor.next_result()
            computed += 1
            where = f"{spec['inputs']['clip']}/{spec['point']}"
            if isinstance(result, BaseException):
                log.error("point %s failed: %s", where, result)
                failures.append({"clip": spec["inputs"]["clip"], "point": spec["point"], "error": str(result)})
                bar.update(1 + (len(cfg.baselines) if spec["inputs"]["codec"] == "promptus" else 0))
                continue
            write_json_atomic(spec["paths"]["result"], {"inputs": spec["inputs"], **result})
            r = result["row"]
            log.info("%s: %.1f kbit/s, PSNR %.2f dB, SSIM %.4f; %s", where, r["kbps_all_bytes"], r["psnr"], r["ssim"],
                     describe_worker(result.get("worker", {})))
            accept(r)
    finally:
        bar.close()
        executor.close()

    ordered = sorted(rows.values(), key=_row_order(cfg))
    bd, bd_mean = bd_rates(ordered, [c.name for c in clips], cfg.intervals, cfg.baselines)
    from ..plots import save_rd_plots

    plots = save_rd_plots(ordered, out, clips=[c.name for c in clips])
    earlier = [r for r in earlier_rows(out) if (r["clip"], r["point"]) not in rows]
    write_results(out, cfg, ordered, earlier, bd, bd_mean, plots, failures, clips)
    return SweepResult(ordered, bd, bd_mean, plots, failures, computed, out, earlier)


def describe_worker(w: dict[str, Any]) -> str:
    """Where a point ran and how long it took, for the log: host, pid, GPUs, seconds outside training."""
    where = f"ran on {w.get('host', '?')} pid {w.get('pid', '?')}"
    if w.get("ray_gpu_ids"):
        where += f" GPU {','.join(w['ray_gpu_ids'])}"
    if w.get("executor") == "ray-actor":
        where += f" (Ray actor, its point {w.get('actor_points')}, attempt {w.get('attempt')})"
    if "seconds" in w:
        where += f", {w['seconds']:.1f} s, {w.get('outside_training_s', 0.0):.1f} s outside training"
    return where


def earlier_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of every finished point under ``out/points/`` (this run's and earlier runs'), ordered by
    settings, clip, codec, interval and rank; unreadable result files are skipped with a warning."""
    found = []
    for path in sorted(Path(out, "points").glob("*/*.json")):
        try:
            found.append(complete_row(read_json(path)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("skipping %s in the results: %s", path, e)
    return sorted(found, key=lambda r: (str(r["settings"]), r["clip"], r["codec"] != "promptus", r["codec"],
                                        r["interval"] or 0, r["rank"] or 0))
