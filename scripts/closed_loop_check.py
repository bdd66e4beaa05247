"""Closed-loop check on any device: encode a short clip, decode the file, compare.

    python scripts/closed_loop_check.py [--model random|tiny|PATH] [--device cuda] [--size 512]

Prints the PSNR of the decoder's frames against the encoder's closed-loop
reconstruction (the target is ≥ 50 dB; inf means identical), whether any frame is
non-finite, and the encode time. 'random' is the full-size architecture with random
weights (no weights needed).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from promptus.backends import backend_for_clip, default_dtype, resolve_device
from promptus.bitstream import read
from promptus.config import CodecConfig, TrainConfig
from promptus.decoder import Decoder
from promptus.encoder import Encoder
from promptus.files import write_json_atomic
from promptus.metrics import clip_psnr
from promptus.models import full_size_random_models, load_models
from promptus.video import sky_clip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=CodecConfig.width)
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--backends", nargs="+", default=["eager"],
                   help="decoder backends to compare with the encoder's closed loop (which runs eager)")
    p.add_argument("--encoder-backend", default="eager", help="the encoder's closed-loop backend (default: eager)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dev = resolve_device(a.device)
    dtype = default_dtype(dev)
    models = full_size_random_models(dev, dtype) if a.model == "random" else load_models(a.model, device=dev, dtype=dtype, vae=False)
    codec = CodecConfig(width=a.size, height=a.size)
    train = TrainConfig(iters_first=a.iters, iters=a.iters, perceptual=False, init_latent="taesd")
    clip = torch.from_numpy(sky_clip(a.frames, a.size))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "c.promptus"
        t0 = time.perf_counter()
        closed_loop = backend_for_clip(codec, models, name=a.encoder_backend, device=dev)
        res = Encoder(codec, train, models, device=dev, progress=False, backend=closed_loop).encode(clip, out)
        t_enc = time.perf_counter() - t0
        bs = read(out)
        per_backend = {}
        for name in a.backends:
            backend = backend_for_clip(bs.header, models, name=name, device=dev)
            t0 = time.perf_counter()
            decoded = Decoder(backend, models.identity()).decode_all(bs)
            per_backend[name] = {"psnr_vs_encoder": clip_psnr(res.reconstruction, decoded),
                                 "identical": bool(torch.equal(decoded, res.reconstruction)),
                                 "decode_s": time.perf_counter() - t0}
    r = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "model": a.model,
         "dtype": str(dtype), "frames": a.frames, "size": a.size, "frame_std": float(res.reconstruction.float().std()),
         "encoder_backend": a.encoder_backend, "encode_s": t_enc, "bytes": res.bytes, "backends": per_backend}
    print(json.dumps(r, indent=1))
    if a.json:
        write_json_atomic(a.json, r)
    return 0 if per_backend[a.backends[0]]["psnr_vs_encoder"] >= 50 else 1


if __name__ == "__main__":
    sys.exit(main())
