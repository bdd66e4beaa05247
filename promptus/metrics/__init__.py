"""Quality metrics of decoded video: PSNR, SSIM, MS-SSIM, LPIPS, and Bjøntegaard deltas.

Every metric takes two uint8 tensors N×H×W×3 (RGB; reference first) and gives one
value per frame; :class:`QualityMeter` accumulates them batch by batch and reports
means and the share of severely distorted frames. How each is computed:

* **PSNR** — one formula, :func:`psnr_from_mse`: ``10·log10(255² / MSE)`` with the
  MSE in float64 over all R, G, B samples, peak 255; identical frames give ``inf``.
  Two averages of it are reported, always named: ``psnr`` (a report's clip value,
  the sweep's and ``eval``'s "PSNR") is the mean of the per-frame PSNRs (``inf`` if
  any frame is identical); ``psnr_clip`` / :func:`clip_psnr` is the PSNR of the
  clip's mean MSE (the encoder's closed-loop PSNR of a segment, the demo, the
  decode benchmark).
* **SSIM** — ``torchmetrics.functional`` (Gaussian window 11, σ 1.5, k1 0.01,
  k2 0.03) on RGB in [0, 1], averaged over the three channels; identical frames give 1.
* **MS-SSIM** — ``torchmetrics.functional`` with the standard five scales and
  weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333). Five scales need frames of at
  least 176 px on the short side; smaller frames use the most scales that fit
  (the first *s* weights, renormalised to sum to 1; ``ms_ssim_scales`` says how
  many), and frames of 20 px or less get no MS-SSIM (reported unavailable).
* **LPIPS** — v0.1 with the AlexNet backbone, computed as torchmetrics does
  (:class:`LPIPSNet`, plain torch, so no torchvision) with the linear heads that
  torchmetrics ships. It needs the backbone's ImageNet weights, torchvision's
  ``alexnet-owt-7be5be79.pth``, from ``lpips_weights`` or torch.hub's checkpoint
  folder; nothing is downloaded. Without them LPIPS is *unavailable* with the
  reason — never a number.

Severe distortion: a frame with PSNR < 20 dB (always reported), and a frame with
LPIPS > 0.4 (when LPIPS is available). Both thresholds can be changed.

``bd_rate``/``bd_quality`` are the Bjøntegaard deltas (VCEG-M33): log-rate as a
cubic polynomial of quality (or quality of log-rate), integrated over the quality
(log-rate) range where both curves overlap.

Modules: :mod:`.frames` (per-frame metrics), :mod:`.lpips`, :mod:`.meter`
(:class:`QualityMeter`, :class:`QualityReport`, :func:`compare_sources`) and
:mod:`.rd` (Bjøntegaard deltas). The ``promptus eval`` command compares two clips.
"""

from ..errors import MetricUnavailable
from .frames import (
    MS_SSIM_WEIGHTS, PEAK, SSIM_KERNEL, SSIM_SIGMA, clip_psnr, ms_ssim, ms_ssim_scales, mse, psnr, psnr_from_mse,
    require_torchmetrics, ssim,
)
from .lpips import LPIPS, LPIPS_BACKBONE_FILE, LPIPSNet, load_lpips, lpips_backbone_path
from .meter import LPIPS_SEVERE, PSNR_SEVERE_DB, Comparison, QualityMeter, QualityReport, compare_sources, evaluate
from .rd import bd_quality, bd_rate

__all__ = [
    "LPIPS", "LPIPSNet", "LPIPS_BACKBONE_FILE", "LPIPS_SEVERE", "MS_SSIM_WEIGHTS", "MetricUnavailable", "PEAK",
    "PSNR_SEVERE_DB", "SSIM_KERNEL", "SSIM_SIGMA", "Comparison", "QualityMeter", "QualityReport", "bd_quality",
    "bd_rate", "clip_psnr", "compare_sources", "evaluate", "load_lpips", "lpips_backbone_path", "ms_ssim",
    "ms_ssim_scales", "mse", "psnr", "psnr_from_mse", "require_torchmetrics", "ssim",
]
