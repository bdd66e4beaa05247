"""What every benchmark shares: device synchronisation, peak memory, timing a call, the models and test targets."""

from __future__ import annotations

import math
import time

import torch



def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def targets(size: int, n: int, device) -> torch.Tensor:
    from ..schedule import to_model_range
    from ..video import sky_clip

    return to_model_range(torch.from_numpy(sky_clip(n, size))).to(device)



def time_call(fn, device, reps: int) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return 1000 * (time.perf_counter() - t0) / reps



def models_for_bench(model: str, dev: torch.device):
    from ..models import full_size_random_models, load_models

    return (full_size_random_models(dev, torch.float32) if model == "random"
            else load_models(model, device=dev, dtype=torch.float32, vae=False))

