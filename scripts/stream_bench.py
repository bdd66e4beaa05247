"""Many real-time streams on one GPU: aggregate FPS, per-stream rate, latency, admission.

    python scripts/stream_bench.py --streams 1 2 4 8 12 16 --json benchmarks/stream_h200.json
    python scripts/stream_bench.py --devices all --json benchmarks/stream_devices.json

With --devices, one server's schedulers on the first device and then on every listed
device (as ``promptus serve --devices``): real-time streams admitted and served, p95 latency.

Full-size SD-Turbo architecture with random weights (the cost does not depend on
the weights) unless --model names real ones; see promptus.streaming.bench.
"""

import argparse
import sys

from promptus.errors import PromptusError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16], help="stream counts to run")
    p.add_argument("--backend", default="compile", help="decoder backend (default: compile)")
    p.add_argument("--model", default="random", help="'random' (full size, random weights), 'tiny', or weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="'all' or a list such as cuda:0,cuda:1: measure the first device alone, then the list")
    p.add_argument("--max-streams", type=int, default=64, help="with --devices: streams opened at most (default: 64)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of every stream (default: 30)")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each run (default: 6)")
    p.add_argument("--headroom", type=float, default=0.9, help="share of the capacity admission may promise")
    p.add_argument("--no-lever", action="store_true", help="skip the batch-size measurement")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import logging

    import torch

    from promptus.backends import resolve_device, resolve_devices
    from promptus.files import write_json_atomic
    from promptus.models import full_size_random_models, load_models
    from promptus.streaming.bench import bench_stream_devices, bench_streams, format_devices_table, format_table

    logging.basicConfig(level=logging.INFO, format="stream-bench: %(message)s")
    try:
        devices = resolve_devices(args.devices) if args.devices else None
        dev = devices[0] if devices else resolve_device(args.device)
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        models = (full_size_random_models(dev, dtype) if args.model == "random"
                  else load_models(args.model, device=dev, dtype=dtype, vae=False))
        if devices:
            lists = [devices[:1], devices] if len(devices) > 1 else [devices]
            runs = [bench_stream_devices(d, models, backend=args.backend, size=args.size, interval=args.interval,
                                         fps=args.fps, seconds=args.seconds, headroom=args.headroom,
                                         max_streams=args.max_streams) for d in lists]
            result = {"runs": runs, "served_ratio": (runs[-1]["served_realtime"] / runs[0]["served_realtime"]
                                                     if runs[0]["served_realtime"] else None)}
            table = format_devices_table(runs)
        else:
            result = bench_streams(models, dev, backend=args.backend, size=args.size, interval=args.interval,
                                   fps=args.fps, counts=args.streams, seconds=args.seconds, headroom=args.headroom,
                                   lever=not args.no_lever)
            table = format_table(result)
    except PromptusError as e:
        print(f"stream_bench: error: {e}", file=sys.stderr)
        return 1
    result["command"] = "python scripts/stream_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table)
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
