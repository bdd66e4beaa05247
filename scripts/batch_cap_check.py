"""MAX_BATCH_PIXELS on a GPU: a clip with an interval above the cap, decoded by the torch backend prepared
the old way (batch = the interval) and the new way (backend_for_clip: batch = segment_batch).

    python scripts/batch_cap_check.py [--model random|tiny] [--device cuda] [--size 512] [--interval 100]
                                      [--json benchmarks/batch_cap_h100.json]
    python scripts/batch_cap_check.py --model tiny --device cpu --size 64 --interval 8 --max-batch-pixels 12288

Prints, per preparation, the batch sizes the backend ran (the CUDA graphs it captured), the peak
GPU memory, the decode time and the largest difference between the two decodes' frames. On the
CPU (a dry run) the torch backend pads as on CUDA but without graphs.
"""

import argparse
import sys
import time

import torch

from promptus.backends import TorchBackend, backend_for_clip, clip_batch, make_backend, resolve_device
from promptus.bench import random_bitstream
from promptus.config import CodecConfig
from promptus.decoder import Decoder
from promptus.files import write_json_atomic
from promptus.models import full_size_random_models, tiny_models


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random", choices=["random", "tiny"])
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=CodecConfig.width)
    p.add_argument("--interval", type=int, default=100)
    p.add_argument("--keyframes", type=int, default=3)
    p.add_argument("--max-batch-pixels", type=int, default=None,
                   help="override promptus.config.MAX_BATCH_PIXELS (a CPU dry run at a small size)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.max_batch_pixels:
        import promptus.config

        promptus.config.MAX_BATCH_PIXELS = a.max_batch_pixels
    dev = resolve_device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    models = (full_size_random_models(dev, dtype) if a.model == "random" else tiny_models().to(dev, dtype))
    clip = random_bitstream(CodecConfig(width=a.size, height=a.size, interval=a.interval), a.keyframes,
                            identity=models.identity())
    rows, frames = [], {}
    for how, batch in (("interval (old call sites)", a.interval), ("backend_for_clip", clip_batch(clip))):
        if dev.type == "cuda":
            backend = (make_backend("torch", models, dev, batch=batch, size=a.size) if batch == a.interval
                       else backend_for_clip(clip, models, name="torch", device=dev))
        else:  # the CPU torch backend does not pad; pad as on CUDA to show the shapes
            backend = TorchBackend(models.unet, models.taesd.decoder, dev, dtype, batch=batch)
        ran = []
        run = backend._run_segment
        backend._run_segment = lambda zp, n, m, c, o: ran.append(c.shape[0]) or run(zp, n, m, c, o)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        frames[how] = Decoder(backend).decode_all(clip)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        rows.append({"prepared_for": how, "backend_batch": batch, "batches_run": sorted(set(ran)),
                     "calls": len(ran), "peak_gib": peak, "decode_s": seconds})
        del backend
    a_frames, b_frames = frames.values()
    diff = int((a_frames.int() - b_frames.int()).abs().max())  # batch size changes kernel choice: ±1 at most
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "model": a.model, "size": a.size, "interval": a.interval, "frames": clip.header.frame_count,
              "segment_batch": clip_batch(clip), "rows": rows, "max_frame_difference": diff,
              "command": "python scripts/batch_cap_check.py " + " ".join(sys.argv[1:])}
    print(f"{result['device']}, {a.model}, {a.size} px, interval {a.interval}, {result['frames']} frames; "
          f"segment_batch {result['segment_batch']}")
    print(f"{'prepared for':28} {'batch':>6} {'batches run':>16} {'peak GiB':>9} {'decode s':>9}")
    for r in rows:
        print(f"{r['prepared_for']:28} {r['backend_batch']:>6} {str(r['batches_run']):>16} {r['peak_gib']:>9.2f} "
              f"{r['decode_s']:>9.2f}")
    print(f"largest difference between the two decodes' frames: {diff} (of 255)")
    if a.json:
        write_json_atomic(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
