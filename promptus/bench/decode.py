"""``promptus bench`` (decode): per-stage times, end-to-end FPS, peak memory, parity and MFU per backend."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import CodecConfig
from ..files import write_json_atomic
from .clips import random_bitstream
from .common import models_for_bench as _models_for_bench, peak_gib as _peak_gib, peak_reset as _peak_reset
from .common import sync as _sync, time_call as _time
from .starts import measure_start

log = logging.getLogger(__name__)


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
    fps_gpu_runs: list = field(default_factory=list)  # the timed end-to-end runs; fps_gpu is their median
    fps_host_runs: list = field(default_factory=list)



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



def bench_decode(model: str = "random", device: str | None = None, size: int = CodecConfig.width,
                 batch: int = CodecConfig.interval,
                 backends=None, keyframes: int = 31, reps: int = 10,
                 json_path: str | None = None, starts=True, engine_dir: str | None = None,
                 baseline_repeats: int = 3) -> dict:
    """Per-stage times, end-to-end FPS (GPU-resident and to host), peak memory, parity and MFU per backend,
    and its cold and warm start (:func:`measure_start`: a fresh process with a new, empty engine folder,
    then another fresh process with the folder the first one filled) for every backend when ``starts``
    is true, for those it names when it is a collection of names, else for none. ``backends``: names
    from the backend registry (default: those it marks for benchmarking on this device); one that
    cannot run here gets the row "unavailable: why". ``batch`` is capped by MAX_BATCH_PIXELS at
    ``size`` (:meth:`CodecConfig.segment_batch`), as a decoder caps it.

    Returns the results (and writes them as JSON after every backend); ``psnr_vs_fp32``
    is the PSNR of the clip's mean MSE (:func:`promptus.metrics.clip_psnr`). The in-process
    timings use the engine folder of the start measurements (else ``engine_dir``, else a
    temporary one), so the compile backend is not compiled a second time. Each end-to-end
    figure is the median of ``baseline_repeats`` timed runs; the eager baseline's spread, or a
    median far off this machine's earlier runs, is flagged (:mod:`promptus.bench.history`,
    ``result["baseline_flags"]``).
    """
    import tempfile

    from . import history

    from ..backends import BASELINE, backend_entry, bench_defaults, make_backend, resolve_device
    from ..backends.compile_cache import device_identity
    from ..decoder import Decoder
    from ..metrics import clip_psnr
    from ..pipeline import PipelinedDecoder
    from ..schedule import OneStep

    dev = resolve_device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    backends = list(bench_defaults(dev.type) if backends is None else backends)
    entries = {name: backend_entry(name) for name in backends}  # an unknown name fails before any work
    cfg = CodecConfig(width=size, height=size, interval=batch)
    if cfg.segment_batch() < batch:
        log.info("decode bench: batch %d at %d px exceeds MAX_BATCH_PIXELS; timing batches of %d as a decoder would",
                 batch, size, cfg.segment_batch())
        batch = cfg.segment_batch()
    tmp_engines = tempfile.TemporaryDirectory(prefix="promptus-bench-engines-")
    engine_dir = engine_dir or tmp_engines.name
    starts_dir = {}
    if starts:  # first, while no model occupies this process's GPU memory
        for name in backends:
            if not entries[name].available(dev)[0] or (starts is not True and name not in starts):
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
    reference = Decoder(make_backend(BASELINE, models, dev, torch.float32, batch=batch, size=size)).decode_all(short_clip)
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
        "baseline_repeats": max(1, int(baseline_repeats)), "baseline_flags": [],
    }
    workload = {k: result[k] for k in ("device", "torch", "model", "size", "batch", "dtype", "frames_timed")}
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
        ok, why = entries[name].available(dev)
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
            if getattr(backend, "stages_compiled", True):  # compile and aoti: whole segments only
                row.unet_ms = _time(lambda: backend.denoise(z, cfg.timestep, ctx), dev, reps)
                row.decoder_ms = _time(lambda: backend.decode(z), dev, reps)
            row.segment_ms = _time(lambda: backend.segment(zp, zp, cfg.mix, ctx, onestep), dev, reps)
            for to_host in (False, True):
                log.info("%s: end to end, %d frames %s", name, long_clip.header.frame_count,
                         "copied to the host" if to_host else "left on the device")
                PipelinedDecoder(dec, to_host=to_host).run(items[:4])  # warm the copy path
                runs = []
                for _ in range(result["baseline_repeats"]):
                    _sync(dev)
                    t0 = time.perf_counter()
                    n = PipelinedDecoder(dec, to_host=to_host).run(items)
                    _sync(dev)
                    runs.append(n / (time.perf_counter() - t0))
                if to_host:
                    row.fps_host, row.fps_host_runs = history.median(runs), runs
                else:
                    row.fps_gpu, row.fps_gpu_runs = history.median(runs), runs
            if name == BASELINE:  # the row every speed-up is measured against
                what = f"{name}, end to end on the device"
                flags = [history.spread_flag(what, row.fps_gpu_runs, "frames/s"),
                         history.check_and_record(what, workload, row.fps_gpu, "frames/s", lower_is_faster=False)]
                result["baseline_flags"] += [f for f in flags if f]
            row.peak_gib = _peak_gib(dev)
            row.mfu = row.fps_gpu / batch * (unet_flops + dec_flops) / ceiling
            del backend, dec
        except Exception as e:  # noqa: BLE001 - a backend that fails is reported, not fatal
            log.exception("backend %s failed", name)
            row.status = f"failed: {type(e).__name__}: {e}"[:300]
        result["rows"] = [asdict(r) for r in rows]
        if json_path:  # after every backend, so a time-out still leaves the rows measured so far
            write_json_atomic(json_path, result)
    base = next((r for r in rows if r.backend == BASELINE and r.status == "ok"), None)
    for r in rows:
        if base is not None and r.status == "ok":
            r.speedup = r.fps_gpu / base.fps_gpu
    result["rows"] = [asdict(r) for r in rows]
    if json_path:
        write_json_atomic(json_path, result)
    tmp_engines.cleanup()
    return result

