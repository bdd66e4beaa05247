"""The one-step math of SD-Turbo (docs/design.md, "The method"), as pure functions.

Nothing here holds a model. The constants are derived from SD-2.x's
"scaled linear" DDPM schedule, never pasted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import NOISE_NUMPY_RANDN, CodecConfig
from .errors import PromptusError

BETA_START = 0.00085
BETA_END = 0.012
TRAIN_STEPS = 1000


def alphas_cumprod(beta_start: float = BETA_START, beta_end: float = BETA_END,
                   steps: int = TRAIN_STEPS) -> np.ndarray:
    """ᾱ_t of the scaled-linear schedule: β linear in √β from √β_start to √β_end, float64."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@dataclass(frozen=True)
class OneStep:
    """Constants of the single denoising step at ``timestep``.

    ``sigma = sqrt((1 − ᾱ_t)/ᾱ_t)``, ``c_in = 1/sqrt(1 + σ²)``, ``c_out = −σ``;
    the clean latent is ``x0 = z / c_in + c_out · ε̂``.
    """

    timestep: int
    sigma: float
    c_in: float
    c_out: float

    @classmethod
    def at(cls, timestep: int = 999) -> "OneStep":
        if not 0 <= timestep < TRAIN_STEPS:
            raise PromptusError(f"timestep {timestep} is outside the schedule's 0..{TRAIN_STEPS - 1}")
        a = float(alphas_cumprod()[timestep])
        sigma = math.sqrt((1.0 - a) / a)
        return cls(timestep=timestep, sigma=sigma, c_in=1.0 / math.sqrt(1.0 + sigma * sigma), c_out=-sigma)

    def x0(self, z: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        """Clean latent from the UNet input ``z`` and its noise prediction ``eps_hat``."""
        return z / self.c_in + self.c_out * eps_hat


def make_noise(config: CodecConfig) -> torch.Tensor:
    """The fixed latent noise ε shared by encoder and decoder, float32 on the CPU."""
    if config.noise_generator != NOISE_NUMPY_RANDN:  # config validation already guards this
        raise PromptusError(f"unknown noise generator {config.noise_generator!r}")
    eps = np.random.RandomState(config.seed).randn(*config.latent_shape)
    return torch.from_numpy(eps.astype(np.float32))


def mix_latent(z_prev: torch.Tensor, noise: torch.Tensor, mix: float | torch.Tensor) -> torch.Tensor:
    """Temporal conditioning ``z = m·z_prev + (1 − m)·ε`` (a convex mix).

    ``m`` is made a tensor of the working dtype first so that ``1 − m`` is computed
    in that dtype, exactly as the published implementation does (a 0-d tensor may be
    passed in already, e.g. from inside a CUDA-graph capture).
    """
    m = mix if isinstance(mix, torch.Tensor) else torch.tensor(mix, dtype=z_prev.dtype, device=z_prev.device)
    return z_prev * m + noise * (1 - m)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] (N×3×H×W) → uint8 N×H×W×3 with rounding."""
    x = ((image.float() + 1) / 2).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_uint8_release(image: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] (N×3×H×W) → uint8 N×H×W×3 as the public release converts it.

    ``(255 · clamp((clamp(img, −1, 1) + 1)/2, 0, 1)).to(uint8)`` in float16: the release's
    TAESD output is float16 under autocast, every step rounds to float16, and the cast
    truncates. A float32 image (the CPU) is rounded to float16 first. Never above
    :func:`to_uint8`'s value for the same image, and ~half the values one below it.
    """
    x = image.to(torch.float16).clamp(-1.0, 1.0)
    x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    return (255 * x).to(torch.uint8).permute(0, 2, 3, 1)


def release_sigmas() -> torch.Tensor:
    """σ_t (t = 0..999, float32) exactly as the release's sampler holds them.

    Same schedule as :func:`alphas_cumprod`, computed its way: β from a float64
    ``torch.linspace`` (which can differ from numpy's in the last bit), ᾱ by numpy's
    cumprod, then ``sqrt((1 − ᾱ)/ᾱ)`` rounded to float32 before the square root.
    """
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
    a = np.cumprod(1.0 - betas.numpy())
    return torch.tensor((1 - a) / a, dtype=torch.float32) ** 0.5


def to_model_range(frames_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×3 frames → float32 N×3×H×W in [-1, 1]."""
    return frames_uint8.permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
