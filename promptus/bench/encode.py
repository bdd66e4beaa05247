"""``promptus bench --encode``: promptus' batched trainer against the published loop, in one process.

* ``published`` and ``published, frozen``: :mod:`promptus.bench.published`.
* ``promptus``: :meth:`promptus.encoder.Encoder.train_keyframe`, one batch of T frames
  per iteration, fp16 weights with loss scaling, VGG under bf16 autocast; eager, and
  with the training step compiled (``TrainConfig.compile``).

It also runs the trainer under memory budgets (24, 16, 12, 8 GB by default): the plan
the encoder picks for each (:mod:`promptus.memory`), enforced on CUDA with
``torch.cuda.set_per_process_memory_fraction`` so that a plan that does not fit fails
instead of borrowing memory, its measured peak and its speed against the
unconstrained plan; and a profile of keyframe 0's batch-1 step (kernels per
iteration, GPU-busy time against wall time: how launch-bound it is). Every row
projects a 141-frame clip at the published iteration counts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import CodecConfig, TrainConfig
from ..files import write_json_atomic
from .common import peak_gib as _peak_gib, peak_reset as _peak_reset, sync as _sync, targets as _targets
from .published import time_published as _time_published

log = logging.getLogger(__name__)


@dataclass
class EncodeTiming:
    procedure: str
    passes_per_iteration: int
    ms_per_iteration_segment: float  # a later keyframe: T frames
    ms_per_iteration_first: float  # keyframe 0: one frame
    peak_gib: float
    s_per_keyframe: float = math.nan  # a later keyframe at the published 1500 iterations
    s_keyframe0: float = math.nan  # keyframe 0 at the published 10 000 iterations
    speedup: float = math.nan  # published s_per_keyframe / this
    speedup_first: float = math.nan  # published s_keyframe0 / this
    s_clip: float = math.nan  # a CLIP_FRAMES-frame clip at the published iteration counts
    runs_segment: list = field(default_factory=list)  # the baseline's repeats (ms/it); the row holds their median
    runs_first: list = field(default_factory=list)


#: Frames of the clip whose encoding time the benchmark projects (the issue's 141-frame clip).
CLIP_FRAMES = 141
#: Memory budgets the encode benchmark runs the trainer under, by default.
BENCH_BUDGETS = ("24GB", "16GB", "12GB", "8GB")


@dataclass
class PlanTiming:
    """The trainer under one memory budget: the plan the encoder chose and what it measured."""

    budget: str
    budget_gib: float
    plan: str = ""
    estimated_gib: float = math.nan
    peak_gib: float = math.nan  # torch.cuda.max_memory_allocated
    reserved_gib: float = math.nan  # torch.cuda.max_memory_reserved: what the GPU had to provide
    ms_per_iteration_segment: float = math.nan
    relative_speed: float = math.nan  # unconstrained ms / this ms
    s_clip: float = math.nan  # keyframe 0 unconstrained (one frame fits) + the later keyframes at this speed
    status: str = "ok"


def clip_seconds(ms_first: float, ms_segment: float, interval: int, frames: int = CLIP_FRAMES) -> float:
    """Seconds to encode ``frames`` frames at the published iteration counts: keyframe 0 + the later keyframes."""
    published = TrainConfig()
    later = CodecConfig(interval=interval).keyframe_count(frames) - 1
    return (ms_first * published.iters_first + later * ms_segment * published.iters) / 1000


def _time_ours(models, vgg, size, interval, rank, iters, warmup, device, *, max_memory="none", compile="off",
               kinds=("segment", "first")) -> dict:
    """ms per iteration of a later keyframe (and of keyframe 0), peak memory, and the plan chosen for a segment.

    One encoder serves the warm-up and the timed run, so that a compiled step compiles once per shape.
    """
    from ..bitstream import Keyframe
    from ..encoder import Encoder
    from ..prompts import quantize_tensor
    from ..schedule import OneStep, make_noise

    cfg = CodecConfig(width=size, height=size, rank=rank, interval=interval)
    g = torch.Generator().manual_seed(0)
    prev = Keyframe(0, quantize_tensor(torch.rand(cfg.tokens, rank, generator=g)),
                    quantize_tensor(torch.rand(rank, cfg.embed_dim, generator=g)))
    z = make_noise(cfg).to(device)
    targets = _targets(size, interval, device)
    onestep = OneStep.at(cfg.timestep)
    tc = TrainConfig(iters_first=warmup, iters=warmup, perceptual=vgg is not None, init_latent="taesd",
                     max_memory=max_memory, compile=compile)
    enc = Encoder(cfg, tc, models, device=device, vgg=vgg, progress=False)
    out = {"plan": enc.plan_for(interval)}
    for kind in kinds:
        def run(n):
            enc.train = tc.replace(iters_first=n, iters=n)
            if kind == "first":
                enc.train_keyframe(0, z, targets[:1], None, onestep)
            else:
                enc.train_keyframe(1, z, targets, prev, onestep)

        _peak_reset(device)
        t0 = time.perf_counter()
        run(warmup)  # compiles, when compiling
        _sync(device)
        out[f"warmup_s_{kind}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(iters)
        _sync(device)
        out[f"ms_{kind}"] = 1000 * (time.perf_counter() - t0) / iters
        out[f"peak_gib_{kind}"] = _peak_gib(device)
        out[f"reserved_gib_{kind}"] = (torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda"
                                       else math.nan)
    return out


def profile_first_step(models, vgg, size, interval, rank, device, iters: int = 5) -> dict:
    """Where keyframe 0's batch-1 eager step spends its time: wall ms, GPU-busy ms, kernels per iteration, top kernels.

    A step whose GPU-busy time is a small part of its wall time is launch-bound: CUDA graphs help it.
    Empty on the CPU.
    """
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    from ..encoder import Encoder
    from ..schedule import OneStep, make_noise

    cfg = CodecConfig(width=size, height=size, rank=rank, interval=interval)
    z = make_noise(cfg).to(device)
    target = _targets(size, 1, device)
    enc = Encoder(cfg, TrainConfig(iters_first=2, perceptual=vgg is not None, init_latent="taesd", max_memory="none"),
                  models, device=device, vgg=vgg, progress=False)
    enc.train_keyframe(0, z, target, None, OneStep.at(cfg.timestep))  # warm
    enc.train = enc.train.replace(iters_first=iters)
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        enc.train_keyframe(0, z, target, None, OneStep.at(cfg.timestep))
        _sync(device)
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    busy_us = sum(device_us(e) for e in kernels)
    top = sorted(kernels, key=device_us, reverse=True)[:5]
    return {
        "iterations": iters, "wall_ms": 1000 * wall / iters, "gpu_busy_ms": busy_us / 1000 / iters,
        "kernels_per_iteration": sum(e.count for e in kernels) / iters,
        "top_kernels_ms": [[e.key[:60], device_us(e) / 1000 / iters] for e in top],
        "note": "wall time under the profiler, which adds its own overhead",
    }


def bench_encode(model: str = "random", device: str | None = None, size: int = CodecConfig.width,
                 interval: int = CodecConfig.interval, rank: int = CodecConfig.rank,
                 iters: int = 10, iters_published: int = 3, warmup: int = 2, perceptual: bool = True,
                 json_path: str | None = None, budgets=BENCH_BUDGETS, compile: str | None = None,
                 profile: bool = True, baseline_repeats: int = 3) -> dict:
    """Time the published per-frame procedure and ours in one process; return the results (and write them as JSON).

    ``budgets``: memory budgets (sizes as ``--max-memory`` takes them) to run the trainer
    under; ``compile``: the torch.compile mode of the compiled-trainer row ("off" leaves it
    out; default: reduce-overhead on CUDA, off on the CPU, where inductor takes minutes).
    ``baseline_repeats``: timed runs of each published row; the row holds their median, and
    a spread between them or a median far off this machine's earlier runs is flagged
    (:mod:`promptus.bench.history`, ``result["baseline_flags"]``).
    The JSON is rewritten after every part, so that a run cut short keeps what it measured.
    """
    from . import history
    import os

    from ..backends import resolve_device
    from ..errors import PromptusError
    from ..losses import random_vgg19
    from ..memory import GIB, parse_memory
    from ..models import full_size_random_models, load_models

    dev = resolve_device(device)
    if compile is None:
        compile = "reduce-overhead" if dev.type == "cuda" else "off"
    budget_bytes = [(b, parse_memory(b)) for b in budgets]  # bad sizes fail before anything runs

    def models_in(dtype):
        if model == "random":
            return full_size_random_models(dev, dtype)
        return load_models(model, device=dev, dtype=dtype, vae=False)

    vgg = random_vgg19().to(dev) if perceptual else None
    rows: list[EncodeTiming] = []
    plans: list[PlanTiming] = []
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {
        "benchmark": "encode", "device": gpu, "torch": torch.__version__, "model": model, "size": size,
        "interval": interval, "rank": rank, "perceptual": perceptual, "iters_timed": iters,
        "iters_timed_published": iters_published, "clip_frames": CLIP_FRAMES, "compile": compile,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "rows": [], "plans": [], "profile_first": {}, "baseline_repeats": max(1, int(baseline_repeats)),
        "baseline_flags": [],
    }
    workload = {k: result[k] for k in ("device", "torch", "model", "size", "interval", "rank", "perceptual",
                                        "iters_timed_published")}
    published = TrainConfig()  # the published iteration counts

    def save():
        for r in rows:
            r.s_per_keyframe = r.ms_per_iteration_segment * published.iters / 1000
            r.s_keyframe0 = r.ms_per_iteration_first * published.iters_first / 1000
            r.s_clip = clip_seconds(r.ms_per_iteration_first, r.ms_per_iteration_segment, interval)
            r.speedup = rows[0].s_per_keyframe / r.s_per_keyframe
            r.speedup_first = rows[0].s_keyframe0 / r.s_keyframe0
        result["rows"] = [asdict(r) for r in rows]
        result["plans"] = [asdict(p) for p in plans]
        if json_path:
            write_json_atomic(json_path, result)

    passes = interval + 2
    for frozen in (False, True):
        log.info("encode bench: published loop%s (%d timed iterations per keyframe kind)",
                 ", frozen weights" if frozen else "", iters_published)
        _peak_reset(dev)
        m = models_in(torch.float32)  # the release keeps fp32 weights under fp16 autocast
        runs = [_time_published(m, vgg, size, interval, rank, iters_published, warmup if i == 0 else min(warmup, 1),
                                dev, frozen) for i in range(result["baseline_repeats"])]
        name = "published, frozen weights" if frozen else "published (as released)"
        row = EncodeTiming(name, passes, history.median([r[0] for r in runs]), history.median([r[1] for r in runs]),
                           _peak_gib(dev), runs_segment=[r[0] for r in runs], runs_first=[r[1] for r in runs])
        rows.append(row)
        if not frozen:  # the row every speed-up is measured against
            for kind, values, value in (("segment", row.runs_segment, row.ms_per_iteration_segment),
                                        ("keyframe 0", row.runs_first, row.ms_per_iteration_first)):
                what = f"{name}, {kind}"
                flags = [history.spread_flag(what, values, "ms/it"),
                         history.check_and_record(what, workload, value, "ms/it")]
                result["baseline_flags"] += [f for f in flags if f]
        del m
        save()
    log.info("encode bench: promptus' batched trainer (%d timed iterations per keyframe kind)", iters)
    _peak_reset(dev)
    m = models_in(torch.float16 if dev.type == "cuda" else torch.float32)
    label = "fp16" if dev.type == "cuda" else "fp32"
    ours = _time_ours(m, vgg, size, interval, rank, iters, warmup, dev)
    rows.append(EncodeTiming(f"promptus (batched, {label})", 1, ours["ms_segment"], ours["ms_first"],
                             max(ours["peak_gib_segment"], ours["peak_gib_first"])))
    save()

    total = torch.cuda.mem_get_info(dev)[1] if dev.type == "cuda" else None
    for name, nbytes in budget_bytes:
        row = PlanTiming(name, nbytes / GIB if isinstance(nbytes, int) else math.nan)
        plans.append(row)
        log.info("encode bench: the trainer under a memory budget of %s", name)
        try:
            if total is not None and isinstance(nbytes, int):
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total), dev.index if dev.index is not None else torch.cuda.current_device())
            got = _time_ours(m, vgg, size, interval, rank, iters, warmup, dev, max_memory=nbytes, kinds=("segment",))
            choice = got["plan"]
            row.plan = choice.plan.short(interval)
            row.estimated_gib = choice.estimate.peak_bytes / GIB
            row.peak_gib, row.reserved_gib = got["peak_gib_segment"], got["reserved_gib_segment"]
            row.ms_per_iteration_segment = got["ms_segment"]
            row.relative_speed = ours["ms_segment"] / got["ms_segment"]
            row.s_clip = clip_seconds(ours["ms_first"], got["ms_segment"], interval)
        except torch.cuda.OutOfMemoryError as e:
            row.status = f"out of memory: {str(e).splitlines()[0][:160]}"
        except PromptusError as e:  # no plan fits: the planner's own message
            row.status = f"no plan fits: {e}"[:300]
        except Exception as e:  # noqa: BLE001 - a budget that fails is reported, not fatal
            log.exception("budget %s failed", name)
            row.status = f"failed: {type(e).__name__}: {e}"[:300]
        finally:
            if total is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, dev.index if dev.index is not None else torch.cuda.current_device())
        save()

    if profile:
        log.info("encode bench: profile of keyframe 0's step")
        try:
            result["profile_first"] = profile_first_step(m, vgg, size, interval, rank, dev)
        except Exception as e:  # noqa: BLE001 - the profile is a diagnostic; the timings stand without it
            log.exception("profiling keyframe 0's step failed")
            result["profile_first"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        save()

    if compile != "off":  # last: compiling takes minutes; each shape is saved as soon as it is timed
        log.info("encode bench: the trainer with its step compiled (%s); compiling takes minutes", compile)
        row = EncodeTiming(f"promptus (compiled {compile}, {label})", 1, math.nan, math.nan, math.nan)
        result["compile_warmup_s"] = {}
        try:
            for kind in ("segment", "first"):
                got = _time_ours(m, vgg, size, interval, rank, iters, warmup, dev, compile=compile, kinds=(kind,))
                if kind == "segment":
                    row.ms_per_iteration_segment = got["ms_segment"]
                    rows.append(row)
                else:
                    row.ms_per_iteration_first = got["ms_first"]
                peak = got[f"peak_gib_{kind}"]
                row.peak_gib = peak if math.isnan(row.peak_gib) else max(row.peak_gib, peak)
                result["compile_warmup_s"][kind] = got[f"warmup_s_{kind}"]
                save()
        except Exception as e:  # noqa: BLE001 - reported, the other rows stand
            log.exception("compiled trainer failed")
            result["compile_error"] = f"{type(e).__name__}: {e}"[:300]
        save()
    del m
    save()
    return result

