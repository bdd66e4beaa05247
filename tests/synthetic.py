"""Clips made in code for tests, so that no video file is needed."""

from __future__ import annotations

import numpy as np
import torch


def synthetic_clip(frame_count: int, width: int = 64, height: int = 64, seed: int = 0) -> torch.Tensor:
    """A small deterministic test clip (uint8 N×H×W×3): a sky gradient with a drifting disc.

    Made in code so that tests and demos need no video files.
    """
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([60 + 100 * yy / height, 120 + 80 * yy / height, 200 + 40 * xx / width], -1)
    cx0, cy0 = rng.uniform(0.2, 0.4) * width, rng.uniform(0.3, 0.7) * height
    r = 0.18 * min(width, height)
    frames = []
    for t in range(frame_count):
        cx, cy = cx0 + 0.02 * width * t, cy0 + 0.01 * height * np.sin(t / 4)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img = base.copy()
        img[disc] = (240, 200, 80)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(frames))
