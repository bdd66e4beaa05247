"""What the decoder needs from a backend: ``denoise`` and ``decode``.

Backends run the two network components at a fixed device and precision. They
know nothing of bitstreams. Latent arithmetic (mixing, x0) stays in float32 at the
decoder; a backend casts at its own boundary.
"""

from __future__ import annotations

import torch

from ..schedule import OneStep, to_uint8


class Backend:
    """Base class: subclasses implement :meth:`denoise` and :meth:`decode`.

    ``step`` chains them into one segment step (UNet → x0 → decoder → uint8);
    fast backends may override it with a fused or graph-captured version.
    """

    name = "base"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype

    def denoise(self, z: torch.Tensor, timestep: int, context: torch.Tensor) -> torch.Tensor:
        """Predicted noise ε̂ (float32, B×4×h×w) for UNet input ``z`` and prompts ``context`` (B×77×1024)."""
        raise NotImplementedError

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """TAESD decoder image in [-1, 1] (float32, B×3×H×W) for clean latents ``latent``."""
        raise NotImplementedError

    def step(self, z: torch.Tensor, context: torch.Tensor, onestep: OneStep) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment: returns (x0 float32 B×4×h×w, frames uint8 B×H×W×3), both on the device."""
        eps = self.denoise(z, onestep.timestep, context)
        x0 = onestep.x0(z, eps)
        return x0, to_uint8(self.decode(x0))

    def describe(self) -> str:
        return f"{self.name} ({self.device.type}, {str(self.dtype).removeprefix('torch.')})"
