"""``promptus sweep``: rate–distortion sweep of promptus ranks × intervals against x264/x265."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from .common import add_encode_args, add_model_args, codec_from_args, train_from_args
from .eval import add_metric_args

log = logging.getLogger("promptus")


def _default(name: str):
    """The default of a :class:`promptus.sweep.SweepConfig` field: the options read them from there."""
    from ..sweep import SweepConfig

    f = next(f for f in dataclasses.fields(SweepConfig) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


#: Defaults that ``--preset quick`` changes: a sweep that runs in minutes on a CPU (the tiny model unless
#: SD-Turbo weights are present; with them the same preset wants a GPU). Without a preset every option
#: keeps the published settings (512 px, 10 000/1 500 iterations, perceptual loss on: GPU hours per clip).
QUICK = {"ranks": [2, 4, 8], "intervals": [5, 10], "size": 128, "max_frames": 21, "iters_first": 100, "iters": 30,
         "perceptual": "off", "init_latent": "taesd"}
PRESETS = ("quick",)


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """The sweep's options (the `sweep` command and scripts/bitrate_sweep.py)."""
    from ..backends import backend_names
    from ..config import CodecConfig, TrainConfig

    ranks, intervals, baselines = _default("ranks"), _default("intervals"), _default("baselines")

    def words(values):
        return " ".join(map(str, values)) if isinstance(values, list) else str(values)

    def note(name, published):
        return f"default: {words(published)}; {words(QUICK[name])} with --preset quick"

    p.add_argument("clips", nargs="+", metavar="CLIP", help="video files or folders of frames")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="quick: defaults for a sweep that runs in minutes on a CPU (" + ", ".join(
                       f"--{k.replace('_', '-')} {words(v)}" for k, v in QUICK.items())
                   + "; the tiny model when no SD-Turbo weights are found, saying so); options given explicitly "
                     "win. Default: the published settings")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help=f"prompt ranks ({note('ranks', ranks)})")
    p.add_argument("--intervals", type=int, nargs="+", default=None,
                   help=f"keyframe intervals; one promptus curve each ({note('intervals', intervals)})")
    p.add_argument("--baselines", nargs="*", default=baselines, metavar="CODEC",
                   help="baseline codecs at matched bitrates: x264, x265; none with a bare --baselines "
                        f"(default: {words(baselines)})")
    p.add_argument("--out", default=_default("out"),
                   help=f"output folder; rerunning resumes, and runs with other settings add their points next to "
                        f"the earlier ones (default: {_default('out')})")
    codec, train = CodecConfig(), TrainConfig()
    published = {"size": codec.width, "max_frames": "all", "iters_first": train.iters_first, "iters": train.iters,
                 "perceptual": "on" if train.perceptual else "off", "init_latent": train.init_latent}
    add_encode_args(p, rate=False, defaults={k: (None, note(k, v)) for k, v in published.items()})
    add_model_args(p, auto_help="checkpoints/sd_turbo.safetensors or checkpoints/sd-turbo; with --preset quick "
                                "the tiny model when neither is present")
    p.add_argument("--decode-backend", default=_default("decode_backend"), choices=backend_names(),
                   help=f"backend that decodes the promptus points, one of "
                        f"{', '.join(backend_names())} (default: {_default('decode_backend')})")
    p.add_argument("--threads", type=int, default=_default("threads"),
                   help="torch CPU threads per job; CPU results depend on it, so it is part of each point's "
                        f"inputs (default: {_default('threads')})")
    p.add_argument("--baseline-preset", default=_default("baseline_preset"),
                   help=f"x264/x265 -preset (default: {_default('baseline_preset')})")
    p.add_argument("--ffmpeg", default=_default("ffmpeg"), help="the ffmpeg executable (default: ffmpeg on PATH)")
    p.add_argument("--tolerance", type=float, default=_default("tolerance"),
                   help="baseline bitrate tolerance: a CRF search follows two-pass ABR when it misses the target "
                        f"by more (default: {_default('tolerance'):.2f})")
    add_metric_args(p)
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the promptus points on long-lived Ray actors, one per GPU (or per --gpus-per-point "
                        "GPUs), longest first; a local Ray instance, or the cluster at ADDRESS (every node needs "
                        "promptus and the same paths: docs/many-gpus.md; pip install 'promptus[distributed]')")
    p.add_argument("--ray-address", default=None, help="the same as --ray ADDRESS")
    p.add_argument("--gpus-per-point", type=int, default=_default("gpus_per_point"),
                   help="with --ray: GPUs of each actor; a point then encodes on all of them (encode --devices) "
                        f"(default: {_default('gpus_per_point')})")


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the options left unset from ``--preset`` (or the published settings); says what the preset chose."""
    from ..config import CodecConfig, TrainConfig
    from ..models import find_default_weights

    codec, train = CodecConfig(), TrainConfig()
    published = {"ranks": _default("ranks"), "intervals": _default("intervals"), "size": codec.width,
                 "max_frames": None, "iters_first": train.iters_first, "iters": train.iters,
                 "perceptual": "on" if train.perceptual else "off", "init_latent": train.init_latent}
    values = QUICK if args.preset == "quick" else published
    for name, value in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
    if args.preset == "quick" and args.model == "auto" and find_default_weights(args.checkpoints) is None:
        log.info("sweep --preset quick: no SD-Turbo weights under %s/: using the built-in tiny random-weight model, "
                 "which cannot reconstruct real images (the sweep's machinery and the baselines are real)",
                 args.checkpoints)
        args.model = "tiny"


def config_from_args(args: argparse.Namespace):
    """The :class:`promptus.sweep.SweepConfig` of the sweep's options (after :func:`apply_preset`)."""
    from ..sweep import SweepConfig

    apply_preset(args)
    names = {f.name for f in dataclasses.fields(SweepConfig)} - {"codec", "train"}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["progress"] = not getattr(args, "quiet", False)
    if isinstance(args.ray, str):  # --ray [ADDRESS]
        values["ray"] = True
        values["ray_address"] = args.ray or args.ray_address
    else:
        values["ray"] = bool(args.ray_address)
    if args.baselines is None:
        values["baselines"] = []
    return SweepConfig(codec=codec_from_args(args), train=train_from_args(args), **values)


def format_results(result) -> str:
    """The table ``promptus sweep`` prints ("PSNR": the mean of the per-frame PSNRs)."""

    def f(v, d=2):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if v == float("inf") else f"{v:.{d}f}"
        return str(v)

    head = (f"{'clip':<12}{'codec':<9}{'r':>3}{'T':>4}{'target':>9}{'kbps':>9}{'PSNR':>7}{'SSIM':>8}"
            f"{'MS-SSIM':>8}{'LPIPS':>7}{'sev.':>6}{'enc s':>8}  rate control")
    lines = [head]
    for r in result.rows:
        rc = r["rate_control"] + (f" crf {r['crf']:g}" if r["crf"] is not None else "")
        if r["within_tolerance"] is False:
            rc += " (missed target)"
        lines.append(f"{r['clip'][:11]:<12}{r['codec']:<9}{r['rank']:>3}{r['interval']:>4}"
                     f"{f(r['target_kbps'], 1):>9}{f(r['kbps_all_bytes'], 1):>9}{f(r['psnr']):>7}"
                     f"{f(r['ssim'], 4):>8}{f(r['ms_ssim'], 4):>8}{f(r['lpips'], 3):>7}"
                     f"{f(r['severe_psnr_share']):>6}{f(r['encode_s'], 1):>8}  {rc}")
    lines += ["", "BD-rate of promptus against each baseline (mean over clips; - = curves don't overlap):"]
    for e in result.bd_mean:
        v = "-" if e["bd_rate_pct"] is None else f"{e['bd_rate_pct']:+.1f} %"
        lines.append(f"  T={e['promptus_interval']:<3} vs {e['baseline']:<5} {e['metric']:<5} {v:>10}"
                     f"  ({e['clips_with_overlap']}/{e['clips']} clips)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..sweep import run_sweep

    result = run_sweep(config_from_args(args))
    print(format_results(result))
    print(f"\nwrote {result.out / 'results.csv'}, results.json, bd_rate.csv and "
          f"{', '.join(Path(p['png']).name for p in result.plots)} ({result.computed} points computed now)")
    if result.failures:
        for f in result.failures:
            print(f"promptus: error: point {f['clip']}/{f['point']} failed: {f['error']}")
        return 1
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "sweep", help="rate–distortion sweep: promptus ranks × intervals against x264/x265",
        description="Encode every (clip, rank, interval) with promptus, encode the same clips with x264/x265 "
                    "(system ffmpeg) at each point's bitrate, measure everything the same way and write "
                    "results.csv/json, bd_rate.csv and rate–distortion plots into --out. Finished points are "
                    "reused: rerun the same command to resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  promptus sweep data/sky --preset quick --out outputs/sweep-quick   # minutes on a CPU\n"
               "  promptus sweep clip.mp4 --ranks 2 4 8 16 --intervals 5 10 20 --baselines x264 x265 "
               "--out outputs/sweep   # the published settings: a GPU")
    add_sweep_args(s)
    s.set_defaults(func=run)
