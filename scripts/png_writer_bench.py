"""How fast the PNG folder writer can go on this machine: one frame on one core per zlib level, then the
writer's pool (worker processes, or threads) over many frames, and the disk's own write speed.

Frames are 512² by default: ``sky`` (the sample clip, smooth: the easy case) or ``grain`` (the sky with
strong per-pixel noise, close to what the full-size random-weight model decodes: the hard case). Prints a
table and writes JSON.

    python scripts/png_writer_bench.py --json benchmarks/png_writer_cpu_2core.json
    python scripts/png_writer_bench.py --frames 300 --levels 1 6 --workers 8 15   # a 16-core GPU host
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from promptus.files import write_json_atomic
from promptus.video import PngPool, save_png, sky_clip


def frames_of(kind: str, n: int, size: int) -> np.ndarray:
    base = sky_clip(min(n, 24), size=size)
    out = np.concatenate([base] * (n // len(base) + 1))[:n]
    if kind == "grain":
        rng = np.random.RandomState(1)
        out = np.clip(out.astype(np.int16) + rng.randint(-40, 41, out.shape), 0, 255).astype(np.uint8)
    return out


def one_core_ms(frames: np.ndarray, level: int, folder: Path) -> tuple[float, float]:
    """Median ms per frame on this thread, and the mean file size in kB."""
    times, sizes = [], []
    for i, f in enumerate(frames[:12]):
        path = folder / f"one{i}.png"
        t0 = time.perf_counter()
        save_png(f, path, level)
        times.append(1000 * (time.perf_counter() - t0))
        sizes.append(path.stat().st_size / 1000)
    return statistics.median(times), statistics.mean(sizes)


def pool_fps(frames: np.ndarray, level: int, workers: int, processes: bool, folder: Path) -> tuple[float, bool]:
    pool = PngPool(workers, level, workers * 2, processes=processes)
    pool.submit(frames[0], folder / "warm.png")  # the workers start before the clock does
    pool._wait_oldest()
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        pool.submit(f, folder / f"{i:05d}.png")
    pool.drain()
    return len(frames) / (time.perf_counter() - t0), pool.processes


def disk_mb_s(folder: Path, mb: int = 256) -> float:
    path = folder / "disk.bin"
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    secs = time.perf_counter() - t0
    path.unlink()
    return mb / secs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=96, help="frames per pool measurement")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 6])
    p.add_argument("--workers", type=int, nargs="+", default=None, help="pool sizes (default: the cores)")
    p.add_argument("--kinds", nargs="+", default=["sky", "grain"], choices=["sky", "grain"])
    p.add_argument("--dir", default=None, help="where the files go (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = args.workers or [cores]
    result = {"benchmark": "png writer", "machine": platform.processor() or platform.machine(), "cores": cores,
              "size": args.size, "frames": args.frames, "rows": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="png-bench-") as tmp:
        folder = Path(tmp)
        result["disk_mb_s"] = round(disk_mb_s(folder), 1)
        print(f"{cores} cores; disk {result['disk_mb_s']} MB/s written (fsync) in {folder}")
        print(f"{'frames':6} {'level':>5} {'1 core ms':>9} {'kB':>6} {'workers':>7} {'processes':>9} {'pool fps':>9}")
        for kind in args.kinds:
            frames = frames_of(kind, args.frames, args.size)
            for level in args.levels:
                ms, kb = one_core_ms(frames, level, folder)
                for w in workers:
                    for processes in (True, False):
                        fps, used = pool_fps(frames, level, w, processes, folder)
                        row = {"frames_kind": kind, "level": level, "one_core_ms": round(ms, 2), "kB": round(kb, 1),
                               "workers": w, "processes": used, "pool_fps": round(fps, 1)}
                        result["rows"].append(row)
                        print(f"{kind:6} {level:>5} {ms:>9.1f} {kb:>6.0f} {w:>7} {str(used):>9} {fps:>9.1f}",
                              flush=True)
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
