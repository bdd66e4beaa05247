"""Derive the constants of promptus.memory's peak-memory model, on the CPU, in about a minute.

Runs the encoder's real training step (promptus.encoder.TrainingStep: UNet → TAESD
decoder → loss → backward) on the full-size SD-Turbo UNet, TAESD and VGG-19 built on
PyTorch's "meta" device, where tensors have shapes but no data, under a dispatch mode
that tracks the bytes of live tensors. Precisions as on CUDA: fp16 UNet and TAESD,
bf16 VGG; attention is routed to the memory-efficient kernel that CUDA uses (it keeps
no attention matrix). For every checkpoint set it measures the peak above the
resident weights for 1 and 2 frames (fixed + per frame), checks the line at 10
frames, and prints the table that promptus/memory.py holds, plus the forward FLOPs
of each network and the bytes of one frame's kept target features.

    python3 benchmarks/encode_memory_model.py [--size 512] [--json benchmarks/encode_memory_model.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptus.encoder import TrainingStep  # noqa: E402
from promptus.losses import InversionLoss, PerceptualLoss, VGG19Features  # noqa: E402
from promptus.memory import CHECKPOINTABLE, GIB, MemoryPlan  # noqa: E402
from promptus.models import sd_turbo_unet_config, taesd_config  # noqa: E402
from promptus.schedule import OneStep  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created under it that are alive at once (storages, counted once)."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.live, self.now, self.peak = exclude, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live and ref.cdata not in self.exclude:
                    n = t.untyped_storage().nbytes()
                    self.live[ref.cdata] = (ref, n)
                    self.now += n
        self.peak = max(self.peak, self.now)
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        return out


def efficient_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """What SDPA runs on CUDA in fp16: keeps the output and log-sum-exp, not the attention matrix."""
    assert attn_mask is None and not is_causal
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[0]


def build(perceptual: bool):
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sd_turbo_unet_config()).half().requires_grad_(False)
        taesd = AutoencoderTiny.from_config(taesd_config()).half().requires_grad_(False)
        vgg = VGG19Features().to(torch.bfloat16).requires_grad_(False) if perceptual else None
    loss = InversionLoss(PerceptualLoss(vgg).to("meta") if vgg is not None else None)
    step = TrainingStep(unet, taesd.decoder, loss, OneStep.at(999), torch.float16, contextlib.nullcontext)
    resident = {StorageWeakRef(t.untyped_storage()).cdata
                for m in (unet, taesd, loss) for t in (*m.parameters(), *m.buffers())}
    return step, resident


def peak(step, resident, frames: int, size: int, checkpoint: tuple[str, ...]) -> int:
    h = size // 8
    with LiveBytes(resident) as tracker:
        z = torch.zeros(frames, 4, h, h, device="meta", dtype=torch.float16)
        t = torch.full((frames,), 999, device="meta", dtype=torch.long)
        targets = torch.zeros(frames, 3, size, size, device="meta")
        feats = step.target_features(targets)  # kept: counted, then subtracted below
        feat_bytes = sum(f.untyped_storage().nbytes() for f in feats) if feats else 0
        ctx = torch.zeros(frames, 77, 1024, device="meta", requires_grad=True)
        base = tracker.now
        tracker.peak = base
        step(MemoryPlan(checkpoint=checkpoint), z, t, ctx * 1, targets, feats, torch.ones(frames, device="meta"),
             lambda x: x)
    return tracker.peak - base, feat_bytes


def forward_tflop(size: int) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = build(True)
    h = size // 8
    out = {}
    with torch.no_grad():
        z = torch.zeros(1, 4, h, h, device="meta", dtype=torch.float16)
        c = torch.zeros(1, 77, 1024, device="meta", dtype=torch.float16)
        for name, fn in (("unet", lambda: step.unet(z, torch.tensor([999], device="meta"), encoder_hidden_states=c)),
                         ("decoder", lambda: step.decoder(z)),
                         ("loss", lambda: step.loss_fn.perceptual.vgg(torch.zeros(1, 3, size, size, device="meta",
                                                                                  dtype=torch.bfloat16)))):
            with FlopCounterMode(display=False) as fc:
                fn()
            out[name] = fc.get_total_flops() / 1e12
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    F.scaled_dot_product_attention = efficient_attention
    rows, feat_per_frame = [], None
    for perceptual in (True, False):
        step, resident = build(perceptual)
        parts = CHECKPOINTABLE if perceptual else tuple(c for c in CHECKPOINTABLE if c != "loss")
        for r in range(len(parts) + 1):
            for ckpt in combinations(parts, r):
                p1, f1 = peak(step, resident, 1, args.size, ckpt)
                p2, _ = peak(step, resident, 2, args.size, ckpt)
                p10, _ = peak(step, resident, 10, args.size, ckpt)
                per_frame, fixed = p2 - p1, 2 * p1 - p2
                if perceptual:
                    feat_per_frame = f1
                rows.append({"perceptual": perceptual, "checkpoint": list(ckpt), "fixed_gib": fixed / GIB,
                             "per_frame_gib": per_frame / GIB, "peak10_gib": p10 / GIB,
                             "line10_gib": (fixed + 10 * per_frame) / GIB})
                print(f"perceptual {'on ' if perceptual else 'off'} checkpoint {'+'.join(ckpt) or '-':20} "
                      f"fixed {fixed / GIB:6.3f} GiB  per frame {per_frame / GIB:6.3f} GiB  "
                      f"10 frames {p10 / GIB:6.2f} GiB (line: {(fixed + 10 * per_frame) / GIB:6.2f})", flush=True)
    flops = forward_tflop(args.size)
    print(f"target features kept per frame: {feat_per_frame} bytes; forward TFLOP per frame: "
          + ", ".join(f"{k} {v:.3f}" for k, v in flops.items()))
    print("ACTIVATIONS = {")
    for r in rows:
        print(f"    ({r['perceptual']}, {tuple(r['checkpoint'])!r}): "
              f"({r['fixed_gib']:.3f} * GIB, {r['per_frame_gib']:.3f} * GIB),")
    print("}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "rows": rows, "target_feature_bytes": feat_per_frame,
                                               "forward_tflop": flops, "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
