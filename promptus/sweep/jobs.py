"""Sweep jobs: each point is a pure function of a JSON-able spec (:func:`run_point`).

A spec's ``inputs`` decide the result (a point is reused when its result JSON was
made from the same inputs); ``paths`` say where its files go.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import FAST_SCHEDULE_FIELDS
from ..errors import PromptusError
from ..files import read_json
from .clips import ClipInfo
from .config import SweepConfig

log = logging.getLogger(__name__)

#: Columns of results.csv, in order (results.json holds the same rows).
COLUMNS = ["clip", "codec", "point", "rank", "interval", "target_kbps", "crf", "rate_control", "kbps_all_bytes",
           "kbps_factors", "bytes", "container", "frames", "fps", "duration_s", "within_tolerance", "psnr",
           "psnr_clip", "ssim", "ms_ssim", "lpips", "severe_psnr_share", "severe_lpips_share", "encode_s", "search_s",
           "decode_s", "closed_loop_identical", "file"]
#: The settings of a point that change its result, as columns after :data:`COLUMNS` (a baseline row carries
#: those of the promptus point it was matched to, plus its own preset and tolerance); ``settings`` names the
#: set: rows with equal ``settings`` (and clip) form one sweep.
SETTINGS_COLUMNS = ["settings", "size", "model", "model_digest", "iters_first", "iters", "perceptual", "init_latent",
                    "init_precision", "seed", "decode_backend", "threads", "device", "baseline_preset", "tolerance",
                    "matched_point"]
#: Row fields that measure time: the only ones allowed to differ between two runs of the same sweep.
TIMING_FIELDS = ("encode_s", "search_s", "decode_s")
# Inputs that the point's name already shows; every other input goes into its settings digest.
_NAMED_INPUTS = ("codec", "clip", "rank", "interval")


def settings_digest(inputs: dict[str, Any]) -> str:
    """8 hex digits naming every input of a point except those its name shows (codec, clip, rank, interval)."""
    rest = {k: v for k, v in inputs.items() if k not in _NAMED_INPUTS}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:8]


def point_id(codec: str, rank: int, interval: int, settings: str | None = None) -> str:
    """The name of a point: ``promptus_r8_t10_<settings>``; a baseline point is named after the promptus
    point it matches. ``settings`` (:func:`settings_digest`) keeps points made with other iterations, sizes,
    models ... apart, so that one ``--out`` can hold several sweeps without overwriting any point."""
    base = f"{codec}_r{rank}_t{interval}"
    return f"{base}_{settings}" if settings else base


def _clip_inputs(clip: ClipInfo) -> dict[str, Any]:
    return {"clip": clip.name, "digest": clip.digest, "size": clip.size, "fps": clip.fps,
            "frame_count": clip.frame_count}


def _metric_inputs(cfg: SweepConfig) -> dict[str, Any]:
    return {"lpips": cfg.lpips, "lpips_weights": cfg.lpips_weights, "psnr_threshold": cfg.psnr_threshold,
            "lpips_threshold": cfg.lpips_threshold, "threads": cfg.threads}


def _schedule_inputs(train) -> dict[str, Any]:
    # the published schedule adds nothing: points swept before schedules existed keep their ids
    return {k: v for k, v in train.result_dict().items() if k == "schedule" or k in FAST_SCHEDULE_FIELDS}


def promptus_spec(cfg: SweepConfig, clip: ClipInfo, rank: int, interval: int, *,
                  model_digest: str | None = None) -> dict[str, Any]:
    """The job of one promptus point. ``inputs`` decide the result; ``paths`` say where files go.

    ``model_digest`` (of the weights ``cfg.model`` loads) makes new weights behind the same
    ``--model auto`` a new point rather than a reused one.
    """
    folder = Path(cfg.out).resolve() / "points" / clip.name
    t = cfg.train
    inputs = {"codec": "promptus", **_clip_inputs(clip), "rank": rank, "interval": interval,
              "iters_first": t.iters_first, "iters": t.iters, "init_latent": t.init_latent,
              "init_precision": t.init_precision, "perceptual": t.perceptual, "vgg": cfg.vgg, "seed": cfg.codec.seed,
              "model": cfg.model, "model_digest": model_digest, "taesd": cfg.taesd, "checkpoints": cfg.checkpoints,
              "device": cfg.device, "decode_backend": cfg.decode_backend, **_metric_inputs(cfg),
              **_schedule_inputs(t)}
    if t.compile != "off":  # compiled kernels round differently: part of the result (absent when off, as before)
        inputs["compile"] = t.compile
    pid = point_id("promptus", rank, interval, settings_digest(inputs))
    return {"point": pid, "inputs": inputs, "progress": cfg.progress, "max_memory": t.max_memory,
            "paths": {"frames": clip.frames_dir, "file": str(folder / f"{pid}.promptus"),
                      "result": str(folder / f"{pid}.json")}}


def baseline_spec(cfg: SweepConfig, clip: ClipInfo, codec: str, matched: dict[str, Any]) -> dict[str, Any]:
    """The job of one baseline point at the bitrate of the promptus row ``matched``."""
    folder = Path(cfg.out).resolve() / "points" / clip.name
    inputs = {"codec": codec, **_clip_inputs(clip), "rank": matched["rank"], "interval": matched["interval"],
              "matched_point": matched["point"], "target_kbps": matched["kbps_all_bytes"],
              "preset": cfg.baseline_preset, "tolerance": cfg.tolerance, **_metric_inputs(cfg)}
    pid = point_id(codec, matched["rank"], matched["interval"], settings_digest(inputs))
    return {"point": pid, "inputs": inputs, "progress": False, "ffmpeg": cfg.ffmpeg,
            "matched_settings": {k: matched.get(k) for k in SETTINGS_COLUMNS},
            "paths": {"frames": clip.frames_dir, "file": str(folder / f"{pid}.mp4"),
                      "result": str(folder / f"{pid}.json")}}


def settings_fields(inputs: dict[str, Any], matched: dict[str, Any] | None = None) -> dict[str, Any]:
    """The :data:`SETTINGS_COLUMNS` of a point with these ``inputs``; a baseline's encoder settings come from
    the inputs of its ``matched`` promptus point."""
    enc = matched if matched is not None else inputs
    out = {k: enc.get(k) for k in SETTINGS_COLUMNS}
    out.update(settings=settings_digest(inputs), size=inputs.get("size"), threads=inputs.get("threads"),
               baseline_preset=inputs.get("preset"), tolerance=inputs.get("tolerance"),
               matched_point=inputs.get("matched_point"))
    return out


def finished_row(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The row of a finished point: its result JSON exists and was made from the same inputs."""
    path = Path(spec["paths"]["result"])
    try:
        done = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s): recomputing %s", path, e, spec["point"])
        return None
    if done.get("inputs") != spec["inputs"]:
        log.warning("%s was made with other options: recomputing %s", path, spec["point"])
        return None
    return complete_row(done)


def complete_row(done: dict[str, Any]) -> dict[str, Any]:
    """The row of a point's result JSON with every column, also for points written by earlier versions
    (their missing settings columns are read from their inputs)."""
    row = dict.fromkeys(COLUMNS + SETTINGS_COLUMNS)
    row.update(done["row"])
    inputs = done.get("inputs", {})
    if row.get("settings") is None and inputs:
        row.update({k: v for k, v in settings_fields(inputs).items() if row.get(k) is None})
    return row


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
def load_models(model: str, taesd: str | None, checkpoints: str, device: str, vae: bool):
    """The models of a sweep (cached: every point of one process shares them)."""
    from ..backends import default_dtype
    from ..models import load_models

    return load_models(model, device=device, dtype=default_dtype(device), taesd=taesd, vae=vae,
                       checkpoints_dir=checkpoints)


@functools.lru_cache(maxsize=1)
def load_vgg(path: str | None):
    """The perceptual loss' VGG-19 (cached)."""
    from ..losses import load_vgg19

    return load_vgg19(path)


@functools.lru_cache(maxsize=1)
def _lpips(mode: str, weights: str | None):
    """An LPIPS network, or the reason why there is none (as a string)."""
    from ..metrics import MetricUnavailable, load_lpips

    if mode == "off":
        return "off"
    try:
        return load_lpips(weights)
    except MetricUnavailable as e:
        return e.reason


def _measure(reference, decoded, inputs: dict[str, Any]):
    from ..metrics import QualityMeter

    lp = _lpips(inputs["lpips"], inputs["lpips_weights"])
    meter = QualityMeter(lpips="off" if isinstance(lp, str) else lp, psnr_threshold_db=inputs["psnr_threshold"],
                         lpips_threshold=inputs["lpips_threshold"])
    if isinstance(lp, str) and lp != "off":
        meter.report.unavailable["lpips"] = lp
    for i in range(0, reference.shape[0], 16):
        meter.update(reference[i:i + 16], decoded[i:i + 16])
    return meter.report


def _row(inputs: dict[str, Any], point: str, **values) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS + SETTINGS_COLUMNS)
    row.update(clip=inputs["clip"], codec=inputs["codec"], point=point, rank=inputs["rank"],
               interval=inputs["interval"], frames=inputs["frame_count"], fps=inputs["fps"],
               duration_s=inputs["frame_count"] / inputs["fps"])
    row.update(values)
    assert set(row) == set(COLUMNS + SETTINGS_COLUMNS), set(row) ^ set(COLUMNS + SETTINGS_COLUMNS)
    return row


def _quality_fields(report) -> dict[str, Any]:
    s = report.summary()
    return {k: s[k] for k in ("psnr", "psnr_clip", "ssim", "ms_ssim", "lpips", "severe_psnr_share",
                              "severe_lpips_share")}


def run_promptus_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Encode, decode and measure one promptus point; returns ``{"row", "quality", "encode"}``."""
    import torch

    from ..backends import resolve_device
    from ..startup import cached_backend
    from ..bitstream import file_rate, read
    from ..config import DEFAULT_ENGINE_DIR, CodecConfig, TrainConfig
    from ..decoder import Decoder
    from ..encoder import Encoder
    from ..video import read_frames

    inputs, paths = spec["inputs"], spec["paths"]
    with _torch_threads(inputs["threads"]):
        device = resolve_device(inputs["device"])
        models = load_models(inputs["model"], inputs["taesd"], inputs["checkpoints"], str(device),
                             inputs["init_latent"] == "vae")
        vgg = load_vgg(inputs["vgg"]) if inputs["perceptual"] else None
        codec = CodecConfig(width=inputs["size"], height=inputs["size"], fps=inputs["fps"], rank=inputs["rank"],
                            interval=inputs["interval"], seed=inputs["seed"])
        train = TrainConfig(iters_first=inputs["iters_first"], iters=inputs["iters"], perceptual=inputs["perceptual"],
                            init_latent=inputs["init_latent"], init_precision=inputs["init_precision"],
                            compile=inputs.get("compile", "off"), max_memory=spec.get("max_memory", "auto"),
                            **{k: inputs[k] for k in ("schedule", *FAST_SCHEDULE_FIELDS) if k in inputs})
        reference = read_frames(paths["frames"], inputs["size"], inputs["size"])
        devices = spec.get("devices")  # execution only (an actor with several GPUs): not part of the inputs
        worker_models = None
        if devices is not None:
            from ..distributed import ModelSource

            worker_models = ModelSource(inputs["model"], inputs["taesd"], inputs["checkpoints"],
                                        vae=inputs["init_latent"] == "vae")
        enc = Encoder(codec, train, models, device=None if devices else device, vgg=vgg,
                      progress=spec.get("progress", False), devices=devices, worker_models=worker_models,
                      engine_dir=DEFAULT_ENGINE_DIR)
        t0 = time.perf_counter()
        done_before = _keyframes_done(paths["file"])  # training seconds count this run's keyframes only
        res = enc.encode(reference, paths["file"], resume=True)  # continues a killed point from its checkpoint
        encode_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        bs = read(paths["file"])
        # Kept for the actor's next point: a compiled step or captured graph is prepared once per process.
        backend = cached_backend(bs.header, models, name=inputs["decode_backend"], device=device)
        decoded = Decoder(backend, models.identity()).decode_all(bs)
        decode_s = time.perf_counter() - t0
        if decoded.shape != reference.shape:
            raise PromptusError(f"{paths['file']} decoded to {tuple(decoded.shape)}, the clip is "
                                f"{tuple(reference.shape)}")
        report = _measure(reference, decoded, inputs)
    rate = file_rate(Path(paths["file"]).read_bytes())
    row = _row(inputs, spec["point"], rate_control="promptus", kbps_all_bytes=rate.total_kbps,
               kbps_factors=rate.factors_kbps, bytes=rate.total_bytes, container="promptus", encode_s=encode_s,
               decode_s=decode_s, **settings_fields(inputs),
               closed_loop_identical=bool(torch.equal(decoded, res.reconstruction)), file=Path(paths["file"]).name,
               **_quality_fields(report))
    return {"row": row, "quality": report.to_dict(),
            "encode": {"keyframes": [k.to_dict() for k in res.keyframes], "model": models.name,
                       "model_digest": bs.header.model.hexdigest},
            "training_s": sum(k.seconds for k in res.keyframes if k.keyframe >= done_before)}


def run_baseline_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Encode one baseline point at its target bitrate, decode it with ffmpeg and measure it."""
    from ..baselines import decode_frames, encode_at_bitrate, make_baseline
    from ..video import read_frames

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
               **settings_fields(inputs, spec.get("matched_settings")),
               encode_s=enc.encode_s, search_s=enc.search_s, decode_s=decode_s, file=Path(paths["file"]).name,
               **_quality_fields(report))
    return {"row": row, "quality": report.to_dict(), "encode": enc.to_dict()}


def worker_info() -> dict[str, Any]:
    """Where a job ran: host, process, the GPUs it was given (Ray's own report when inside a Ray task)."""
    import os
    import socket

    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["ray_gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
            info["ray_node_id"] = ctx.get_node_id()
            info["ray_task_id"] = ctx.get_task_id()
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception as e:  # noqa: BLE001 — this is a report, never a reason to fail a job
        info["cuda_device_error"] = str(e)
    return info


def _keyframes_done(file: str) -> int:
    """Keyframes the checkpoint of an interrupted encode of ``file`` holds (0 when there is none)."""
    from ..checkpoint import checkpoint_paths

    try:
        done = json.loads(checkpoint_paths(Path(file))[1].read_text()).get("keyframes_done", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return done if isinstance(done, int) else 0


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """One sweep job: a pure function of ``spec`` (the same spec gives the same row, timings aside).

    The result also says where the job ran (``"worker"``: host, GPUs as Ray reported them, seconds in all and
    outside training)."""
    t0 = time.perf_counter()
    result = _run_point(spec)
    total = time.perf_counter() - t0
    result["worker"] = dict(worker_info(), executor="local", seconds=total,
                            outside_training_s=total - result.get("training_s", 0.0))
    return result


def _run_point(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["inputs"]["codec"] == "promptus":
        return run_promptus_point(spec)
    return run_baseline_point(spec)
