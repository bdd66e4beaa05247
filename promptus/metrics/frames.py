"""Frame metrics of decoded video: MSE, PSNR, SSIM, MS-SSIM, per frame.

Every metric takes two uint8 tensors N×H×W×3 (RGB; reference first) and gives one
value per frame; see :mod:`promptus.metrics` for how each is computed.
"""

from __future__ import annotations

import logging
import math

import torch

from ..errors import MetricUnavailable, PromptusError

log = logging.getLogger(__name__)

#: Peak value of 8-bit samples: PSNR is ``10·log10(PEAK²/MSE)``.
PEAK = 255.0
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_KERNEL = 11
SSIM_SIGMA = 1.5


# ------------------------------------------------------------------ frames


def check_pair(reference: torch.Tensor, decoded: torch.Tensor) -> None:
    for name, t in (("reference", reference), ("decoded", decoded)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
            shape = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
            raise PromptusError(f"{name} frames must be a uint8 tensor N×H×W×3 (RGB), got "
                                f"{getattr(t, 'dtype', '?')} {shape}")
    if reference.shape != decoded.shape:
        raise PromptusError(f"reference frames are {tuple(reference.shape)} but decoded frames are "
                            f"{tuple(decoded.shape)}; compare frames of one size (promptus eval --size resizes both)")


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×3 → float32 N×3×H×W in [0, 1]."""
    return frames.permute(0, 3, 1, 2).float().div_(255.0)


def require_torchmetrics():
    try:
        from torchmetrics.functional import image
    except ImportError as e:
        raise PromptusError(
            f"SSIM and MS-SSIM need torchmetrics ({e}); install it: pip install 'promptus[eval]' "
            "(or pip install torchmetrics)"
        ) from e
    return image


# ------------------------------------------------------------- per frame


def mse(reference: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """Mean squared error per frame (float64, in 8-bit units²)."""
    check_pair(reference, decoded)
    d = reference.double() - decoded.double()
    return d.pow(2).flatten(1).mean(1)


def psnr_from_mse(mse_value, peak: float = PEAK):
    """The one PSNR formula: ``10·log10(peak²/MSE)`` in dB, ``inf`` where the MSE is 0.

    Takes a float (returns a float) or a tensor of MSEs (returns a tensor of PSNRs).
    """
    if isinstance(mse_value, torch.Tensor):
        m = mse_value
        return torch.where(m == 0, torch.full_like(m, math.inf), 10 * torch.log10(peak**2 / m))
    m = float(mse_value)
    return math.inf if m == 0 else 10 * math.log10(peak**2 / m)


def psnr(reference: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per frame (float64): ``10·log10(255²/MSE)``, ``inf`` for identical frames."""
    return psnr_from_mse(mse(reference, decoded))


def clip_psnr(reference: torch.Tensor, decoded: torch.Tensor) -> float:
    """PSNR of the clip's mean MSE (over every sample of every frame), in dB; ``inf`` when identical.

    This is the single-number PSNR of two clips (or of one frame pair); it is not the
    mean of the per-frame PSNRs, which :class:`QualityReport` reports as ``psnr``.
    """
    return psnr_from_mse(float(mse(reference, decoded).mean()))


def ssim(reference: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """SSIM per frame (Gaussian 11×11, σ 1.5; RGB channels averaged); 1 for identical frames."""
    check_pair(reference, decoded)
    image = require_torchmetrics()
    values = image.structural_similarity_index_measure(
        to_unit(decoded), to_unit(reference), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL,
        reduction="none", data_range=1.0)
    return values.double()


def ms_ssim_scales(height: int, width: int, kernel: int = SSIM_KERNEL) -> int:
    """How many of the 5 MS-SSIM scales fit frames of this size (0 when fewer than 2 fit).

    Scale *s* downsamples by 2^(s−1), so the short side must exceed
    ``(kernel − 1)·2^(s−1)``; torchmetrics also insists on
    ``side // (s − 1)² > kernel − 1``. With the 11-px window: 5 scales from
    176 px, 4 from 99 px, 3 from 44 px, 2 from 21 px.
    """
    side = min(height, width)
    scales = 0
    for s in range(2, len(MS_SSIM_WEIGHTS) + 1):
        if side > (kernel - 1) * 2 ** (s - 1) and side // (s - 1) ** 2 > kernel - 1:
            scales = s
    return scales


def ms_ssim(reference: torch.Tensor, decoded: torch.Tensor, scales: int | None = None) -> torch.Tensor:
    """MS-SSIM per frame. ``scales`` defaults to :func:`ms_ssim_scales` (5 for frames ≥ 176 px).

    Raises :class:`MetricUnavailable` for frames too small for 2 scales (≤ 20 px).
    """
    check_pair(reference, decoded)
    h, w = reference.shape[1:3]
    fit = ms_ssim_scales(h, w)
    if scales is None:
        scales = fit
    if scales < 2 or scales > fit:
        raise MetricUnavailable(
            "MS-SSIM", f"{w}×{h} frames are too small for {max(scales, 2)} scales with an {SSIM_KERNEL}-px window "
                       f"(2 scales need ≥ 21 px, 5 scales ≥ 176 px per side)")
    weights = MS_SSIM_WEIGHTS[:scales]
    total = sum(weights)
    image = require_torchmetrics()
    values = image.multiscale_structural_similarity_index_measure(
        to_unit(decoded), to_unit(reference), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL,
        reduction="none", data_range=1.0, betas=tuple(b / total for b in weights), normalize="relu")
    return values.double()
