"""``promptus bench``: decoder backends or the inversion trainer; a table on stdout and JSON."""

from __future__ import annotations

import argparse
import logging
import math

from ..backends import bench_defaults
from ..bench import BENCH_BUDGETS
from ..bench.command import COMMAND_OUTPUTS, OUTPUT_KINDS
from ..config import COMPILE_MODES, CodecConfig

log = logging.getLogger("promptus")

#: Backends the decoder benchmark times by default on a GPU (the registry's bench_gpu entries).
BENCH_BACKENDS = tuple(bench_defaults("cuda"))
#: What the benchmarks time unless told otherwise: the real workload on a GPU, and on the CPU a
#: small one that finishes in about a minute on two cores (the full-size UNet at 512 px takes
#: seconds per frame there, and compile/tensorrt are GPU backends).
GPU_DEFAULTS = {"model": "random", "size": CodecConfig.width, "keyframes": 31, "backends": list(BENCH_BACKENDS),
                "iters": 10, "iters_published": 3, "warmup": 2, "command_clips": [141, 3001]}
CPU_DEFAULTS = {"model": "tiny", "size": 64, "keyframes": 4, "backends": bench_defaults("cpu"),
                "iters": 3, "iters_published": 1, "warmup": 1, "command_clips": [11, 31]}
_DECODE_ONLY, _ENCODE_ONLY = ("keyframes", "backends", "command_clips"), ("iters", "iters_published", "warmup")


def _both(name: str) -> str:
    gpu, cpu = GPU_DEFAULTS[name], CPU_DEFAULTS[name]
    if isinstance(gpu, list):
        gpu, cpu = " ".join(map(str, gpu)), " ".join(map(str, cpu))
    return f"default: {gpu} on a GPU, {cpu} on the CPU"


def register(subparsers) -> None:
    c = CodecConfig()
    b = subparsers.add_parser(
        "bench", help="benchmarks: a table and JSON",
        description="Decoder backends (default): per-stage ms, end-to-end FPS with frames left on the GPU and copied "
                    "to the host, peak memory, FLOPs and the fraction of the measured matmul ceiling, parity with "
                    "fp32; the eager fp16 pipeline is the baseline. --encode: the published per-frame inversion "
                    "procedure against promptus' batched trainer. On a GPU the defaults time the real workload "
                    "(full-size architecture with random weights, 512 px); on the CPU they pick a small one that "
                    "finishes in about a minute on two cores and say so. Any option given is used as given.")
    b.add_argument("--encode", action="store_true", help="benchmark the inversion trainer instead of decoding")
    b.add_argument("--backends", nargs="+", default=None, help=f"decoder backends to time ({_both('backends')})")
    b.add_argument("--batch", type=int, default=c.interval,
                   help=f"frames per segment for the decoder benchmark (default: {c.interval})")
    b.add_argument("--keyframes", type=int, default=None,
                   help=f"keyframes of the timed clip; K keyframes make (K−1)·batch+1 frames ({_both('keyframes')})")
    b.add_argument("--model", default=None,
                   help=f"'random' (full-size architecture, random weights), 'tiny', or weights ({_both('model')})")
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    b.add_argument("--size", type=int, default=None, help=f"frame size in pixels ({_both('size')})")
    b.add_argument("--interval", type=int, default=c.interval,
                   help=f"keyframe interval T of the encoder benchmark (default: {c.interval})")
    b.add_argument("--rank", type=int, default=c.rank, help=f"prompt rank of the encoder benchmark (default: {c.rank})")
    b.add_argument("--iters", type=int, default=None, help=f"timed iterations of promptus' trainer ({_both('iters')})")
    b.add_argument("--iters-published", type=int, default=None,
                   help=f"timed iterations of the published loop ({_both('iters_published')})")
    b.add_argument("--baseline-repeats", type=int, default=3, metavar="N",
                   help="timed runs of the baseline (the published loop; each backend's end-to-end decode), whose "
                        "median is reported; a spread between them, or a median over 20%% off this machine's "
                        "earlier runs, is flagged under the table (default: 3)")
    b.add_argument("--warmup", type=int, default=None,
                   help=f"untimed iterations before each timed run of the encoder benchmark ({_both('warmup')})")
    b.add_argument("--perceptual", choices=["on", "off"], default="on",
                   help="include the VGG-19 perceptual loss in the encoder benchmark (random VGG weights; default: on)")
    b.add_argument("--starts", nargs="+", default=None, metavar="BACKEND",
                   help="backends whose cold and warm start are measured, two fresh processes each: all, none, or "
                        "names (default: all on a GPU, none on the CPU)")
    b.add_argument("--budgets", default=",".join(BENCH_BUDGETS),
                   help=f"--encode: memory budgets to run the trainer under (default: {','.join(BENCH_BUDGETS)}; "
                        "'' for none)")
    b.add_argument("--compile-step", choices=COMPILE_MODES, default=None,
                   help="--encode: torch.compile mode of the compiled-trainer row (default: reduce-overhead on "
                        "CUDA, off on the CPU)")
    b.add_argument("--no-profile", action="store_true", help="--encode: skip the profile of keyframe 0's step")
    b.add_argument("--command-path", action="store_true",
                   help="also time `promptus decode` as a user runs it: fresh processes decoding clips to PNG, .mp4 "
                        "and .webm, weights read from a file (--model random: saved once under "
                        "~/.cache/promptus/bench); wall time, time to first frame, frames/s to disk")
    b.add_argument("--command-only", action="store_true", help="the command path alone (no backend table)")
    b.add_argument("--command-clips", nargs="+", type=int, default=None, metavar="FRAMES",
                   help=f"frames of the command-path clips, k·batch+1 each ({_both('command_clips')})")
    b.add_argument("--command-outputs", nargs="+", default=list(COMMAND_OUTPUTS), choices=list(OUTPUT_KINDS),
                   help=f"outputs of the command path; png6, png1: PNGs at --png-level 6, 1 (default: "
                        f"{' '.join(COMMAND_OUTPUTS)})")
    b.add_argument("--command-backend", default="auto", help="--backend of the timed decodes (default: auto)")
    b.add_argument("--engine-dir", default=None,
                   help="engine folder shared by the command path and the backend table (default: a temporary one)")
    b.add_argument("--json", default=None, help="write the results as JSON here")
    b.set_defaults(func=run)


def resolve_defaults(args: argparse.Namespace, device_type: str) -> list[str]:
    """Fill the options left unset with the defaults for ``device_type``; returns the chosen ones as flags."""
    table = CPU_DEFAULTS if device_type == "cpu" else GPU_DEFAULTS
    skip = _ENCODE_ONLY if not args.encode else _DECODE_ONLY
    if not (getattr(args, "command_path", False) or getattr(args, "command_only", False)):
        skip = (*skip, "command_clips")  # set, but not worth a word when no command path runs
    chosen = []
    for name, value in table.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
            if name not in skip:
                shown = " ".join(map(str, value)) if isinstance(value, list) else value
                chosen.append(f"--{name.replace('_', '-')} {shown}")
    return chosen


def format_encode_table(result: dict) -> str:
    lines = [
        f"encode benchmark — {result['device']}, torch {result['torch']}, model {result['model']}, "
        f"{result['size']}×{result['size']}, T={result['interval']}, rank {result['rank']}, "
        f"perceptual {'on' if result['perceptual'] else 'off'}",
        f"{'procedure':36} {'passes/it':>9} {'ms/it (segment)':>16} {'s/keyframe':>11} {'ms/it (kf 0)':>13} "
        f"{'s keyframe 0':>13} {'peak GiB':>9} {'speedup':>8} {'kf 0':>7} {'clip min':>9}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['procedure']:36} {r['passes_per_iteration']:>9} {r['ms_per_iteration_segment']:>16.1f} "
            f"{r['s_per_keyframe']:>11.1f} {r['ms_per_iteration_first']:>13.1f} {r['s_keyframe0']:>13.1f} "
            f"{r['peak_gib']:>9.2f} {r['speedup']:>7.2f}× {r['speedup_first']:>6.2f}× {r['s_clip'] / 60:>9.1f}"
        )
    lines.append("s/keyframe: a later keyframe at the published 1500 iterations; keyframe 0 at 10 000. "
                 "speedup: per later keyframe, kf 0: per keyframe 0, against the published procedure in this run "
                 f"(the median of its {result.get('baseline_repeats', 1)} timed runs). "
                 f"clip min: a {result.get('clip_frames', 141)}-frame clip at the published iteration counts.")
    lines += [f"baseline flag: {f}" for f in result.get("baseline_flags", [])]
    if result.get("plans"):
        lines.append(f"{'budget':>8} {'plan chosen for a segment':44} {'est. GiB':>9} {'peak GiB':>9} "
                     f"{'reserved':>9} {'ms/it':>7} {'speed':>6} {'clip min':>9}")
        for p in result["plans"]:
            if p["status"] != "ok":
                lines.append(f"{p['budget']:>8} {p['plan']:44} {p['status']}")
                continue
            lines.append(f"{p['budget']:>8} {p['plan']:44} {p['estimated_gib']:>9.2f} {p['peak_gib']:>9.2f} "
                         f"{p['reserved_gib']:>9.2f} {p['ms_per_iteration_segment']:>7.1f} "
                         f"{p['relative_speed']:>6.0%} {p['s_clip'] / 60:>9.1f}")
        lines.append("speed: against the unconstrained eager trainer; keyframe 0 (one frame) fits every budget "
                     "unconstrained. GB = 10^9 bytes; the budget is enforced with the allocator's memory fraction.")
    prof = result.get("profile_first") or {}
    if "error" in prof:
        lines.append(f"profile of keyframe 0's step failed: {prof['error']}")
    elif prof:
        top = ", ".join(f"{name} {ms:.1f}" for name, ms in prof["top_kernels_ms"][:3])
        lines.append(f"keyframe 0 eager step: {prof['wall_ms']:.1f} ms wall, GPU busy {prof['gpu_busy_ms']:.1f} ms "
                     f"({prof['gpu_busy_ms'] / prof['wall_ms']:.0%}), {prof['kernels_per_iteration']:.0f} kernels per "
                     f"iteration; top kernels (ms): {top}")
    if result.get("compile_warmup_s"):
        lines.append("compiled trainer: warm-up (compilation) " + ", ".join(
            f"{kind} {sec:.0f} s" for kind, sec in result["compile_warmup_s"].items()))
    if "compile_error" in result:
        lines.append(f"compiled trainer failed: {result['compile_error']}")
    return "\n".join(lines)


def _num(x, spec: str, width: int, suffix: str = "") -> str:
    """``x`` formatted, or a dash where it was not measured (NaN or None)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'—':>{width}}"
    return f"{format(x, spec) + suffix:>{width}}"


def format_decode_table(result: dict) -> str:
    # Words for the device the run used: a CPU run has no "GPU" column and no fp16 matmul ceiling.
    on = "GPU" if str(result["device"]).startswith("cuda") else str(result["device"]).split()[0].upper()
    ceiling = result.get("matmul_ceiling_tflops")
    limit = (f"measured fp16 matmul ceiling {ceiling:.0f} TFLOP/s → arithmetic limit "
             f"{result['arithmetic_limit_fps']:.0f} FPS" if ceiling is not None and not math.isnan(ceiling)
             else "no matmul ceiling measured on this device")
    w = max([9] + [len(r["backend"]) for r in result["rows"]])  # registered names may be longer than "tensorrt"
    lines = [
        f"decode benchmark — {result['device']}, torch {result['torch']}, model {result['model']}, "
        f"{result['size']}×{result['size']}, batch {result['batch']}, {result['frames_timed']} frames, {result['dtype']}",
        f"FLOPs per batch: UNet {result['unet_tflop_per_batch']:.2f} TFLOP, TAESD decoder "
        f"{result['decoder_tflop_per_batch']:.2f} TFLOP; {limit}",
        f"{'backend':{w}} {'cold s':>7} {'warm s':>7} {'UNet ms':>8} {'TAESD ms':>9} {'segment ms':>11} "
        f"{f'FPS ({on})':>10} {'FPS (host)':>11} {f'host/{on}':>9} {'peak GiB':>9} {'PSNR vs fp32':>13} {'MFU':>6} "
        f"{'speedup':>8}",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:{w}} {r['status']}")
            continue
        lines.append(
            f"{r['backend']:{w}} {_num(r.get('cold_start_s'), '.1f', 7)} {_num(r.get('warm_start_s'), '.1f', 7)} "
            f"{_num(r['unet_ms'], '.2f', 8)} {_num(r['decoder_ms'], '.2f', 9)} {r['segment_ms']:>11.2f} "
            f"{r['fps_gpu']:>10.1f} {r['fps_host']:>11.1f} {r['fps_host'] / r['fps_gpu']:>8.0%} "
            f"{_num(r['peak_gib'], '.2f', 9)} {r['psnr_vs_fp32']:>13.2f} {_num(r['mfu'], '.1%', 6)} "
            f"{_num(r['speedup'], '.2f', 7, '×')}")
    lines.append("cold/warm s: a fresh process making the backend and decoding a 21-frame clip, with an empty engine "
                 "folder (cold) and with the folder the cold one filled (warm); inductor's own caches empty in both. "
                 f"FPS: end to end through the pipelined decoder (parse → {on} → frames), the median of "
                 f"{result.get('baseline_repeats', 1)} timed runs; speedup over eager "
                 f"{result['dtype']} in this run (— without eager); PSNR (of the clip's mean MSE) of the frames of a 21-frame clip against "
                 "the eager fp32 pipeline. —: not measured (the compile and aoti backends run whole segments, not stages).")
    lines += [f"baseline flag: {f}" for f in result.get("baseline_flags", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..backends import resolve_device
    from ..bench import bench_decode, bench_encode
    from ..files import check_output_path

    if args.json:
        check_output_path(args.json, "file")
    device = resolve_device(args.device)
    chosen = resolve_defaults(args, device.type)
    if chosen:
        where = "the CPU: a small workload that finishes in about a minute on two cores" if device.type == "cpu" \
            else device.type
        log.info("bench on %s: %s (options given are used as given)", where, " ".join(chosen))

    if args.encode:
        result = bench_encode(model=args.model, device=str(device), size=args.size, interval=args.interval,
                              rank=args.rank, iters=args.iters, iters_published=args.iters_published,
                              warmup=args.warmup, perceptual=args.perceptual == "on", json_path=args.json,
                              budgets=[b for b in args.budgets.split(",") if b.strip()], compile=args.compile_step,
                              profile=not args.no_profile, baseline_repeats=args.baseline_repeats)
        print(format_encode_table(result))
    else:
        import tempfile

        from ..bench.command import bench_command_path, format_command_table

        with tempfile.TemporaryDirectory(prefix="promptus-bench-engines-") as tmp:
            engine_dir = args.engine_dir or tmp  # the command path's cold run builds what the table then loads
            result: dict = {}
            if args.command_path or args.command_only:
                # First, while no model of this process occupies the GPU.
                bench_command_path(model=args.model, device=str(device), size=args.size, batch=args.batch,
                                   clips=args.command_clips, outputs=args.command_outputs,
                                   backend=args.command_backend, engine_dir=engine_dir, json_path=args.json,
                                   result=result)
                print(format_command_table(result["command_path"]), flush=True)
            if not args.command_only:
                starts = args.starts if args.starts is not None else (["none"] if device.type == "cpu" else ["all"])
                table = bench_decode(model=args.model, device=str(device), size=args.size, batch=args.batch,
                                     backends=args.backends, keyframes=args.keyframes, json_path=None,
                                     starts=True if "all" in starts else [b for b in starts if b != "none"],
                                     engine_dir=engine_dir, baseline_repeats=args.baseline_repeats)
                result = {**table, **result}
                if args.json:
                    from ..files import write_json_atomic

                    write_json_atomic(args.json, result)
                print(format_decode_table(result))
    return 0
