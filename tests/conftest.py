"""Shared fixtures: tiny random-weight models and legacy prompt folders built in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny():
    from promptus.models import tiny_models

    return tiny_models()


def make_legacy_folder(folder, *, keyframes=3, interval=4, rank=2, latent=8, seed=0, tokens=77, dim=1024):
    """A folder in the public release's layout, written with torch.save like the release does.

    Returns the dict of originals {index: {...}} and the init latent.
    """
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    originals = {}
    for k in range(keyframes):
        d = {}
        for name, shape in (("U", (tokens, rank)), ("V", (rank, dim))):
            x = torch.randn(shape, generator=g) * (k + 1)
            lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
            scale = torch.tensor((hi - lo) / 255, dtype=torch.float32)
            zp = torch.round(torch.clamp(255 - hi / scale, 0, 255))
            d[name] = torch.clamp(torch.round(x / scale + zp), 0, 255).to(torch.uint8)
            d[f"{name}_scale"] = scale
            d[f"{name}_zero_point"] = zp
        torch.save(d, folder / f"frame_{k * interval:05d}.prompt")
        originals[k * interval] = d
    init = torch.randn(1, 4, latent, latent, generator=g)
    torch.save(init, folder / "init.pth")
    return originals, init


def release_dequantize(d, name):
    """The release's own arithmetic: scale · (q − zero_point) on tensors."""
    return d[f"{name}_scale"] * (d[name] - d[f"{name}_zero_point"])


@pytest.fixture
def legacy_folder(tmp_path):
    folder = tmp_path / "rank2_interval4"
    originals, init = make_legacy_folder(folder)
    return folder, originals, init


def np_equal(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))
