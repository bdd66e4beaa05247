"""One sweep, on one GPU and on a local Ray cluster of all GPUs: wall time, GPU per job, equal results.

    python benchmarks/ray_sweep.py --phase local --work /tmp/raysweep    # one GPU, jobs in order
    python benchmarks/ray_sweep.py --phase ray --work /tmp/raysweep --json out.json   # Ray, then compare

The two phases can run in separate processes (the Ray wheel may arrive later than the
first phase). Each phase runs ``promptus sweep`` as a subprocess and times it whole
(process start, model loading and Ray's own start included). The comparison prints a
table: wall time of each run, where each job ran as the job itself reported it
(``worker`` in points/CLIP/POINT.json: Ray's GPU ids, CUDA_VISIBLE_DEVICES, device
name), and whether every row (timings aside) and every .promptus file are equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("encode_s", "search_s", "decode_s")


def sweep_args(a) -> list[str]:
    return [a.clip, "--ranks", *map(str, a.ranks), "--intervals", *map(str, a.intervals), "--baselines",
            "--model", a.model, "--perceptual", "off", "--iters-first", str(a.iters_first), "--iters",
            str(a.iters), "--size", str(a.size), "--max-frames", str(a.frames)]


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def load(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    rows = {r["point"]: r for r in res["rows"]}
    points = {}
    for p in sorted((out / "points").glob("*/*.json")):
        d = json.loads(p.read_text())
        if "worker" not in d:
            continue
        f = p.with_suffix(".promptus")
        points[p.stem] = {"worker": d["worker"], "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                          "bytes": f.stat().st_size}
    return {"rows": rows, "points": points}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["local", "ray", "both"], default="both")
    ap.add_argument("--work", default="/tmp/raysweep")
    ap.add_argument("--clip", default="data/sky")
    ap.add_argument("--model", default="random")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--intervals", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--iters-first", type=int, default=30)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    py = [sys.executable, "-m", "promptus", "-q", "sweep"]
    if a.phase in ("local", "both"):
        one = dict(env, CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
        times["local"] = run(py + sweep_args(a) + ["--out", str(work / "local")], one)
        times_path.write_text(json.dumps(times))
    if a.phase in ("ray", "both"):
        times["ray"] = run(py + sweep_args(a) + ["--ray", "--out", str(work / "ray")], env)
        times_path.write_text(json.dumps(times))
        local, ray = load(work / "local"), load(work / "ray")
        same_rows = {p: {k: v for k, v in r.items() if k not in TIMING}
                     == {k: v for k, v in ray["rows"][p].items() if k not in TIMING}
                     for p, r in local["rows"].items()}
        same_bytes = {p: local["points"][p]["sha256"] == ray["points"][p]["sha256"] for p in local["points"]}
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        print(f"\nsweep of {a.clip}: ranks {a.ranks} × intervals {a.intervals}, {a.frames} frames at {a.size}², "
              f"model {a.model}, {a.iters_first}/{a.iters} iterations, {torch.cuda.device_count()} × {gpu}")
        print(f"{'run':<22}{'wall s':>8}")
        print(f"{'one GPU, in order':<22}{times['local']:>8.1f}")
        print(f"{'Ray, all GPUs':<22}{times['ray']:>8.1f}   speed-up {times['local'] / times['ray']:.2f}×")
        print(f"\n{'point':<18}{'local GPU':>10}{'ray GPU ids':>12}{'ray pid':>9}{'rows equal':>12}{'bytes equal':>13}")
        for p in sorted(local["rows"]):
            lw, rw = local["points"][p]["worker"], ray["points"][p]["worker"]
            print(f"{p:<18}{str(lw.get('cuda_visible_devices')):>10}{','.join(rw.get('ray_gpu_ids', [])):>12}"
                  f"{rw['pid']:>9}{str(same_rows[p]):>12}{str(same_bytes[p]):>13}")
        report = {"gpu": gpu, "gpus": torch.cuda.device_count(), "settings": vars(a), "wall_s": times,
                  "speedup": times["local"] / times["ray"], "rows_equal": same_rows, "bytes_equal": same_bytes,
                  "local": local, "ray": ray}
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
