"""Benchmarks: results as data (and JSON), ratios measured in one process; ``promptus bench`` prints the tables.

``promptus bench --encode`` times the inversion trainer on the full-size
architecture (random weights unless real ones are given) against the published
procedure, emulated in the same process on the same GPU:

* ``published``: the release's loop (docs/design.md, "The method"; inversion.py of the public
  release): every frame of a segment is its own batch-1 forward and backward pass
  under fp16 autocast with fp32 weights, followed by its own Adam step; the worst
  frame is trained twice more per iteration (T + 2 passes); the UNet and TAESD
  weights keep ``requires_grad`` as released, so every backward also computes
  weight gradients; VGG features of the real frame are recomputed every pass and
  the loss is read back to the host every pass (the release prints it). Disk I/O of
  the release (re-reading the frame PNG every pass, a PNG every 10 iterations, a
  checkpoint on every improvement) is left out, which favours the published side.
* ``published, frozen``: the same loop with frozen weights, to show how much of the
  gain is batching rather than skipping weight gradients.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import CodecConfig, TrainConfig
from .files import write_json_atomic

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

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def _targets(size: int, n: int, device) -> torch.Tensor:
    from .schedule import to_model_range
    from .video import sky_clip

    return to_model_range(torch.from_numpy(sky_clip(n, size))).to(device)


def _published_iteration(models, vgg, U, V, ranges, opt, z, targets, prev, onestep, interval, steps):
    """One iteration of the release's loop: one batch-1 pass and Adam step per entry of ``steps``."""
    from .prompts import embedding, fake_quantize

    device = z.device
    t = torch.tensor([onestep.timestep], device=device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    for s in steps:
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            ranges[0].update(U)
            ranges[1].update(V)
            Qu, Qv = fake_quantize(U, *ranges[0].params()), fake_quantize(V, *ranges[1].params())
            if prev is None:
                c = embedding(Qu, Qv)[None]
                gt = targets[:1]
            else:
                w = s / interval
                c = embedding((1 - w) * prev[0] + w * Qu, (1 - w) * prev[1] + w * Qv)[None]
                gt = targets[s - 1:s]
            eps = models.unet(z, t, encoder_hidden_states=c).sample
            x = models.taesd.decoder(onestep.x0(z, eps))
            perc = 0.0  # --perceptual off
            if vgg is not None:
                feats = vgg(((torch.cat([gt, x]) + 1) / 2 - mean) / std)
                perc = sum(torch.nn.functional.mse_loss(f[1:].float(), f[:1].float()) for f in feats) / len(feats)
            loss = 0.2 * perc + 0.8 * torch.nn.functional.mse_loss(x.float(), gt) + 0.1 * c.abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        models.unet.zero_grad()
        models.taesd.zero_grad()
        # The release prints loss, c.max(), c.mean() and c.std() after every pass.
        _ = (loss.item(), c.max().item(), c.mean().item(), c.std().item())


def _time_published(models, vgg, size, interval, rank, iters, warmup, device, frozen: bool) -> tuple[float, float]:
    from .prompts import RunningRange
    from .schedule import OneStep, make_noise

    models.unet.requires_grad_(not frozen)
    models.taesd.requires_grad_(not frozen)
    cfg = CodecConfig(width=size, height=size, rank=rank, interval=interval)
    onestep = OneStep.at(cfg.timestep)
    z = make_noise(cfg).to(device)
    targets = _targets(size, interval, device)
    g = torch.Generator().manual_seed(0)
    prev = (torch.rand(cfg.tokens, rank, generator=g).to(device), torch.rand(rank, cfg.embed_dim, generator=g).to(device))
    out = []
    for first in (False, True):
        U = torch.rand(cfg.tokens, rank, generator=g).to(device).requires_grad_()
        V = torch.rand(rank, cfg.embed_dim, generator=g).to(device).requires_grad_()
        opt = torch.optim.Adam([U, V], lr=TrainConfig.lr)
        ranges = (RunningRange(), RunningRange())
        # T frames plus the worst frame twice more, as the release's step_list.
        steps = [0] if first else sorted(list(range(1, interval + 1)) + [interval] * 2)
        args = (models, vgg, U, V, ranges, opt, z, targets, None if first else prev, onestep, interval, steps)
        for _ in range(warmup):
            _published_iteration(*args)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            _published_iteration(*args)
        _sync(device)
        out.append(1000 * (time.perf_counter() - t0) / iters)
    models.unet.requires_grad_(False)
    models.taesd.requires_grad_(False)
    return out[0], out[1]


def _time_ours(models, vgg, size, interval, rank, iters, warmup, device, *, max_memory="none", compile="off",
               kinds=("segment", "first")) -> dict:
    """ms per iteration of a later keyframe (and of keyframe 0), peak memory, and the plan chosen for a segment.

    One encoder serves the warm-up and the timed run, so that a compiled step compiles once per shape.
    """
    from .bitstream import Keyframe
    from .encoder import Encoder
    from .prompts import quantize_tensor
    from .schedule import OneStep, make_noise

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

    from .encoder import Encoder
    from .schedule import OneStep, make_noise

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
                 profile: bool = True) -> dict:
    """Time the published per-frame procedure and ours in one process; return the results (and write them as JSON).

    ``budgets``: memory budgets (sizes as ``--max-memory`` takes them) to run the trainer
    under; ``compile``: the torch.compile mode of the compiled-trainer row ("off" leaves it
    out; default: reduce-overhead on CUDA, off on the CPU, where inductor takes minutes).
    The JSON is rewritten after every part, so that a run cut short keeps what it measured.
    """
    import os

    from .backends import resolve_device
    from .errors import PromptusError
    from .losses import random_vgg19
    from .memory import GIB, parse_memory
    from .models import full_size_random_models, load_models

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
        "rows": [], "plans": [], "profile_first": {},
    }
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
        seg, first = _time_published(m, vgg, size, interval, rank, iters_published, warmup, dev, frozen)
        rows.append(EncodeTiming("published, frozen weights" if frozen else "published (as released)",
                                 passes, seg, first, _peak_gib(dev)))
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


# ------------------------------------------------------------------------ decode


@dataclass
class DecodeRow:
    backend: str
    status: str = "ok"
    unet_ms: float = math.nan  # one batch
    decoder_ms: float = math.nan
    segment_ms: float = math.nan  # mix → UNet → x0 → decoder → uint8
    fps_gpu: float = math.nan  # end to end, frames left on the GPU
    fps_host: float = math.nan  # end to end, frames copied to host memory
    peak_gib: float = math.nan
    psnr_vs_fp32: float = math.nan
    mfu: float = math.nan  # achieved FLOP/s over the measured matmul ceiling
    speedup: float = math.nan  # fps_gpu over the eager baseline (NaN when eager is not in the run)
    cold_start_s: float = math.nan  # fresh process, empty caches: backend made and a 21-frame clip decoded
    warm_start_s: float = math.nan  # the same in another fresh process, with the engine folder of the cold one
    start_detail: dict | None = None  # per start: how the backend got ready, model load and process times


def random_bitstream(config, keyframes: int, seed: int = 0, identity=None):
    """A bitstream of random prompts for timing (no encoder needed)."""
    from .bitstream import Bitstream, Header, InitLatent, Keyframe, ModelIdentity
    from .prompts import quantize_tensor

    g = torch.Generator().manual_seed(seed)
    kfs = [Keyframe(k * config.interval, quantize_tensor(torch.randn(config.tokens, config.rank, generator=g)),
                    quantize_tensor(torch.randn(config.rank, config.embed_dim, generator=g)))
           for k in range(keyframes)]
    init = InitLatent.from_array(torch.randn(config.latent_shape, generator=g).numpy(), "fp16")
    header = Header(config, (keyframes - 1) * config.interval + 1, identity or ModelIdentity.unknown())
    return Bitstream(header, init, kfs)


def model_flops(models, batch: int, size: int, device) -> tuple[float, float]:
    """FLOPs of one UNet and one TAESD-decoder forward at ``batch``, counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = CodecConfig(width=size, height=size)
    h = size // cfg.latent_factor
    z = torch.zeros(batch, cfg.latent_channels, h, h, device=device, dtype=models.unet.dtype)
    c = torch.zeros(batch, cfg.tokens, cfg.embed_dim, device=device, dtype=models.unet.dtype)
    t = torch.full((batch,), cfg.timestep, device=device)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            models.unet(z, t, encoder_hidden_states=c)
        unet = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            models.taesd.decoder(z)
        dec = fc.get_total_flops()
    return float(unet), float(dec)


def matmul_ceiling(device, n: int = 8192, reps: int = 10) -> float:
    """Measured fp16 matrix-multiply throughput in FLOP/s (n×n×n products)."""
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _time(fn, device, reps: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / reps


def _models_for_bench(model: str, dev: torch.device):
    from .models import full_size_random_models, load_models

    return (full_size_random_models(dev, torch.float32) if model == "random"
            else load_models(model, device=dev, dtype=torch.float32, vae=False))


def start_child(params: dict) -> None:
    """One start measurement in this (fresh) process; writes its result as JSON to ``params["out"]``.

    Run by :func:`measure_start` as ``python -c``; the clock starts before the models load.
    """
    t_process = time.perf_counter()
    from .backends import make_backend, resolve_device
    from .decoder import Decoder

    dev = resolve_device(params["device"])
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    batch, size = params["batch"], params["size"]
    t0 = time.perf_counter()
    models = _models_for_bench(params["model"], dev).to(dev, dtype)  # as bench_decode: same weights, same digest
    _sync(dev)
    models_s = time.perf_counter() - t0
    clip = random_bitstream(CodecConfig(width=size, height=size, interval=batch), 3, seed=1)
    t0 = time.perf_counter()
    backend = make_backend(params["backend"], models, dev, dtype, batch=batch, size=size,
                           engine_dir=params["engine_dir"])
    Decoder(backend).decode_all(clip)
    _sync(dev)
    ready = time.perf_counter() - t0
    prepared = getattr(backend, "prepared", None)
    write_json_atomic(params["out"], {
        "ready_s": ready, "models_s": models_s, "process_s": time.perf_counter() - t_process,
        "how": getattr(prepared, "how", None), "mechanism": getattr(getattr(prepared, "key", None), "mechanism", None),
    })


def measure_start(backend: str, *, model: str, device: str, batch: int, size: int, engine_dir: str,
                  timeout: float = 900.0) -> dict:
    """Start ``backend`` in a fresh Python process: its models loaded, the backend made (``engine_dir`` as its
    engine folder) and a 21-frame clip decoded. inductor's and Triton's own caches are new and empty, so that
    only ``engine_dir`` can help. Returns ``ready_s`` (backend + first clip, the start-up that the engine
    folder shortens), ``models_s``, ``process_s`` and how the backend got ready; or ``error``."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="promptus-start-") as tmp:
        out = str(Path(tmp) / "start.json")
        params = {"backend": backend, "model": model, "device": device, "batch": batch, "size": size,
                  "engine_dir": engine_dir, "out": out}
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"),
                   TRITON_CACHE_DIR=str(Path(tmp) / "triton"))
        code = "import json, sys; from promptus.bench import start_child; start_child(json.loads(sys.argv[1]))"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(params)], env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not Path(out).exists():
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)[-400:]}
        result = json.loads(Path(out).read_text())
        result["wall_s"] = wall
        return result


def bench_decode(model: str = "random", device: str | None = None, size: int = CodecConfig.width,
                 batch: int = CodecConfig.interval,
                 backends=("eager", "torch", "compile", "tensorrt"), keyframes: int = 31, reps: int = 10,
                 json_path: str | None = None, starts=True, engine_dir: str | None = None) -> dict:
    """Per-stage times, end-to-end FPS (GPU-resident and to host), peak memory, parity and MFU per backend,
    and its cold and warm start (:func:`measure_start`: a fresh process with a new, empty engine folder,
    then another fresh process with the folder the first one filled) for every backend when ``starts``
    is true, for those it names when it is a collection of names, else for none.

    Returns the results (and writes them as JSON after every backend); ``psnr_vs_fp32``
    is the PSNR of the clip's mean MSE (:func:`promptus.metrics.clip_psnr`). The in-process
    timings use the engine folder of the start measurements (else ``engine_dir``, else a
    temporary one), so the compile backend is not compiled a second time.
    """
    import tempfile

    from .backends import make_backend, resolve_device, tensorrt_status
    from .backends.compile_cache import device_identity
    from .decoder import Decoder
    from .metrics import clip_psnr
    from .pipeline import PipelinedDecoder
    from .schedule import OneStep

    dev = resolve_device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    cfg = CodecConfig(width=size, height=size, interval=batch)
    tmp_engines = tempfile.TemporaryDirectory(prefix="promptus-bench-engines-")
    engine_dir = engine_dir or tmp_engines.name
    starts_dir = {}
    if starts:  # first, while no model occupies this process's GPU memory
        for name in backends:
            if (name == "tensorrt" and not tensorrt_status(dev)[0]) or (starts is not True and name not in starts):
                continue
            starts_dir[name] = str(Path(tmp_engines.name) / f"start-{name}")
            log.info("bench: %s cold start (fresh process, empty caches)", name)
            cold = measure_start(name, model=model, device=str(dev), batch=batch, size=size,
                                 engine_dir=starts_dir[name])
            log.info("bench: %s warm start (fresh process, engine folder of the cold start)", name)
            warm = measure_start(name, model=model, device=str(dev), batch=batch, size=size,
                                 engine_dir=starts_dir[name])
            starts_dir[name] = (starts_dir[name], cold, warm)
    models = _models_for_bench(model, dev)
    long_clip = random_bitstream(cfg, keyframes)
    short_clip = random_bitstream(cfg, 3, seed=1)
    log.info("decode bench: fp32 reference of a %d-frame clip (%s, %d px, batch %d)", short_clip.header.frame_count,
             models.name, size, batch)
    reference = Decoder(make_backend("eager", models, dev, torch.float32, batch=batch, size=size)).decode_all(short_clip)
    models.to(dev, dtype)
    unet_flops, dec_flops = model_flops(models, batch, size, dev)
    ceiling = matmul_ceiling(dev) if dev.type == "cuda" else math.nan
    result = {
        "benchmark": "decode", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": model, "size": size, "batch": batch, "dtype": str(dtype),
        "frames_timed": long_clip.header.frame_count, "unet_tflop_per_batch": unet_flops / 1e12,
        "decoder_tflop_per_batch": dec_flops / 1e12, "matmul_ceiling_tflops": ceiling / 1e12,
        "arithmetic_limit_fps": batch * ceiling / (unet_flops + dec_flops),
        "gpu": device_identity(dev)[0], "compute_capability": device_identity(dev)[1], "rows": [],
    }
    onestep = OneStep.at(cfg.timestep)
    h = size // cfg.latent_factor
    z = torch.randn(batch, cfg.latent_channels, h, h, device=dev)
    zp = torch.randn(1, cfg.latent_channels, h, h, device=dev)
    ctx = torch.randn(batch, cfg.tokens, cfg.embed_dim, device=dev)
    items = [long_clip.header, long_clip.init, *long_clip.keyframes]
    rows = []
    for name in backends:
        row = DecodeRow(name)
        rows.append(row)
        if name == "tensorrt":
            ok, why = tensorrt_status(dev)
            if not ok:
                row.status = f"unavailable: {why}"
                continue
        own_dir = engine_dir
        if name in starts_dir:
            own_dir, cold, warm = starts_dir[name]
            row.cold_start_s = cold.get("ready_s", math.nan)
            row.warm_start_s = warm.get("ready_s", math.nan)
            row.start_detail = {"cold": cold, "warm": warm}
        try:
            log.info("%s: preparing (backend %d of %d)", name, len(rows), len(backends))
            _peak_reset(dev)
            t0 = time.perf_counter()
            backend = make_backend(name, models, dev, dtype, batch=batch, size=size, engine_dir=own_dir)
            dec = Decoder(backend)
            frames = dec.decode_all(short_clip)  # also warms up: graphs captured, kernels compiled
            log.info("%s: ready in %.1f s", name, time.perf_counter() - t0)
            row.psnr_vs_fp32 = clip_psnr(reference, frames)
            log.info("%s: timing UNet, TAESD and the segment step (%d runs each)", name, reps)
            if getattr(backend, "stages_compiled", True):  # the compile backend compiles whole segments only
                row.unet_ms = _time(lambda: backend.denoise(z, cfg.timestep, ctx), dev, reps)
                row.decoder_ms = _time(lambda: backend.decode(z), dev, reps)
            row.segment_ms = _time(lambda: backend.segment(zp, zp, 0.05, ctx, onestep), dev, reps)
            for to_host in (False, True):
                log.info("%s: end to end, %d frames %s", name, long_clip.header.frame_count,
                         "copied to the host" if to_host else "left on the device")
                PipelinedDecoder(dec, to_host=to_host).run(items[:4])  # warm the copy path
                _sync(dev)
                t0 = time.perf_counter()
                n = PipelinedDecoder(dec, to_host=to_host).run(items)
                _sync(dev)
                fps = n / (time.perf_counter() - t0)
                if to_host:
                    row.fps_host = fps
                else:
                    row.fps_gpu = fps
            row.peak_gib = _peak_gib(dev)
            row.mfu = row.fps_gpu / batch * (unet_flops + dec_flops) / ceiling
            del backend, dec
        except Exception as e:  # noqa: BLE001 - a backend that fails is reported, not fatal
            log.exception("backend %s failed", name)
            row.status = f"failed: {type(e).__name__}: {e}"[:300]
        result["rows"] = [asdict(r) for r in rows]
        if json_path:  # after every backend, so a time-out still leaves the rows measured so far
            write_json_atomic(json_path, result)
    base = next((r for r in rows if r.backend == "eager" and r.status == "ok"), None)
    for r in rows:
        if base is not None and r.status == "ok":
            r.speedup = r.fps_gpu / base.fps_gpu
    result["rows"] = [asdict(r) for r in rows]
    if json_path:
        write_json_atomic(json_path, result)
    tmp_engines.cleanup()
    return result
