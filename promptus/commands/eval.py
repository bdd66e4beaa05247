"""``promptus eval``: compare a decoded clip with its reference (PSNR, SSIM, MS-SSIM, LPIPS)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..metrics.meter import LPIPS_SEVERE, PSNR_SEVERE_DB


def add_metric_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``eval`` and ``sweep``: LPIPS and the severe-distortion thresholds."""
    p.add_argument("--lpips", choices=["auto", "off"], default="auto",
                   help="LPIPS: auto computes it when AlexNet's ImageNet weights are here (--lpips-weights or torch.hub's "
                        "cache), and otherwise reports it unavailable with the reason (default: auto)")
    p.add_argument("--lpips-weights", default=None,
                   help="local ImageNet weights of LPIPS' AlexNet backbone (torchvision's alexnet-owt-7be5be79.pth; "
                        "default: torch.hub's checkpoint folder). Never downloaded")
    p.add_argument("--psnr-threshold", type=float, default=PSNR_SEVERE_DB,
                   help=f"a frame below this PSNR counts as severely distorted (default: {PSNR_SEVERE_DB:g} dB)")
    p.add_argument("--lpips-threshold", type=float, default=LPIPS_SEVERE,
                   help=f"a frame above this LPIPS counts as severely distorted (default: {LPIPS_SEVERE:g})")


def meter_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`promptus.metrics.QualityMeter` options of :func:`add_metric_args`."""
    return {"lpips": args.lpips, "lpips_weights": args.lpips_weights, "psnr_threshold_db": args.psnr_threshold,
            "lpips_threshold": args.lpips_threshold}


def register(subparsers) -> None:
    e = subparsers.add_parser(
        "eval", help="compare a decoded clip with its reference: PSNR, SSIM, MS-SSIM, LPIPS",
        description="Compare two clips frame by frame (video files or folders of images, any mix), aligned by "
                    "frame index. Clips of different lengths are compared over the common prefix, with a warning. "
                    "Prints a table; --json writes per-frame values and means (identical frames: PSNR \"inf\").")
    e.add_argument("reference", help="the original clip: a video file or a folder of frames")
    e.add_argument("decoded", help="the decoded clip: a video file or a folder of frames")
    e.add_argument("--json", default=None, help="write the results here as JSON")
    e.add_argument("--size", type=int, default=None,
                   help="crop both clips to the centre square and resize to SIZE×SIZE (default: the decoded "
                        "clip's size, which must be square)")
    e.add_argument("--max-frames", type=int, default=None, help="compare only the first N frames")
    add_metric_args(e)
    e.set_defaults(func=run)


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def format_table(comp) -> str:
    """The table ``promptus eval`` prints: mean, min and max per metric, severe shares, and why a metric is missing.

    "PSNR dB" is per frame (mean, min, max over the frames); "PSNR (clip MSE)" is the
    PSNR of the clip's mean MSE.
    """
    r = comp.report
    lines = [f"reference {comp.reference} ({comp.reference_frames} frames)",
             f"decoded   {comp.decoded} ({comp.decoded_frames} frames)",
             f"compared  {comp.frames_compared} frames at {comp.size}×{comp.size}", "",
             f"  {'metric':<10}{'mean':>10}{'min':>10}{'max':>10}"]
    for name, label, digits in (("psnr", "PSNR dB", 2), ("ssim", "SSIM", 4), ("ms_ssim", "MS-SSIM", 4),
                                ("lpips", "LPIPS", 4)):
        values = getattr(r, name)
        if values is None:
            lines.append(f"  {label:<10}{'unavailable':>10}  ({r.unavailable.get(name, '')})")
            continue
        extra = f"  ({r.ms_ssim_scales} scales)" if name == "ms_ssim" and r.ms_ssim_scales not in (None, 5) else ""
        lines.append(f"  {label:<10}{_fmt(r.mean(name), digits):>10}{_fmt(min(values), digits):>10}"
                     f"{_fmt(max(values), digits):>10}{extra}")
    lines.append(f"  {'PSNR (clip MSE)':<20}{_fmt(r.psnr_clip, 2):>10}")
    lines.append(f"  severe frames, PSNR < {r.psnr_threshold_db:g} dB: {_fmt(r.severe_psnr_share, 3)}")
    lines.append(f"  severe frames, LPIPS > {r.lpips_threshold:g}: "
                 + (_fmt(r.severe_lpips_share, 3) if r.lpips is not None else "n/a (LPIPS unavailable)"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..files import check_output_path, write_json_atomic
    from ..metrics import compare_sources

    if args.json:
        check_output_path(args.json, "file")  # before the metrics run, not after
    comp = compare_sources(args.reference, args.decoded, size=args.size, max_frames=args.max_frames,
                           **meter_options(args))
    print(format_table(comp))
    if args.json:
        write_json_atomic(args.json, comp.to_dict())
        print(f"wrote {args.json}")
    return 0
