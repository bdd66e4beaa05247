"""Many real-time streams on one device: the scheduler measured in-process.

For each stream count N, N streams of one random-prompt clip are opened on one
:class:`~promptus.streaming.scheduler.StreamScheduler` (forced past admission
control, to show what overload does) and their keyframes are released at real
time, exactly as the server paces them (:func:`~promptus.streaming.viewer.release_offset`),
the streams' starts staggered over one interval. After a warm-up second the run
counts, per stream, the frames whose segments became ready, and per segment the
latency from its closing keyframe's release to its frames being on the host.
A segment is late when it is ready after its first frame's display time (frame 0
shown 0.1 s after it is ready, then one frame per 1/fps).

Admission control is evaluated on the same measured capacity: streams are
admitted in real time while their rates fit in ``headroom × capacity``.

A second measurement bounds what batching segments of different streams together
could gain: the segment step's frames/s at batch 10, 20 and 40 (the latter as two
and four streams' segments in one call) with the CUDA-graph torch backend.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import torch

from ..bitstream import Bitstream, Header, InitLatent, Keyframe, ModelIdentity
from ..config import DEFAULT_ENGINE_DIR, CodecConfig, ServerConfig
from ..prompts import quantize_tensor
from .receiver import quantile
from .scheduler import AdmissionError, StreamScheduler
from .viewer import PLAYOUT_DELAY_S, release_offset

log = logging.getLogger(__name__)


def random_clip(config: CodecConfig, keyframes: int, seed: int = 0, identity=None) -> Bitstream:
    """A clip of random prompts (the cost of decoding does not depend on their values)."""
    g = torch.Generator().manual_seed(seed)
    kfs = [Keyframe(k * config.interval, quantize_tensor(torch.randn(config.tokens, config.rank, generator=g)),
                    quantize_tensor(torch.randn(config.rank, config.embed_dim, generator=g)))
           for k in range(keyframes)]
    init = InitLatent.from_array(torch.randn(config.latent_shape, generator=g).numpy(), "fp16")
    return Bitstream(Header(config, (keyframes - 1) * config.interval + 1, identity or ModelIdentity.unknown()),
                     init, kfs)


def run_streams(scheduler: StreamScheduler, clip: Bitstream, n: int, seconds: float, warmup_s: float = 1.0) -> dict:
    """N paced streams for ``seconds`` (forced past admission control); the numbers of the window after ``warmup_s``."""
    handles = [scheduler.open(clip.header, clip.init, force=True) for _ in range(n)]
    return pace_streams(handles, clip, seconds, warmup_s)


def pace_streams(handles: list, clip: Bitstream, seconds: float, warmup_s: float = 1.0) -> dict:
    """Release ``clip``'s keyframes into the open ``handles`` at real time for ``seconds``, closing
    them after; the numbers of the window after ``warmup_s``. A stream was served in real time
    (``streams_realtime``) when it had segments in the window and none of them was late."""
    h = clip.header
    T, fps = h.interval, h.fps
    n = len(handles)
    t_start = time.perf_counter() + 0.05
    stop_at = t_start + seconds
    records: list[list[tuple[float, float, int, int]]] = [[] for _ in range(n)]  # (arrived, ready, start, frames)

    def pace(i: int):
        t0 = t_start + i * (T / fps) / n  # staggered starts
        for p, kf in enumerate(clip.keyframes):
            due = t0 + release_offset(p, 0, T, fps)
            if due > stop_at:
                break
            time.sleep(max(0.0, due - time.perf_counter()))
            handles[i].push(kf)
        handles[i].end()

    def consume(i: int):
        while True:
            seg = handles[i].get()
            if seg is None:
                return
            records[i].append((seg.arrived, seg.ready, seg.start, seg.frames.shape[0]))
            if seg.ready > stop_at + 5.0:  # overloaded far past the window: stop waiting
                handles[i].close()
                return

    threads = [threading.Thread(target=f, args=(i,), daemon=True) for i in range(n) for f in (pace, consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for hd in handles:
        hd.close()

    w0, w1 = t_start + warmup_s, stop_at
    window = w1 - w0
    per_stream, lat, late, segs, realtime = [], [], 0, 0, 0
    for rec in records:
        if not rec:
            per_stream.append(0.0)
            continue
        origin = rec[0][1] + PLAYOUT_DELAY_S  # frame 0 shown shortly after it is ready
        frames = own_segs = own_late = 0
        for arrived, ready, start, k in rec:
            if w0 <= ready <= w1:
                frames += k
            if w0 <= arrived <= w1:
                own_segs += 1
                lat.append(ready - arrived)
                own_late += ready > origin + start / fps
        segs, late = segs + own_segs, late + own_late
        realtime += own_segs > 0 and own_late == 0
        per_stream.append(frames / window)
    return {
        "streams": n,
        "aggregate_fps": sum(per_stream),
        "per_stream_fps_mean": float(np.mean(per_stream)),
        "per_stream_fps_min": float(np.min(per_stream)),
        "latency_ms_median": 1000 * quantile(lat, 0.5),
        "latency_ms_p95": 1000 * quantile(lat, 0.95),
        "late_segments": late / segs if segs else math.nan,
        "streams_realtime": realtime,
        "window_s": window,
    }


def admission_limit(capacity: float, rate: float, headroom: float) -> int:
    """How many streams at ``rate`` admission control lets in at real time."""
    return int(math.floor(headroom * capacity / rate + 1e-9))


def batch_lever(models, device, config: CodecConfig, batches=(10, 20, 40), reps: int = 20) -> dict:
    """Frames/s of the CUDA-graph segment step at each batch (cross-stream batching's upper bound)."""
    from ..backends import make_backend
    from ..schedule import OneStep, make_noise

    out = {}
    onestep = OneStep.at(config.timestep)
    noise = make_noise(config).to(device)
    z = torch.randn(config.latent_shape, device=device)
    for b in batches:
        backend = make_backend("torch", models, device, batch=b, size=config.width)
        c = torch.randn(b, config.tokens, config.embed_dim, device=device)
        for _ in range(3):
            backend.segment(z, noise, config.mix, c, onestep)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            backend.segment(z, noise, config.mix, c, onestep)
        _sync(device)
        out[str(b)] = b * reps / (time.perf_counter() - t0)
    return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench_streams(models, device, *, backend: str = "compile", size: int = 512, interval: int = 10,
                  fps: float = 30.0, counts=(1, 2, 4, 8, 12, 16), seconds: float = 6.0,
                  headroom: float = ServerConfig.headroom, lever: bool = True) -> dict:
    """The whole benchmark: calibration, admission limit, one run per stream count, the batch lever."""
    from .receiver import backend_decoders

    config = CodecConfig(width=size, height=size, fps=fps, interval=interval)
    keyframes = int(math.ceil((seconds + 1) * fps / interval)) + 2
    clip = random_clip(config, keyframes, identity=models.identity())
    decoder_for = backend_decoders(models, backend, device)
    t0 = time.perf_counter()
    decoder = decoder_for(clip.header)
    scheduler = StreamScheduler(decoder_for, headroom=headroom, max_streams=max(counts) + 1)
    capacity = scheduler.calibrate(clip.header, clip.init, clip.keyframes, rounds=6)
    warm = time.perf_counter() - t0
    limit = admission_limit(capacity, fps, headroom)
    result = {
        "device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
        "backend": decoder.backend.describe(), "size": size, "interval": interval, "fps": fps,
        "model": models.name, "torch": torch.__version__, "warmup_s": warm,
        "capacity_fps": capacity, "headroom": headroom, "admitted_realtime": limit,
        "refuses_from_stream": limit + 1, "runs": [],
    }
    log.info("capacity %.0f frames/s; admission takes %d streams at %g fps", capacity, limit, fps)
    with scheduler:
        for n in counts:
            r = run_streams(scheduler, clip, n, seconds)
            r["admitted"] = n <= limit
            result["runs"].append(r)
            log.info("%d streams: %.0f fps aggregate", n, r["aggregate_fps"])
    result["capacity_fps_end"] = scheduler.capacity
    if lever and torch.device(device).type == "cuda":
        result["batch_lever_fps"] = batch_lever(models, device, config)
    return result


def bench_stream_devices(devices, models, *, backend: str = "torch", size: int = 512, interval: int = 10,
                         fps: float = 30.0, seconds: float = 6.0, headroom: float = ServerConfig.headroom,
                         max_streams: int = ServerConfig.max_clients, engine_dir: str = DEFAULT_ENGINE_DIR) -> dict:
    """Real-time streams admitted and served by one server's decoders on ``devices`` together.

    ``models`` is copied to every device (:func:`~promptus.streaming.devices.replicate_models`);
    each device gets its own :class:`StreamScheduler` in a
    :class:`~promptus.streaming.devices.SchedulerPool`, exactly as ``promptus serve --devices``
    builds it, with ``backend`` on every device (default torch: CUDA graphs, nothing loaded
    from the artifact cache). Every device is calibrated on a clip of random prompts; then
    streams at ``fps`` are opened through the pool's admission control (least loaded device
    first) until it refuses one, or ``max_streams`` are open; those streams run paced at real
    time for ``seconds`` (:func:`pace_streams`; the first second is warm-up).

    Returns a dict with the keys:

    * ``devices`` — the device names, in order; ``backend``, ``size``, ``interval``, ``fps``,
      ``headroom``, ``seconds``, ``model``, ``torch``: the settings;
    * ``warmup_s`` — seconds to replicate the models and calibrate every device;
    * ``capacity_fps`` — frames/s of all devices together, as calibrated;
    * ``per_device`` — one dict per device: ``device``, ``capacity_fps``, ``admitted`` (streams
      placed on it), ``capacity_fps_end`` (its measurement after the run);
    * ``admitted_realtime`` — streams admission control let in at ``fps`` (``limited`` is True
      when ``max_streams`` stopped it before a refusal);
    * ``served_realtime`` — of those, streams with no late segment in the measured window;
    * ``aggregate_fps``, ``per_stream_fps_mean``, ``per_stream_fps_min`` — frames/s delivered;
    * ``latency_ms_median``, ``latency_ms_p95`` — closing keyframe's release to frames on the
      host, over every segment of the window; ``late_segments`` (fraction), ``window_s``.
    """
    from .devices import scheduler_pool

    devices = [torch.device(d) for d in devices]
    config = CodecConfig(width=size, height=size, fps=fps, interval=interval)
    keyframes = int(math.ceil((seconds + 1) * fps / interval)) + 2
    clip = random_clip(config, keyframes, identity=models.identity())
    t0 = time.perf_counter()
    pool = scheduler_pool(models, devices, backend=backend, engine_dir=engine_dir, headroom=headroom,
                          max_streams=max_streams)
    capacity = pool.calibrate(clip.header, clip.init, clip.keyframes, rounds=6)
    warm = time.perf_counter() - t0
    calibrated = [s.capacity for s in pool.schedulers]
    handles, limited = [], True
    with pool:
        try:
            while len(handles) < max_streams:
                handles.append(pool.open(clip.header, clip.init))
        except AdmissionError:
            limited = False
        placed = [h.admission.device for h in handles]
        log.info("%d devices, %.0f frames/s: admission takes %d streams at %g fps", len(devices), capacity,
                 len(handles), fps)
        if handles:
            run = pace_streams(handles, clip, seconds)
        else:
            run = {"aggregate_fps": 0.0, "per_stream_fps_mean": math.nan, "per_stream_fps_min": math.nan,
                   "latency_ms_median": math.nan, "latency_ms_p95": math.nan, "late_segments": math.nan,
                   "streams_realtime": 0, "window_s": 0.0}
    return {
        "devices": [str(d) for d in devices], "backend": pool.schedulers[0].decoder_for(clip.header).backend.describe(),
        "size": size, "interval": interval, "fps": fps, "headroom": headroom, "seconds": seconds,
        "model": models.name, "torch": torch.__version__, "warmup_s": warm, "capacity_fps": capacity,
        "per_device": [{"device": str(d), "capacity_fps": cap, "admitted": placed.count(i),
                        "capacity_fps_end": s.capacity}
                       for i, (d, cap, s) in enumerate(zip(devices, calibrated, pool.schedulers))],
        "admitted_realtime": len(handles), "limited": limited,
        "served_realtime": run["streams_realtime"],
        **{k: run[k] for k in ("aggregate_fps", "per_stream_fps_mean", "per_stream_fps_min", "latency_ms_median",
                               "latency_ms_p95", "late_segments", "window_s")},
    }


def format_table(result: dict) -> str:
    """The benchmark as a plain-text table."""
    lines = [
        f"{result['device']}, {result['backend']}, {result['size']}², interval {result['interval']}, "
        f"{result['fps']:g}-fps streams; capacity {result['capacity_fps']:.0f} frames/s measured by the scheduler; "
        f"admission takes {result['admitted_realtime']} streams in real time "
        f"(headroom {result['headroom']:.0%}), refuses from stream {result['refuses_from_stream']}",
        "",
        f"{'streams':>7} {'admitted':>8} {'aggregate fps':>13} {'per-stream fps':>15} {'min':>6} "
        f"{'latency ms p50':>14} {'p95':>8} {'late':>6}",
    ]
    for r in result["runs"]:
        lines.append(f"{r['streams']:>7} {'yes' if r['admitted'] else 'no':>8} {r['aggregate_fps']:>13.0f} "
                     f"{r['per_stream_fps_mean']:>15.1f} {r['per_stream_fps_min']:>6.1f} "
                     f"{r['latency_ms_median']:>14.1f} {r['latency_ms_p95']:>8.1f} {100 * r['late_segments']:>5.0f}%")
    if "batch_lever_fps" in result:
        lever = ", ".join(f"batch {b}: {v:.0f}" for b, v in result["batch_lever_fps"].items())
        lines += ["", f"segment step frames/s (torch backend, CUDA graphs) — {lever}"]
    return "\n".join(lines)


def format_devices_table(results: list[dict]) -> str:
    """:func:`bench_stream_devices` results (one per device list) as a plain-text table."""
    if not results:
        return "no results"
    r0 = results[0]
    lines = [f"{r0['backend']}, {r0['size']}², interval {r0['interval']}, {r0['fps']:g}-fps streams, "
             f"headroom {r0['headroom']:.0%}",
             "",
             f"{'devices':>7} {'capacity fps':>12} {'admitted':>8} {'served':>6} {'aggregate fps':>13} "
             f"{'latency ms p50':>14} {'p95':>8} {'late':>6}  per device (capacity/admitted)"]
    for r in results:
        per = ", ".join(f"{d['device']} {d['capacity_fps']:.0f}/{d['admitted']}" for d in r["per_device"])
        late = "-" if math.isnan(r["late_segments"]) else f"{100 * r['late_segments']:.0f}%"
        lines.append(f"{len(r['devices']):>7} {r['capacity_fps']:>12.0f} {r['admitted_realtime']:>8}"
                     f"{'+' if r['limited'] else ' '}{r['served_realtime']:>6} {r['aggregate_fps']:>13.0f} "
                     f"{r['latency_ms_median']:>14.1f} {r['latency_ms_p95']:>8.1f} {late:>6}  {per}")
    if any(r["limited"] for r in results):
        lines.append("+: stopped at --max-streams before admission control refused a stream")
    return "\n".join(lines)
