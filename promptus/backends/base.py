"""What the decoder needs from a backend: one call per segment, :meth:`Backend.segment`.

``segment(z_prev, noise, mix, context, onestep) → (x0 of the last frame, uint8 frames)``
runs the whole segment step — mix → UNet → x0 → TAESD decoder → uint8 — so that a
backend can capture or compile it as one unit (CUDA graphs, inductor, TensorRT
engines). The base class builds it from two primitives, :meth:`Backend.denoise`
(the UNet) and :meth:`Backend.decode` (the TAESD decoder), which subclasses
implement; fast backends override :meth:`Backend.segment` itself. Backends run at a
fixed device and precision, are prepared for one clip's batch (its interval) and
frame size by :func:`promptus.backends.make_backend`, and know nothing of
bitstreams. Latent arithmetic (mixing, x0) is float32 at the boundary; a backend
casts inside. See docs/design.md, "Backends".
"""

from __future__ import annotations

import contextlib

import torch

from ..config import PARITY_OURS
from ..schedule import OneStep, mix_latent, to_uint8


class Backend:
    """Base class of the backends; :meth:`segment` is what the decoder (and the encoder's closed loop) calls.

    Subclasses implement :meth:`denoise` and :meth:`decode` (the benchmark times
    them separately); :meth:`segment` composes them, and fast backends override it
    with a fused, compiled or graph-captured version of the same step.
    """

    name = "base"
    #: Whose numerics the frames follow (:data:`promptus.config.PARITIES`).
    parity = PARITY_OURS
    #: The prompt and latent shapes the networks accept (a models.ModelGeometry), set by
    #: make_backend; decoders check a clip's header against it before sizing anything.
    geometry = None

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype
        self._mixes: dict[tuple, torch.Tensor] = {}

    def _mix_tensor(self, mix: float, like: torch.Tensor) -> torch.Tensor:
        """The mix weight as a 0-d tensor of ``like``'s dtype on the device, made once per value: a tensor made
        from a Python number on a GPU is a blocking copy (and cannot be captured in a CUDA graph)."""
        key = (float(mix), like.dtype)
        m = self._mixes.get(key)
        if m is None:
            m = self._mixes[key] = torch.tensor(mix, dtype=like.dtype, device=self.device)
        return m

    def denoise(self, z: torch.Tensor, timestep: int, context: torch.Tensor) -> torch.Tensor:
        """Predicted noise ε̂ (float32, B×4×h×w) for UNet input ``z`` and prompts ``context`` (B×77×1024)."""
        raise NotImplementedError

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """TAESD decoder image in [-1, 1] (float32, B×3×H×W) for clean latents ``latent``."""
        raise NotImplementedError

    def step(self, z: torch.Tensor, context: torch.Tensor, onestep: OneStep) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet → x0 → decoder → uint8 for inputs ``z`` (B×4×h×w float32): (x0 float32, frames uint8 B×H×W×3)."""
        eps = self.denoise(z, onestep.timestep, context)
        x0 = onestep.x0(z, eps)
        return x0, to_uint8(self.decode(x0))

    def segment(self, z_prev: torch.Tensor, noise: torch.Tensor, mix: float, context: torch.Tensor,
                onestep: OneStep) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment: every frame starts from ``z = mix·z_prev + (1 − mix)·noise`` (1×4×h×w, float32)
        with its own prompt (``context`` B×77×1024). Returns (x0 of the last frame 1×4×h×w float32,
        frames uint8 B×H×W×3), both on the device; the frames stay valid after the next call."""
        z = mix_latent(z_prev, noise, mix).expand(context.shape[0], -1, -1, -1)
        x0, frames = self.step(z, context, onestep)
        return x0[-1:].float(), frames

    def precision(self):
        """Context the decoder computes prompt embeddings in (the release-parity backend: CUDA autocast)."""
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"{self.name} ({self.device.type}, {str(self.dtype).removeprefix('torch.')})"
