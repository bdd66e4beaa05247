"""The published inversion loop, emulated: the baseline of ``promptus bench --encode``.

``published``: the release's loop (docs/design.md, "The method"; inversion.py of the public
release): every frame of a segment is its own batch-1 forward and backward pass
under fp16 autocast with fp32 weights, followed by its own Adam step; the worst
frame is trained twice more per iteration (T + 2 passes); the UNet and TAESD
weights keep ``requires_grad`` as released, so every backward also computes
weight gradients; VGG features of the real frame are recomputed every pass and
the loss is read back to the host every pass (the release prints it). Disk I/O of
the release (re-reading the frame PNG every pass, a PNG every 10 iterations, a
checkpoint on every improvement) is left out, which favours the published side.
``frozen=True``: the same loop with frozen weights, to show how much of the gain is
batching rather than skipping weight gradients.
"""

from __future__ import annotations

import time

import torch

from ..config import CodecConfig, TrainConfig
from .common import sync, targets as make_targets


def published_iteration(models, vgg, U, V, ranges, opt, z, targets, prev, onestep, interval, steps):
    """One iteration of the release's loop: one batch-1 pass and Adam step per entry of ``steps``."""
    from ..prompts import embedding, fake_quantize

    device = z.device
    t = torch.tensor([onestep.timestep], device=device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    for s in steps:
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            ranges[0].update(U)
            ranges[1].update(V)
            Qu, Qv = fake_quantize(U, *ranges[0].params()), fake_quantize(V, *ranges[1].params())
            if prev is None:
                c = embedding(Qu, Qv)[None]
                gt = targets[:1]
            else:
                w = s / interval
                c = embedding((1 - w) * prev[0] + w * Qu, (1 - w) * prev[1] + w * Qv)[None]
                gt = targets[s - 1:s]
            eps = models.unet(z, t, encoder_hidden_states=c).sample
            x = models.taesd.decoder(onestep.x0(z, eps))
            perc = 0.0  # --perceptual off
            if vgg is not None:
                feats = vgg(((torch.cat([gt, x]) + 1) / 2 - mean) / std)
                perc = sum(torch.nn.functional.mse_loss(f[1:].float(), f[:1].float()) for f in feats) / len(feats)
            loss = 0.2 * perc + 0.8 * torch.nn.functional.mse_loss(x.float(), gt) + 0.1 * c.abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        models.unet.zero_grad()
        models.taesd.zero_grad()
        # The release prints loss, c.max(), c.mean() and c.std() after every pass.
        _ = (loss.item(), c.max().item(), c.mean().item(), c.std().item())


def time_published(models, vgg, size, interval, rank, iters, warmup, device, frozen: bool) -> tuple[float, float]:
    from ..prompts import RunningRange
    from ..schedule import OneStep, make_noise

    models.unet.requires_grad_(not frozen)
    models.taesd.requires_grad_(not frozen)
    cfg = CodecConfig(width=size, height=size, rank=rank, interval=interval)
    onestep = OneStep.at(cfg.timestep)
    z = make_noise(cfg).to(device)
    targets = make_targets(size, interval, device)
    g = torch.Generator().manual_seed(0)
    prev = (torch.rand(cfg.tokens, rank, generator=g).to(device), torch.rand(rank, cfg.embed_dim, generator=g).to(device))
    out = []
    for first in (False, True):
        U = torch.rand(cfg.tokens, rank, generator=g).to(device).requires_grad_()
        V = torch.rand(rank, cfg.embed_dim, generator=g).to(device).requires_grad_()
        opt = torch.optim.Adam([U, V], lr=TrainConfig.lr)
        ranges = (RunningRange(), RunningRange())
        # T frames plus the worst frame twice more, as the release's step_list.
        steps = [0] if first else sorted(list(range(1, interval + 1)) + [interval] * 2)
        args = (models, vgg, U, V, ranges, opt, z, targets, None if first else prev, onestep, interval, steps)
        for _ in range(warmup):
            published_iteration(*args)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            published_iteration(*args)
        sync(device)
        out.append(1000 * (time.perf_counter() - t0) / iters)
    models.unet.requires_grad_(False)
    models.taesd.requires_grad_(False)
    return out[0], out[1]

