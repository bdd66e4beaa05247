"""1 vs N devices in one run: one clip's encode, a sweep, and real-time streams (docs/many-gpus.md).

    python scripts/scale_bench.py --model random --size 512            # every GPU of the machine
    python scripts/scale_bench.py --model tiny --size 32 --devices cpu,cpu ...   # the CPU test's size

(a) **encode**: one clip of ``3·interval + 1`` random frames encoded on the first device,
    then on all of them (``Encoder(devices=...)``, the frames of each segment spread over
    one process per device). Keyframe 1 warms up; ms/iteration of a segment is the mean
    of keyframes 2 and 3 (their seconds include the closed loop's regeneration), ms/iteration
    of keyframe 0 (one frame, always on the first device: the serial part) from keyframe 0.
    A 141-frame clip's time at the published iterations (10 000 + 1 500 per segment) is
    projected from both, with keyframe 0's share of it.
(b) **sweep**: ``--sweep-points`` promptus points (ranks × intervals ``interval/2`` and ``interval``)
    of one clip, run in
    order in this process (one device), then on Ray actors, one per device (``sweep --ray``);
    wall time, points per hour, and each point's seconds outside training as the point's
    worker reported them. Needs Ray for N > 1 (else reported as not measured).
(c) **streams**: 30-fps streams admitted and served in real time with p95 latency, by one
    device's scheduler and (with ``bench_stream_devices`` of promptus.streaming.bench,
    the multi-device server) by all devices' schedulers together.

With one device only the N = 1 column is measured. Prints a table and writes JSON
(``--json``, default ``benchmarks/scale_<device>.json``). Every timing is wall-clock on
the named devices; nothing is extrapolated except the 141-frame projection.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("scale_bench")


def _sync(devices) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def device_name(d: torch.device) -> str:
    return torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------------- (a) encode


def bench_encode(args, devices, models, vgg) -> dict:
    from promptus.bench.encode import CLIP_FRAMES, clip_seconds
    from promptus.config import CodecConfig, TrainConfig
    from promptus.distributed import ModelSource
    from promptus.encoder import Encoder

    codec = CodecConfig(width=args.size, height=args.size, rank=args.rank, interval=args.interval)
    train = TrainConfig(iters_first=args.iters_first, iters=args.iters, perceptual=vgg is not None,
                        init_latent="taesd", compile=args.compile_step, max_memory=args.max_memory)
    frames = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (3 * args.interval + 1, args.size, args.size, 3),
                                                               dtype=np.uint8))
    published = TrainConfig()
    out = {"frames": int(frames.shape[0]), "iters_first": args.iters_first, "iters": args.iters,
           "perceptual": vgg is not None, "compile": args.compile_step, "columns": {}}
    for n in _columns(devices):
        use = devices[:n]
        enc = Encoder(codec, train, models, device=use[0], vgg=vgg, progress=False,
                      devices=use if n > 1 else None,
                      worker_models=ModelSource(args.model, vae=False) if n > 1 else None)
        with tempfile.TemporaryDirectory() as tmp:
            _sync(use)
            t0 = time.perf_counter()
            res = enc.encode(frames, Path(tmp) / "clip.promptus")
            _sync(use)
            wall = time.perf_counter() - t0
        kf = res.keyframes
        ms_first = 1000 * kf[0].seconds / kf[0].iterations
        ms_segment = 1000 * (kf[2].seconds + kf[3].seconds) / (kf[2].iterations + kf[3].iterations)
        projected = clip_seconds(ms_first, ms_segment, args.interval)
        serial = ms_first * published.iters_first / 1000
        out["columns"][str(n)] = {
            "devices": [str(d) for d in use], "wall_s": wall, "ms_per_iteration_first": ms_first,
            "ms_per_iteration_segment": ms_segment, "segment_seconds": [k.seconds for k in kf],
            "projected_clip_s": projected, "clip_frames": CLIP_FRAMES, "serial_share": serial / projected,
        }
        log.info("encode on %d device(s): %.1f ms/iteration per segment, %.1f ms for keyframe 0; %d-frame clip "
                 "%.1f min", n, ms_segment, ms_first, CLIP_FRAMES, projected / 60)
    return out


# ------------------------------------------------------------------------------------ (b) sweep


def bench_sweep(args, devices, work: Path) -> dict:
    from promptus.config import CodecConfig, TrainConfig
    from promptus.errors import PromptusError
    from promptus.sweep import SweepConfig, run_sweep
    from promptus.video import sky_clip, write_frames

    clip = work / "sweep_clip"
    if not clip.exists():
        write_frames(sky_clip(args.sweep_frames, args.sweep_size), clip, 30)
    ranks = [2, 4, 8, 16, 32, 64][:max(1, math.ceil(args.sweep_points / 2))]
    intervals = sorted({max(1, args.interval // 2), args.interval}) if args.sweep_points > 1 else [args.interval]
    common = dict(clips=[str(clip)], ranks=ranks, intervals=intervals, baselines=[], model=args.model,
                  codec=CodecConfig(width=args.sweep_size, height=args.sweep_size),
                  train=TrainConfig(iters_first=args.sweep_iters_first, iters=args.sweep_iters, perceptual=False,
                                    init_latent="taesd"),
                  progress=False, lpips="off", threads=args.threads)
    out = {"points": len(ranks) * len(intervals), "ranks": ranks, "intervals": intervals,
           "frames": args.sweep_frames, "size": args.sweep_size, "iters_first": args.sweep_iters_first,
           "iters": args.sweep_iters, "perceptual": False, "columns": {}}
    for n in _columns(devices):
        folder = work / f"sweep_{n}"
        try:
            if n == 1:
                cfg = SweepConfig(out=str(folder), device=str(devices[0]), **common)
                t0 = time.perf_counter()
                res = run_sweep(cfg)
            else:
                import ray

                ray.init(num_gpus=n if devices[0].type == "cuda" else None, num_cpus=n if devices[0].type == "cpu"
                         else None, include_dashboard=False, log_to_driver=False)
                try:
                    t0 = time.perf_counter()
                    res = run_sweep(SweepConfig(out=str(folder), ray=True, **common))
                finally:
                    ray.shutdown()
        except (PromptusError, ImportError) as e:
            out["columns"][str(n)] = {"not_measured": str(e)}
            log.warning("sweep on %d device(s) not measured: %s", n, e)
            continue
        wall = time.perf_counter() - t0
        workers = [json.loads(p.read_text()).get("worker", {}) for p in sorted((folder / "points").glob("*/*.json"))]
        shares = [w["outside_training_s"] / w["seconds"] for w in workers if w.get("seconds")]
        out["columns"][str(n)] = {
            "wall_s": wall, "points_per_hour": 3600 * res.computed / wall, "computed": res.computed,
            "failures": len(res.failures), "point_seconds": [w.get("seconds") for w in workers],
            "outside_training_share_median": float(np.median(shares)) if shares else None,
            "outside_training_share_max": max(shares) if shares else None,
            "workers": sorted({f"{w.get('host')}:{w.get('pid')}" for w in workers}),
        }
        log.info("sweep of %d points on %d device(s): %.0f s", res.computed, n, wall)
    return out


# ---------------------------------------------------------------------------------- (c) streams


def bench_streams_part(args, devices, models) -> dict:
    from promptus.streaming import bench as sb

    multi = getattr(sb, "bench_stream_devices", None)
    out = {"backend": args.stream_backend, "seconds": args.stream_seconds, "columns": {}}
    for n in _columns(devices):
        use = devices[:n]
        if multi is not None:
            r = multi(use, models, backend=args.stream_backend, size=args.size, interval=args.interval,
                      seconds=args.stream_seconds, max_streams=args.stream_max)
            out["columns"][str(n)] = {"admitted_realtime": r["admitted_realtime"],
                                      "served_realtime": r.get("served_realtime"),
                                      "capacity_fps": r["capacity_fps"], "latency_ms_p95": r["latency_ms_p95"],
                                      "latency_ms_median": r["latency_ms_median"], "raw": r}
        elif n == 1:
            r = sb.bench_streams(models, use[0], backend=args.stream_backend, size=args.size, interval=args.interval,
                                 counts=tuple(args.stream_counts), seconds=args.stream_seconds, lever=False)
            admitted = [x for x in r["runs"] if x["admitted"]]
            best = admitted[-1] if admitted else None
            out["columns"]["1"] = {"admitted_realtime": r["admitted_realtime"], "capacity_fps": r["capacity_fps"],
                                   "streams_run": best["streams"] if best else 0,
                                   "latency_ms_p95": best["latency_ms_p95"] if best else None,
                                   "latency_ms_median": best["latency_ms_median"] if best else None,
                                   "late_segments": best["late_segments"] if best else None, "raw": r}
        else:
            out["columns"][str(n)] = {"not_measured": "promptus.streaming.bench has no bench_stream_devices (the "
                                                      "multi-device server) in this tree"}
    return out


# ------------------------------------------------------------------------------------------ main


def _columns(devices) -> list[int]:
    return [1] if len(devices) == 1 else [1, len(devices)]


def format_table(result: dict) -> str:
    cols = [str(n) for n in _columns(result["devices"])]
    head = f"{'':<46}" + "".join(f"{'N = ' + c:>14}" for c in cols) + (f"{'N/1':>8}" if len(cols) > 1 else "")
    lines = [f"{result['device_name']} × {len(result['devices'])}, model {result['model']}, {result['size']}², "
             f"interval {result['interval']}, torch {result['torch']}", "", head]

    def row(label, part, key, fmt="{:.1f}", better="low"):
        p = result.get(part)
        if not p:
            return
        vals = [p["columns"].get(c, {}).get(key) for c in cols]
        cells = "".join(f"{(fmt.format(v) if isinstance(v, (int, float)) else 'not measured'):>14}" for v in vals)
        ratio = ""
        if better != "none" and len(vals) > 1 and all(isinstance(v, (int, float)) and v for v in vals):
            ratio = f"{(vals[0] / vals[1] if better == 'low' else vals[1] / vals[0]):>7.2f}×"
        lines.append(f"{label:<46}{cells}{ratio}")

    row("(a) segment ms/iteration", "encode", "ms_per_iteration_segment")
    row("(a) keyframe 0 ms/iteration (first device)", "encode", "ms_per_iteration_first")
    row("(a) 141-frame clip at published iterations, s", "encode", "projected_clip_s", "{:.0f}")
    row("(a) keyframe 0's share of that (serial)", "encode", "serial_share", "{:.1%}", better="none")
    row("(b) sweep wall s", "sweep", "wall_s", "{:.0f}")
    row("(b) sweep points/hour", "sweep", "points_per_hour", "{:.0f}", better="high")
    row("(b) median share of a point outside training", "sweep", "outside_training_share_median", "{:.1%}",
        better="none")
    row("(c) 30-fps streams admitted in real time", "streams", "admitted_realtime", "{:.0f}", better="high")
    row("(c) p95 latency ms (admitted streams)", "streams", "latency_ms_p95", "{:.0f}", better="none")
    for part in ("encode", "sweep", "streams"):
        for c, v in result.get(part, {}).get("columns", {}).items():
            if "not_measured" in v:
                lines.append(f"not measured: ({part}, N = {c}) {v['not_measured']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default=None, help="cuda:0,cuda:1 … or all (default: every GPU, else cpu)")
    ap.add_argument("--model", default="random", help="random (full-size, random weights) or tiny (tests)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--iters-first", type=int, default=60, help="(a) iterations of keyframe 0")
    ap.add_argument("--iters", type=int, default=40, help="(a) iterations of each segment")
    ap.add_argument("--perceptual", choices=["on", "off"], default="on", help="(a) VGG-19 term (random weights)")
    ap.add_argument("--compile-step", default="off", help="(a) torch.compile mode of the training step")
    ap.add_argument("--max-memory", default="auto", help="(a) per-device memory budget of a training step")
    ap.add_argument("--sweep-points", type=int, default=8)
    ap.add_argument("--sweep-frames", type=int, default=21)
    ap.add_argument("--sweep-size", type=int, default=None, help="default: --size")
    ap.add_argument("--sweep-iters-first", type=int, default=100)
    ap.add_argument("--sweep-iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="(b) torch CPU threads per point")
    ap.add_argument("--stream-backend", default="torch",
                    help="(c) decoder backend of every device (default: torch; compile builds or loads a compiled "
                         "decoder per GPU first)")
    ap.add_argument("--stream-seconds", type=float, default=4.0)
    ap.add_argument("--stream-counts", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--stream-max", type=int, default=64)
    ap.add_argument("--parts", default="encode,sweep,streams", help="which of encode, sweep, streams to run")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="default: benchmarks/scale_<device>.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    from promptus.distributed import parse_devices
    from promptus.backends import default_dtype
    from promptus.losses import random_vgg19
    from promptus.models import load_models

    devices = parse_devices(args.devices or ("all" if torch.cuda.is_available() else "cpu"))
    args.sweep_size = args.sweep_size or args.size
    parts = set(args.parts.split(","))
    result = {"devices": [str(d) for d in devices], "device_name": device_name(devices[0]), "model": args.model,
              "size": args.size, "interval": args.interval, "rank": args.rank, "torch": torch.__version__,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
    t_all = time.perf_counter()
    models = load_models(args.model, device=devices[0], dtype=default_dtype(devices[0]), vae=False)
    vgg = random_vgg19() if args.perceptual == "on" else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "encode" in parts:
            result["encode"] = bench_encode(args, devices, models, vgg)
        if "sweep" in parts:
            result["sweep"] = bench_sweep(args, devices, work)
        if "streams" in parts:
            result["streams"] = bench_streams_part(args, devices, models)
    result["total_s"] = time.perf_counter() - t_all
    table = format_table(result)
    print(table)
    name = result["device_name"].replace(" ", "_").lower()
    path = Path(args.json or ROOT / "benchmarks" / f"scale_{name}_x{len(devices)}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {path} ({result['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
