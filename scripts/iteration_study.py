"""How many iterations a keyframe needs: loss, PSNR and LPIPS against iterations and wall time, per schedule.

    python scripts/iteration_study.py data/sky data/city.mp4 --model checkpoints/sd-turbo \
        --schedules published,fast --out outputs/iteration_study

Meant for real weights on your own clips (docs/encoding-schedules.md): nothing here can
measure quality on real video without them. Each clip is encoded once per schedule with
the encoder options below (``--schedule`` is replaced by each of ``--schedules``). Every
iteration's loss and PSNR (of the training frames, unquantized) are recorded with the
clip-wide iteration count and the wall time; every ``--probe-every`` iterations of a
keyframe (from its first), the LPIPS of the training frames against the real ones. The
closed-loop result of each encode (the frames a decoder shows) is scored with PSNR and
LPIPS. Writes ``study.json`` and ``study.png`` into ``--out`` (and the .promptus files);
a rerun reuses finished (clip, schedule) encodes.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from promptus.commands.common import (
    add_encode_args, add_model_args, add_verbosity_args, codec_from_args, load_models, run_command, train_from_args,
)
from promptus.config import SCHEDULES, CodecConfig
from promptus.errors import PromptusError

STUDY_VERSION = 1


def add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("clips", nargs="+", help="folders of frames or video files")
    p.add_argument("--out", required=True, help="folder for study.json, study.png and the encodes")
    p.add_argument("--schedules", default=",".join(SCHEDULES),
                   help=f"comma-separated schedules to compare (default: {','.join(SCHEDULES)})")
    p.add_argument("--probe-every", type=int, default=100,
                   help="iterations between LPIPS probes of the training frames (default: 100)")
    p.add_argument("--lpips", choices=["auto", "off"], default="auto",
                   help="LPIPS (AlexNet): 'auto' uses it when its weights are here, else records why not")
    p.add_argument("--lpips-weights", default=None, help="torchvision's alexnet-owt-7be5be79.pth for LPIPS")
    add_encode_args(p)
    add_model_args(p)
    add_verbosity_args(p)


def study_clip(args, clip: str, schedule: str, models, device, lpips, out: Path) -> dict:
    """Encode ``clip`` with ``schedule``; the per-iteration curves and the closed-loop scores."""
    import torch

    from promptus.encoder import Encoder
    from promptus.metrics import evaluate
    from promptus.schedule import to_uint8
    from promptus.video import video_fps

    fps = args.fps or video_fps(clip) or CodecConfig.fps
    codec, train = codec_from_args(args, fps), train_from_args(args).replace(schedule=schedule)
    curve: list[dict] = []
    frames_ref: dict[str, torch.Tensor] = {}
    t0 = [0.0]

    def record(m: dict) -> None:
        k, it = m["keyframe"], m["iteration"]
        point = {"keyframe": k, "iteration": it, "step": len(curve) + 1, "seconds": time.perf_counter() - t0[0],
                 "loss": m["loss"], "psnr": m["psnr"], "lr": m["lr"]}
        if lpips is not None and it % args.probe_every == 0:
            start = 0 if k == 0 else (k - 1) * codec.interval + 1
            ref = frames_ref["all"][start:start + m["frames"].shape[0]]
            point["lpips"] = float(lpips(ref, to_uint8(m["frames"]).cpu()).mean())
        curve.append(point)

    enc = Encoder(codec, train, models, device=device, vgg=args.vgg, callback=record, progress=not args.quiet)
    frames_ref["all"] = enc.load_frames(clip, args.max_frames)
    name = Path(clip).stem
    t0[0] = time.perf_counter()
    res = enc.encode(frames_ref["all"], out / f"{name}.{schedule}.promptus")
    wall = time.perf_counter() - t0[0]
    report = evaluate(frames_ref["all"], res.reconstruction, lpips=lpips if lpips is not None else "off")
    summary = report.summary()
    return {"clip": name, "source": str(clip), "schedule": schedule, "options": options(args, schedule),
            "train": train.result_dict(),
            "codec": codec.to_dict(), "wall_s": wall, "iterations": len(curve), "kbps": res.kbps,
            "keyframes": [r.to_dict() for r in res.keyframes],
            "closed_loop": {"psnr": summary["psnr"], "psnr_clip": summary["psnr_clip"], "lpips": summary["lpips"],
                            "ssim": summary["ssim"], "unavailable": summary["unavailable"]},
            "curve": curve}


def options(args, schedule: str) -> dict:
    """What decides an encode's result here: a finished one is reused only when these match."""
    return {"train": train_from_args(args).replace(schedule=schedule).result_dict(), "model": args.model,
            **{k: getattr(args, k) for k in ("rank", "interval", "size", "fps", "seed", "max_frames", "vgg")}}


def figure(results: list[dict]):
    """Loss, PSNR and LPIPS against the clip's iterations (top) and wall time (bottom), one line per encode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = ["loss", "psnr"] + (["lpips"] if any("lpips" in p for r in results for p in r["curve"]) else [])
    fig = Figure(figsize=(5.0 * len(metrics), 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(metrics), squeeze=False)
    for row, x in enumerate(("step", "seconds")):
        for ax, metric in zip(axes[row], metrics):
            for r in results:
                pts = [p for p in r["curve"] if metric in p]
                style = dict(marker=".", linestyle="-") if metric == "lpips" else dict(linewidth=0.8)
                ax.plot([p[x] for p in pts], [p[metric] for p in pts],
                        label=f"{r['clip']} {r['schedule']} ({r['closed_loop']['psnr_clip']:.2f} dB)", **style)
            ax.set_xlabel("iterations (whole clip)" if x == "step" else "wall time (s)")
            ax.set_ylabel({"loss": "training loss", "psnr": "PSNR of training frames (dB)",
                           "lpips": "LPIPS of training frames"}[metric])
            if metric == "loss":
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle("iterations per schedule (legend: closed-loop PSNR)")
    return fig


def run(args) -> int:
    from promptus.backends import resolve_device
    from promptus.files import atomic_write
    from promptus.metrics import MetricUnavailable, load_lpips

    schedules = [s for s in args.schedules.split(",") if s]
    for s in schedules:
        if s not in SCHEDULES:
            raise PromptusError(f"--schedules: {s!r} is not a schedule; choose from {', '.join(SCHEDULES)}")
    if args.probe_every < 1:
        raise PromptusError("--probe-every must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    models = load_models(args, device, need_vae=args.init_latent == "vae")
    lpips, lpips_missing = None, None
    if args.lpips == "auto":
        try:
            lpips = load_lpips(args.lpips_weights, device=device)
        except MetricUnavailable as e:
            lpips_missing = e.reason
    study_path = out / "study.json"
    done = {}
    if study_path.exists():  # a rerun keeps what finished with the same options
        try:
            old = json.loads(study_path.read_text())
            done = {(r["source"], r["schedule"]): r for r in old.get("results", [])}
        except (ValueError, KeyError, TypeError):
            done = {}
    results = []
    for clip in args.clips:
        for schedule in schedules:
            prev = done.get((str(clip), schedule))
            if prev is not None and prev.get("options") == options(args, schedule):
                results.append(prev)
                continue
            r = study_clip(args, clip, schedule, models, device, lpips, out)
            results.append(r)
            atomic_write(study_path, json.dumps(payload(results, args, lpips_missing), indent=1))
            cl = r["closed_loop"]
            print(f"{r['clip']:<16} {schedule:<10} {r['iterations']:>7} it {r['wall_s']:>8.1f} s  "
                  f"closed-loop PSNR {cl['psnr_clip']:.2f} dB  LPIPS "
                  f"{'-' if cl['lpips'] is None else format(cl['lpips'], '.4f')}")
    atomic_write(study_path, json.dumps(payload(results, args, lpips_missing), indent=1))
    fig = figure(results)
    png = out / "study.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(png, buf.getvalue())
    print(f"wrote {study_path} and {png}" + (f" (LPIPS unavailable: {lpips_missing})" if lpips_missing else ""))
    return 0


def payload(results: list[dict], args, lpips_missing: str | None) -> dict:
    return {"study": "iterations", "version": STUDY_VERSION, "model": args.model, "device": args.device,
            "lpips_unavailable": lpips_missing, "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p)
    return run_command("iteration_study", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
