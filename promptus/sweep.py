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
continues from its checkpoint. Jobs run in order in this process, or through Ray
(``--ray``, ``--ray-address``; ``pip install promptus[distributed]``), one task per
point; results do not depend on how they were run (each job fixes its torch thread
count, ``--threads``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import io
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PromptusError, VideoError
from .files import atomic_write

log = logging.getLogger(__name__)

#: Columns of results.csv, in order (results.json holds the same rows).
COLUMNS = ["clip", "codec", "point", "rank", "interval", "target_kbps", "crf", "rate_control", "kbps_all_bytes",
           "bytes", "container", "frames", "fps", "duration_s", "within_tolerance", "psnr", "psnr_clip", "ssim",
           "ms_ssim", "lpips", "severe_psnr_share", "severe_lpips_share", "encode_s", "search_s", "decode_s",
           "closed_loop_identical", "file"]
#: Row fields that measure time: the only ones allowed to differ between two runs of the same sweep.
TIMING_FIELDS = ("encode_s", "search_s", "decode_s")
BD_METRICS = ("psnr", "ssim")


@dataclass
class SweepConfig:
    """Everything a sweep depends on (serialised into results.json)."""

    clips: list[str]
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    intervals: list[int] = field(default_factory=lambda: [5, 10, 20])
    baselines: list[str] = field(default_factory=lambda: ["x264", "x265"])
    out: str = "outputs/sweep"
    # the encoder (as `promptus encode`)
    size: int = 512
    fps: float | None = None
    max_frames: int | None = None
    iters_first: int = 10_000
    iters: int = 1_500
    init_latent: str = "vae"
    init_precision: str = "fp16"
    perceptual: bool = True
    vgg: str | None = None
    seed: int = 88
    model: str = "auto"
    taesd: str | None = None
    device: str = "auto"
    checkpoints: str = "checkpoints"
    decode_backend: str = "torch"
    threads: int = 1
    # the baselines
    preset: str = "medium"
    ffmpeg: str = "ffmpeg"
    tolerance: float = 0.10
    # the metrics
    lpips: str = "auto"
    lpips_weights: str | None = None
    psnr_threshold: float = 20.0
    lpips_threshold: float = 0.4
    # how jobs run
    ray: bool = False
    ray_address: str | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, args) -> "SweepConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["perceptual"] = args.perceptual == "on" if isinstance(args.perceptual, str) else args.perceptual
        values["progress"] = not getattr(args, "quiet", False)
        if args.baselines is None:
            values["baselines"] = []
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        from .baselines import BASELINES

        if not self.clips:
            raise PromptusError("give at least one clip (a video file or a folder of frames)")
        for c in self.clips:
            if not Path(c).exists():
                raise PromptusError(f"clip {c} does not exist")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise PromptusError(f"--ranks {self.ranks}: give one or more ranks ≥ 1")
        if not self.intervals or any(t < 1 for t in self.intervals):
            raise PromptusError(f"--intervals {self.intervals}: give one or more intervals ≥ 1")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise PromptusError(f"unknown baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
        if self.size <= 0 or self.size % 8:
            raise PromptusError(f"--size {self.size} must be a positive multiple of 8")
        if not 0 < self.tolerance < 1:
            raise PromptusError(f"--tolerance {self.tolerance} must lie between 0 and 1 (0.1 = 10 %)")
        if self.threads < 1:
            raise PromptusError(f"--threads {self.threads} must be ≥ 1")


# ------------------------------------------------------------------- clips


@dataclass(frozen=True)
class ClipInfo:
    """A clip prepared for the sweep: PNG frames at the sweep's size."""

    name: str
    source: str
    frames_dir: str
    fps: float
    frame_count: int
    size: int
    digest: str  # of the prepared frames: a changed clip makes its points stale

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps


def _clip_names(sources: list[str]) -> list[str]:
    names: list[str] = []
    for s in sources:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(s).resolve().stem or Path(s).resolve().name) or "clip"
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def prepare_clip(source: str | os.PathLike, name: str, out: str | os.PathLike, *, size: int,
                 fps: float | None = None, max_frames: int | None = None) -> ClipInfo:
    """Crop and resize ``source`` to ``size`` and keep it as PNGs under ``out/clips/name/`` (reused when unchanged)."""
    from .encoder import frames_digest
    from .metrics import write_json_atomic
    from .video import read_frames, video_fps, write_frames

    folder = Path(out) / "clips" / name
    meta_path = folder.with_suffix(".json")
    frames = read_frames(source, size, size, max_frames)
    rate = float(fps or video_fps(source) or 30.0)
    info = ClipInfo(name=name, source=str(Path(source).resolve()), frames_dir=str(folder.resolve()), fps=rate,
                    frame_count=int(frames.shape[0]), size=size, digest=frames_digest(frames))
    try:
        same = json.loads(meta_path.read_text()) == dataclasses.asdict(info)
    except (OSError, ValueError):
        same = False
    if not (same and len(list(folder.glob("*.png"))) == info.frame_count):
        write_frames(frames.numpy(), folder, rate)
        write_json_atomic(meta_path, dataclasses.asdict(info))
    return info


# ------------------------------------------------------------------- specs


def point_id(codec: str, rank: int, interval: int) -> str:
    """The name of a point: ``promptus_r8_t10``; a baseline point is named after the promptus point it matches."""
    return f"{codec}_r{rank}_t{interval}"


def _clip_inputs(clip: ClipInfo) -> dict[str, Any]:
    return {"clip": clip.name, "digest": clip.digest, "size": clip.size, "fps": clip.fps,
            "frame_count": clip.frame_count}


def _metric_inputs(cfg: SweepConfig) -> dict[str, Any]:
    return {"lpips": cfg.lpips, "lpips_weights": cfg.lpips_weights, "psnr_threshold": cfg.psnr_threshold,
            "lpips_threshold": cfg.lpips_threshold, "threads": cfg.threads}


def promptus_spec(cfg: SweepConfig, clip: ClipInfo, rank: int, interval: int) -> dict[str, Any]:
    """The job of one promptus point. ``inputs`` decide the result; ``paths`` say where files go."""
    pid = point_id("promptus", rank, interval)
    folder = Path(cfg.out).resolve() / "points" / clip.name
    inputs = {"codec": "promptus", **_clip_inputs(clip), "rank": rank, "interval": interval,
              "iters_first": cfg.iters_first, "iters": cfg.iters, "init_latent": cfg.init_latent,
              "init_precision": cfg.init_precision, "perceptual": cfg.perceptual, "vgg": cfg.vgg, "seed": cfg.seed,
              "model": cfg.model, "taesd": cfg.taesd, "checkpoints": cfg.checkpoints, "device": cfg.device,
              "decode_backend": cfg.decode_backend, **_metric_inputs(cfg)}
    return {"point": pid, "inputs": inputs, "progress": cfg.progress,
            "paths": {"frames": clip.frames_dir, "file": str(folder / f"{pid}.promptus"),
                      "result": str(folder / f"{pid}.json")}}


def baseline_spec(cfg: SweepConfig, clip: ClipInfo, codec: str, matched: dict[str, Any]) -> dict[str, Any]:
    """The job of one baseline point at the bitrate of the promptus row ``matched``."""
    pid = point_id(codec, matched["rank"], matched["interval"])
    folder = Path(cfg.out).resolve() / "points" / clip.name
    inputs = {"codec": codec, **_clip_inputs(clip), "rank": matched["rank"], "interval": matched["interval"],
              "target_kbps": matched["kbps_all_bytes"], "preset": cfg.preset, "tolerance": cfg.tolerance,
              **_metric_inputs(cfg)}
    return {"point": pid, "inputs": inputs, "progress": False, "ffmpeg": cfg.ffmpeg,
            "paths": {"frames": clip.frames_dir, "file": str(folder / f"{pid}.mp4"),
                      "result": str(folder / f"{pid}.json")}}


def finished_row(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The row of a finished point: its result JSON exists and was made from the same inputs."""
    from .metrics import json_restore

    path = Path(spec["paths"]["result"])
    try:
        done = json_restore(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s): recomputing %s", path, e, spec["point"])
        return None
    if done.get("inputs") != spec["inputs"]:
        log.warning("%s was made with other options: recomputing %s", path, spec["point"])
        return None
    return done["row"]


# -------------------------------------------------------------------- jobs


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    # CPU results depend on the thread count (reduction order); every job fixes it.
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@functools.lru_cache(maxsize=1)
def _models(model: str, taesd: str | None, checkpoints: str, device: str, vae: bool):
    from .backends import default_dtype
    from .models import load_models

    return load_models(model, device=device, dtype=default_dtype(device), taesd=taesd, vae=vae,
                       checkpoints_dir=checkpoints)


@functools.lru_cache(maxsize=1)
def _vgg(path: str | None):
    from .losses import load_vgg19

    return load_vgg19(path)


@functools.lru_cache(maxsize=1)
def _lpips(mode: str, weights: str | None):
    """An LPIPS network, or the reason why there is none (as a string)."""
    from .metrics import MetricUnavailable, load_lpips

    if mode == "off":
        return "off"
    try:
        return load_lpips(weights)
    except MetricUnavailable as e:
        return e.reason


def _measure(reference, decoded, inputs: dict[str, Any]):
    from .metrics import QualityMeter

    lp = _lpips(inputs["lpips"], inputs["lpips_weights"])
    meter = QualityMeter(lpips="off" if isinstance(lp, str) else lp, psnr_threshold_db=inputs["psnr_threshold"],
                         lpips_threshold=inputs["lpips_threshold"])
    if isinstance(lp, str) and lp != "off":
        meter.report.unavailable["lpips"] = lp
    for i in range(0, reference.shape[0], 16):
        meter.update(reference[i:i + 16], decoded[i:i + 16])
    return meter.report


def _row(inputs: dict[str, Any], point: str, **values) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(clip=inputs["clip"], codec=inputs["codec"], point=point, rank=inputs["rank"],
               interval=inputs["interval"], frames=inputs["frame_count"], fps=inputs["fps"],
               duration_s=inputs["frame_count"] / inputs["fps"])
    row.update(values)
    assert set(row) == set(COLUMNS), set(row) ^ set(COLUMNS)
    return row


def _quality_fields(report) -> dict[str, Any]:
    s = report.summary()
    return {k: s[k] for k in ("psnr", "psnr_clip", "ssim", "ms_ssim", "lpips", "severe_psnr_share",
                              "severe_lpips_share")}


def run_promptus_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Encode, decode and measure one promptus point; returns ``{"row", "quality", "encode"}``."""
    import torch

    from .backends import make_backend, resolve_device
    from .bitstream import read
    from .cli import configs_from_args
    from .decoder import Decoder
    from .encoder import Encoder
    from .video import read_frames

    inputs, paths = spec["inputs"], spec["paths"]
    with _torch_threads(inputs["threads"]):
        device = resolve_device(inputs["device"])
        models = _models(inputs["model"], inputs["taesd"], inputs["checkpoints"], str(device),
                         inputs["init_latent"] == "vae")
        vgg = _vgg(inputs["vgg"]) if inputs["perceptual"] else None
        ns = argparse.Namespace(size=inputs["size"], rank=inputs["rank"], interval=inputs["interval"],
                                seed=inputs["seed"], iters_first=inputs["iters_first"], iters=inputs["iters"],
                                perceptual="on" if inputs["perceptual"] else "off",
                                init_latent=inputs["init_latent"], init_precision=inputs["init_precision"])
        codec, train = configs_from_args(ns, inputs["fps"])
        reference = read_frames(paths["frames"], inputs["size"], inputs["size"])
        enc = Encoder(codec, train, models, device=device, vgg=vgg, progress=spec.get("progress", False))
        t0 = time.perf_counter()
        res = enc.encode(reference, paths["file"], resume=True)  # continues a killed point from its checkpoint
        encode_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        bs = read(paths["file"])
        backend = make_backend(inputs["decode_backend"], models, device)
        decoded = Decoder(backend, models.identity()).decode_all(bs)
        decode_s = time.perf_counter() - t0
        if decoded.shape != reference.shape:
            raise PromptusError(f"{paths['file']} decoded to {tuple(decoded.shape)}, the clip is "
                                f"{tuple(reference.shape)}")
        report = _measure(reference, decoded, inputs)
    nbytes = Path(paths["file"]).stat().st_size
    duration = bs.header.frame_count / bs.header.fps
    row = _row(inputs, spec["point"], rate_control="promptus", kbps_all_bytes=8 * nbytes / duration / 1000,
               bytes=nbytes, container="promptus", encode_s=encode_s, decode_s=decode_s,
               closed_loop_identical=bool(torch.equal(decoded, res.reconstruction)), file=Path(paths["file"]).name,
               **_quality_fields(report))
    return {"row": row, "quality": report.to_dict(),
            "encode": {"keyframes": [k.to_dict() for k in res.keyframes], "model": models.name,
                       "model_digest": bs.header.model.hexdigest}}


def run_baseline_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Encode one baseline point at its target bitrate, decode it with ffmpeg and measure it."""
    from .baselines import decode_frames, encode_at_bitrate, make_baseline
    from .video import read_frames

    inputs, paths = spec["inputs"], spec["paths"]
    codec = make_baseline(inputs["codec"], preset=inputs["preset"], ffmpeg=spec["ffmpeg"])
    enc = encode_at_bitrate(codec, paths["frames"], inputs["fps"], inputs["frame_count"], inputs["target_kbps"],
                            paths["file"], tolerance=inputs["tolerance"])
    t0 = time.perf_counter()
    decoded = decode_frames(paths["file"], inputs["size"], inputs["size"], ffmpeg=spec["ffmpeg"])
    decode_s = time.perf_counter() - t0
    with _torch_threads(inputs["threads"]):
        reference = read_frames(paths["frames"], inputs["size"], inputs["size"])
        if decoded.shape != reference.shape:
            raise PromptusError(f"{paths['file']} decoded to {tuple(decoded.shape)}, the clip is "
                                f"{tuple(reference.shape)}")
        report = _measure(reference, decoded, inputs)
    row = _row(inputs, spec["point"], target_kbps=enc.target_kbps, crf=enc.crf, rate_control=enc.rate_control,
               kbps_all_bytes=enc.kbps, bytes=enc.bytes, container="mp4", within_tolerance=enc.within_tolerance,
               encode_s=enc.encode_s, search_s=enc.search_s, decode_s=decode_s, file=Path(paths["file"]).name,
               **_quality_fields(report))
    return {"row": row, "quality": report.to_dict(), "encode": enc.to_dict()}


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """One sweep job: a pure function of ``spec`` (the same spec gives the same row, timings aside)."""
    if spec["inputs"]["codec"] == "promptus":
        return run_promptus_point(spec)
    return run_baseline_point(spec)


# --------------------------------------------------------------- executors


class LocalExecutor:
    """Runs jobs one after another in this process."""

    name = "local"

    def __init__(self) -> None:
        self._queue: deque[dict[str, Any]] = deque()

    def submit(self, spec: dict[str, Any], *, first: bool = False) -> None:
        (self._queue.appendleft if first else self._queue.append)(spec)

    def __bool__(self) -> bool:
        return bool(self._queue)

    def next_result(self) -> tuple[dict[str, Any], dict[str, Any] | BaseException]:
        spec = self._queue.popleft()
        try:
            return spec, run_point(spec)
        except (PromptusError, OSError, RuntimeError, ValueError) as e:
            return spec, e

    def close(self) -> None:
        pass


RAY_MISSING = "--ray needs Ray, which is not installed: pip install 'promptus[distributed]' (or pip install ray)"


class RayExecutor:
    """Runs each job as a Ray task: num_gpus=1 for promptus points where the cluster has GPUs, else num_cpus=1.

    ``address`` None starts (or joins) a local Ray instance. With a remote
    cluster, every node must see the sweep's --out folder and the clips at the
    same paths (a shared file system) and have promptus installed.
    """

    name = "ray"

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError as e:
            raise PromptusError(RAY_MISSING) from e
        self.ray = ray
        self._owned = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._owned = True
        gpus = ray.cluster_resources().get("GPU", 0)
        self.gpu = gpus >= 1
        self._promptus = ray.remote(num_gpus=1 if self.gpu else 0, num_cpus=1)(run_point)
        self._baseline = ray.remote(num_gpus=0, num_cpus=1)(run_point)
        self._pending: dict[Any, dict[str, Any]] = {}
        log.info("ray: %s, %s per promptus point", ray.cluster_resources(),
                 "1 GPU" if self.gpu else "1 CPU (no GPU in the cluster)")

    def submit(self, spec: dict[str, Any], *, first: bool = False) -> None:
        task = self._promptus if spec["inputs"]["codec"] == "promptus" else self._baseline
        self._pending[task.remote(spec)] = spec

    def __bool__(self) -> bool:
        return bool(self._pending)

    def next_result(self) -> tuple[dict[str, Any], dict[str, Any] | BaseException]:
        done, _ = self.ray.wait(list(self._pending), num_returns=1)
        spec = self._pending.pop(done[0])
        try:
            return spec, self.ray.get(done[0])
        except Exception as e:  # a task's error arrives wrapped; keep the original where Ray gives it
            return spec, getattr(e, "cause", None) or e

    def close(self) -> None:
        for ref in self._pending:
            self.ray.cancel(ref)
        if self._owned:
            self.ray.shutdown()


# ------------------------------------------------------------------- sweep


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    bd: list[dict[str, Any]]
    bd_mean: list[dict[str, Any]]
    plots: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    computed: int  # points run by this call (the others were finished before)
    out: Path


def _preflight(cfg: SweepConfig) -> None:
    """Everything that can fail before any encoding: ffmpeg, Ray, torchmetrics, matplotlib, weights."""
    cfg.validate()
    if cfg.baselines:
        from .baselines import BASELINES, check_ffmpeg_encoders, find_ffmpeg

        cfg.ffmpeg = find_ffmpeg(cfg.ffmpeg)
        check_ffmpeg_encoders(cfg.ffmpeg, [BASELINES[b].encoder for b in cfg.baselines])
    if cfg.ray or cfg.ray_address:
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise PromptusError(RAY_MISSING) from e
    from .metrics import _torchmetrics_image

    _torchmetrics_image()
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise PromptusError("the sweep's plots need matplotlib: pip install 'promptus[eval]' "
                            "(or pip install matplotlib)") from e
    if cfg.perceptual:
        from .errors import ModelNotFoundError

        try:
            _vgg(cfg.vgg)
        except ModelNotFoundError as e:
            raise PromptusError(f"{e}\n(or run the sweep with --perceptual off)") from e
    from .backends import resolve_device

    # Load the weights once here so a missing checkpoint fails now, not in every job.
    device = "cpu" if (cfg.ray or cfg.ray_address) else str(resolve_device(cfg.device))
    _models(cfg.model, cfg.taesd, cfg.checkpoints, device, cfg.init_latent == "vae")


def _row_order(cfg: SweepConfig):
    codecs = ["promptus", *cfg.baselines]

    def key(row):
        return (row["clip"], codecs.index(row["codec"]), row["interval"], row["rank"])

    return key


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or finish) a sweep; write results, BD-rates and plots into ``cfg.out``."""
    from tqdm import tqdm

    from .metrics import write_json_atomic

    _preflight(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clips = [prepare_clip(src, name, out, size=cfg.size, fps=cfg.fps, max_frames=cfg.max_frames)
             for src, name in zip(cfg.clips, _clip_names(cfg.clips))]
    short = [f"{c.name} ({c.frame_count} frames) at interval {t}" for c in clips for t in cfg.intervals
             if c.frame_count <= t]
    if short:
        raise VideoError("a clip needs more frames than the keyframe interval: " + "; ".join(short)
                         + "; drop those intervals or use longer clips")

    executor = RayExecutor(cfg.ray_address) if (cfg.ray or cfg.ray_address) else LocalExecutor()
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
                    spec = promptus_spec(cfg, clip, rank, interval)
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
            log.info("%s: %.1f kbit/s, PSNR %.2f dB, SSIM %.4f", where, r["kbps_all_bytes"], r["psnr"], r["ssim"])
            accept(r)
    finally:
        bar.close()
        executor.close()

    ordered = sorted(rows.values(), key=_row_order(cfg))
    bd, bd_mean = bd_rates(ordered, [c.name for c in clips], cfg.intervals, cfg.baselines)
    from .plots import save_rd_plots

    plots = save_rd_plots(ordered, out, clips=[c.name for c in clips])
    write_results(out, cfg, ordered, bd, bd_mean, plots, failures, clips)
    return SweepResult(ordered, bd, bd_mean, plots, failures, computed, out)


# ------------------------------------------------------------ BD and files


def bd_rates(rows: list[dict[str, Any]], clips: list[str], intervals: list[int], baselines: list[str]
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """BD-rate (and BD-quality) of each promptus interval curve against each baseline, per clip and averaged.

    The promptus curve of interval T runs over the ranks; a baseline's curve is
    all its points of the clip. Rates are the achieved kbit/s (all bytes). None
    where the quality ranges don't overlap; the mean is over the clips with a value.
    """
    from .metrics import bd_quality, bd_rate
    from .plots import curve_points

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


def write_results(out: Path, cfg: SweepConfig, rows, bd, bd_mean, plots, failures, clips) -> None:
    from .metrics import write_json_atomic

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
            "unavailable": unavailable,
        },
        "rows": rows, "bd_rate": bd, "bd_rate_mean": bd_mean, "plots": plots, "failures": failures,
    })
    atomic_write(out / "results.csv", _csv_text(rows, COLUMNS))
    bd_cols = ["clip", "promptus_interval", "baseline", "metric", "bd_rate_pct", "bd_quality", "promptus_points",
               "baseline_points"]
    atomic_write(out / "bd_rate.csv", _csv_text(bd + [dict(e, clip="mean") for e in bd_mean], bd_cols))


def format_results(result: SweepResult) -> str:
    """The table ``promptus sweep`` prints."""

    def f(v, d=2):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if v == float("inf") else f"{v:.{d}f}"
        return str(v)

    head = (f"{'clip':<12}{'codec':<9}{'r':>3}{'T':>4}{'target':>9}{'kbps':>9}{'PSNR':>7}{'SSIM':>8}"
            f"{'MS-SSIM':>8}{'LPIPS':>7}{'sev.':>6}{'enc s':>8}  rate control")
    lines = [head]
    for r in result.rows:
        rc = r["rate_control"] + (f" crf {r['crf']:g}" if r["crf"] is not None else "")
        if r["within_tolerance"] is False:
            rc += " (missed target)"
        lines.append(f"{r['clip'][:11]:<12}{r['codec']:<9}{r['rank']:>3}{r['interval']:>4}"
                     f"{f(r['target_kbps'], 1):>9}{f(r['kbps_all_bytes'], 1):>9}{f(r['psnr']):>7}"
                     f"{f(r['ssim'], 4):>8}{f(r['ms_ssim'], 4):>8}{f(r['lpips'], 3):>7}"
                     f"{f(r['severe_psnr_share']):>6}{f(r['encode_s'], 1):>8}  {rc}")
    lines += ["", "BD-rate of promptus against each baseline (mean over clips; - = curves don't overlap):"]
    for e in result.bd_mean:
        v = "-" if e["bd_rate_pct"] is None else f"{e['bd_rate_pct']:+.1f} %"
        lines.append(f"  T={e['promptus_interval']:<3} vs {e['baseline']:<5} {e['metric']:<5} {v:>10}"
                     f"  ({e['clips_with_overlap']}/{e['clips']} clips)")
    return "\n".join(lines)


# ---------------------------------------------------------------- command


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """The sweep's options (the `sweep` command and scripts/bitrate_sweep.py)."""
    from .cli import _add_model_args, add_encode_args
    from .metrics import add_metric_args

    p.add_argument("clips", nargs="+", metavar="CLIP", help="video files or folders of frames")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16], help="prompt ranks (default: 2 4 8 16)")
    p.add_argument("--intervals", type=int, nargs="+", default=[5, 10, 20],
                   help="keyframe intervals; one promptus curve each (default: 5 10 20)")
    p.add_argument("--baselines", nargs="*", default=["x264", "x265"], metavar="CODEC",
                   help="baseline codecs at matched bitrates: x264, x265; none with a bare --baselines "
                        "(default: x264 x265)")
    p.add_argument("--out", default="outputs/sweep", help="output folder; rerunning resumes (default: outputs/sweep)")
    add_encode_args(p, rate=False)
    _add_model_args(p)
    p.add_argument("--decode-backend", default="torch", help="backend that decodes the promptus points (default: torch)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per job; CPU results depend on it, so it is part of each point's "
                        "inputs (default: 1)")
    p.add_argument("--preset", default="medium", help="x264/x265 preset (default: medium)")
    p.add_argument("--ffmpeg", default="ffmpeg", help="the ffmpeg executable (default: ffmpeg on PATH)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="baseline bitrate tolerance: a CRF search follows two-pass ABR when it misses the target "
                        "by more (default: 0.10)")
    add_metric_args(p)
    p.add_argument("--ray", action="store_true",
                   help="run one Ray task per point on a local Ray instance (pip install 'promptus[distributed]')")
    p.add_argument("--ray-address", default=None, help="run the tasks on this Ray cluster (implies --ray)")


def cmd_sweep(args) -> int:
    result = run_sweep(SweepConfig.from_args(args))
    print(format_results(result))
    print(f"\nwrote {result.out / 'results.csv'}, results.json, bd_rate.csv and "
          f"{', '.join(Path(p['png']).name for p in result.plots)} ({result.computed} points computed now)")
    if result.failures:
        for f in result.failures:
            print(f"promptus: error: point {f['clip']}/{f['point']} failed: {f['error']}")
        return 1
    return 0


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``promptus sweep`` to the command's subparsers."""
    s = subparsers.add_parser(
        "sweep", help="rate–distortion sweep: promptus ranks × intervals against x264/x265",
        description="Encode every (clip, rank, interval) with promptus, encode the same clips with x264/x265 "
                    "(system ffmpeg) at each point's bitrate, measure everything the same way and write "
                    "results.csv/json, bd_rate.csv and rate–distortion plots into --out. Finished points are "
                    "reused: rerun the same command to resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: promptus sweep clip.mp4 --ranks 2 4 8 16 --intervals 5 10 20 --baselines x264 x265 "
               "--out outputs/sweep --perceptual off")
    add_sweep_args(s)
    s.set_defaults(func=cmd_sweep)
    return s
