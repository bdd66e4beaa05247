"""Which torch thread count is fastest for CPU encoding and decoding (issue 25, point 1).

For each model and each thread count 1..cores, in one process: encode a short clip
(``--frames`` frames, few iterations, the tiny model at 128 px or the full-size
random-weight model at 64 px) and decode the file it wrote, timing both; every
thread count runs ``--repeat`` times and the median is reported, next to its ratio
against one thread (the baseline, repeated the same way). Prints a table and writes JSON.

    python3 benchmarks/cpu_threads.py [--models tiny random] [--json benchmarks/cpu_threads_2core.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from promptus import CodecConfig, TrainConfig
from promptus.backends import make_backend
from promptus.bitstream import read
from promptus.decoder import Decoder
from promptus.encoder import Encoder
from promptus.models import load_models
from promptus.video import synthetic_clip

SIZES = {"tiny": 128, "random": 64}


def time_once(models, clip, size: int, frames: int, iters: int, threads: int, out: Path) -> tuple[float, float]:
    torch.set_num_threads(threads)
    codec = CodecConfig(width=size, height=size, interval=frames - 1)
    train = TrainConfig(iters_first=iters, iters=iters, perceptual=False, init_latent="taesd")
    backend = make_backend("eager", models, "cpu", batch=codec.interval, size=size)
    t0 = time.perf_counter()
    Encoder(codec, train, models, device="cpu", progress=False, backend=backend).encode(clip, out)
    t_enc = time.perf_counter() - t0
    bs = read(out)
    t0 = time.perf_counter()
    for _ in Decoder(backend, models.identity()).decode(bs):
        pass
    return t_enc, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "random"], choices=sorted(SIZES))
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            size = SIZES[name]
            models = load_models(name, device="cpu", dtype=torch.float32)
            clip = synthetic_clip(args.frames, size, size)
            time_once(models, clip, size, args.frames, 1, 1, Path(tmp) / "warm.promptus")  # warm-up
            times: dict[int, list[tuple[float, float]]] = {n: [] for n in range(1, cores + 1)}
            for r in range(args.repeat):  # interleaved: load changes hit every count alike
                for n in times:
                    times[n].append(time_once(models, clip, size, args.frames, args.iters, n,
                                              Path(tmp) / f"{name}-{n}-{r}.promptus"))
            base_e = statistics.median(t[0] for t in times[1])
            base_d = statistics.median(t[1] for t in times[1])
            for n, ts in times.items():
                e, d = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
                rows.append({"model": name, "size": size, "threads": n, "encode_s": round(e, 3),
                             "decode_s": round(d, 3), "encode_vs_1": round(e / base_e, 2),
                             "decode_vs_1": round(d / base_d, 2), "repeat": args.repeat})
    load = os.getloadavg()[0]
    print(f"{'model':8} {'size':>4} {'threads':>7} {'encode s':>9} {'×1 thread':>9} {'decode s':>9} {'×1 thread':>9}")
    for r in rows:
        print(f"{r['model']:8} {r['size']:4d} {r['threads']:7d} {r['encode_s']:9.2f} {r['encode_vs_1']:9.2f} "
              f"{r['decode_s']:9.2f} {r['decode_vs_1']:9.2f}")
    print(f"{cores} cores, load average {load:.1f}, torch {torch.__version__}, {args.frames} frames, "
          f"{args.iters} iterations per keyframe, median of {args.repeat}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "load_average": load, "torch": torch.__version__,
                                               "frames": args.frames, "iters": args.iters, "rows": rows},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
