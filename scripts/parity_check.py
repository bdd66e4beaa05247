"""Release parity on a GPU: how far our default decoder's frames lie from the release's numerics.

    python scripts/parity_check.py [--device cuda] [--frames 31] [--size 512] [--json-dir benchmarks]

Decodes one random bitstream (rank 8, interval 10) with the full-size SD-Turbo UNet
and TAESD with random weights (no weights needed; TAESD's output layer is rescaled so
that the frames have contrast, as the tiny test model does) in these modes:

  ours           the default: fp16 weights, batch T per UNet call (torch backend), rounding
  release        parity="release": fp32 weights under autocast, one frame per call, truncation
  release-round  release numerics with our rounding (isolates the uint8 conversion)
  release-gn32   release without the fp16 cast after the ResNet GroupNorms (isolates that detail)

and prints the PSNR between pairs of modes (inf: identical), the share of values that
differ and the decode time; writes parity_<gpu>.json into --json-dir.
"""

import argparse
import contextlib
import copy
import math
import re
import sys
import time
from pathlib import Path

import torch

from promptus.backends import ReleaseParityBackend, backend_for_clip, resolve_device
from promptus.bitstream import Bitstream, Header, InitLatent, Keyframe
from promptus.config import CodecConfig
from promptus.decoder import Decoder
from promptus.files import write_json_atomic
from promptus.models import full_size_random_models, tiny_models
from promptus.prompts import embedding, quantize_tensor
from promptus.schedule import OneStep, make_noise, mix_latent, to_uint8


class ReleaseRounding(ReleaseParityBackend):
    name = "release-round"
    to_uint8 = staticmethod(to_uint8)


class ReleaseWithoutGroupNorm32(ReleaseParityBackend):
    name = "release-gn32"

    def _groupnorm_like_release(self):
        return contextlib.nullcontext()


def random_bitstream(models, frames: int, size: int, seed: int = 0) -> Bitstream:
    cfg = CodecConfig(width=size, height=size, rank=8, interval=10)
    g = torch.Generator().manual_seed(seed)
    kfs = [Keyframe(index=k * cfg.interval, U_q=quantize_tensor(torch.randn(cfg.tokens, cfg.rank, generator=g)),
                    V_q=quantize_tensor(torch.randn(cfg.rank, cfg.embed_dim, generator=g)))
           for k in range(cfg.keyframe_count(frames))]
    init = InitLatent.from_array(torch.randn(cfg.latent_shape, generator=g).numpy(), "fp32")
    return Bitstream(Header(cfg, frames, models.identity()), init, kfs)


@torch.no_grad()
def give_contrast(models, bs, device, target_std: float = 0.5) -> float:
    """Scale TAESD's last layer so that frame 0's image (in [-1, 1]) has std ``target_std``; returns the gain."""
    last = models.taesd.decoder.layers[-1]
    last.bias.fill_(0.5)  # TAESD's image is in [0, 1] before the decoder maps it to [-1, 1]
    cfg, o = bs.header.config, OneStep.at(bs.header.config.timestep)
    z = mix_latent(bs.init.to_torch().to(device), make_noise(cfg).to(device), cfg.mix)
    c = embedding(bs.keyframes[0].U.to(device), bs.keyframes[0].V.to(device))[None]
    x0 = o.x0(z, models.unet(z, torch.tensor([o.timestep], device=device), encoder_hidden_states=c).sample)
    gain = target_std / float(models.taesd.decoder(x0).std())
    last.weight.mul_(gain)
    return gain


def decode(decoder, bs, device) -> tuple[torch.Tensor, float]:
    decoder.decode_all(bs)  # warm-up: CUDA graph capture, cuDNN algorithm choice
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    frames = decoder.decode_all(bs)
    return frames, time.perf_counter() - t0


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = a.int() - b.int()
    mse = d.float().pow(2).mean().item()
    per_frame = d.float().pow(2).flatten(1).mean(1)
    worst = per_frame.max().item()
    return {"psnr": float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse),
            "worst_frame_psnr": float("inf") if worst == 0 else 10 * math.log10(255.0**2 / worst),
            "differ": (d != 0).float().mean().item(), "mean_diff": d.float().mean().item(),
            "max_abs_diff": d.abs().max().item()}


def gpu_tag(name: str) -> str:
    m = re.search(r"(H100|H200|A100|L40S|L4|B200|GH200)", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="random", choices=["random", "tiny"],
                   help="random: the full-size architecture; tiny: the test model (a quick check of this script)")
    p.add_argument("--frames", type=int, default=31)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--json-dir", default="benchmarks")
    a = p.parse_args()
    dev = resolve_device(a.device)
    if dev.type != "cuda":
        print("note: on the CPU autocast does nothing; the CUDA numerics need a GPU", file=sys.stderr)
    # The release keeps fp32 weights.
    models = full_size_random_models(dev, torch.float32) if a.model == "random" else tiny_models().to(dev)
    bs = random_bitstream(models, a.frames, a.size)
    gain = give_contrast(models, bs, dev)
    ours_models = copy.deepcopy(models)  # the torch backend casts its modules to fp16 in place

    frames, times = {}, {}
    ours = Decoder(backend_for_clip(bs.header, ours_models, name="torch", device=dev))
    frames["ours"], times["ours"] = decode(ours, bs, dev)
    for cls in (ReleaseParityBackend, ReleaseRounding, ReleaseWithoutGroupNorm32):
        backend = cls(models.unet, models.taesd.decoder, dev)
        frames[cls.name], times[cls.name] = decode(Decoder(backend), bs, dev)
    again = Decoder(ReleaseParityBackend(models.unet, models.taesd.decoder, dev)).decode_all(bs)

    pairs = {
        "ours vs release": compare(frames["ours"], frames["release"]),
        "release vs release-round (uint8 conversion alone)": compare(frames["release-round"], frames["release"]),
        "ours vs release-round (precision and batch alone)": compare(frames["ours"], frames["release-round"]),
        "release vs release-gn32 (fp16 GroupNorm output alone)": compare(frames["release-gn32"], frames["release"]),
        "release vs release, run twice": compare(again, frames["release"]),
    }
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "model": a.model,
              "taesd_gain": gain, "frames": a.frames, "size": a.size, "rank": 8, "interval": 10,
              "frame_std": {k: float(v.float().std()) for k, v in frames.items()},
              "decode_s": times, "pairs": pairs,
              "command": "python scripts/parity_check.py " + " ".join(sys.argv[1:])}
    print(f"{name}, {a.frames} frames at {a.size}px, random weights (frame std {result['frame_std']['release']:.1f})")
    print(f"{'pair':56s} {'PSNR dB':>8s} {'worst':>7s} {'differ':>7s} {'mean':>6s} {'max':>4s}")
    for k, v in pairs.items():
        print(f"{k:56s} {v['psnr']:8.2f} {v['worst_frame_psnr']:7.2f} {v['differ']:7.2%} {v['mean_diff']:6.3f} "
              f"{v['max_abs_diff']:4d}")
    print("decode time: " + ", ".join(f"{k} {v:.2f} s ({a.frames / v:.0f} frame/s)" for k, v in times.items()))
    out = Path(a.json_dir) / f"parity_{gpu_tag(name)}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
