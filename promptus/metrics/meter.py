"""The quality meter: per-frame metrics accumulated over batches, clip summaries, and comparing two sources."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MetricUnavailable, PromptusError
from .frames import check_pair, ms_ssim, ms_ssim_scales, mse, psnr, psnr_from_mse, ssim
from .lpips import LPIPS, load_lpips

log = logging.getLogger(__name__)

#: A frame below this PSNR (dB) counts as severely distorted.
PSNR_SEVERE_DB = 20.0
#: A frame above this LPIPS distance counts as severely distorted.
LPIPS_SEVERE = 0.4


# ----------------------------------------------------------------- report


@dataclass
class QualityReport:
    """Per-frame values and clip summaries of one comparison.

    ``ms_ssim``/``lpips`` are None when unavailable; ``unavailable`` maps the
    metric's name to the reason.
    """

    psnr: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    ms_ssim: list[float] | None = field(default_factory=list)
    lpips: list[float] | None = field(default_factory=list)
    ms_ssim_scales: int | None = None
    lpips_net: str | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    psnr_threshold_db: float = PSNR_SEVERE_DB
    lpips_threshold: float = LPIPS_SEVERE

    @property
    def frames(self) -> int:
        return len(self.psnr)

    def mean(self, metric: str) -> float | None:
        values = getattr(self, metric)
        if values is None or not values:
            return None
        return float(np.mean(values))

    @property
    def psnr_clip(self) -> float | None:
        if not self.mse:
            return None
        return psnr_from_mse(float(np.mean(self.mse)))

    @property
    def severe_psnr_share(self) -> float | None:
        """Share of frames with PSNR below ``psnr_threshold_db``."""
        return float(np.mean([p < self.psnr_threshold_db for p in self.psnr])) if self.psnr else None

    @property
    def severe_lpips_share(self) -> float | None:
        """Share of frames with LPIPS above ``lpips_threshold`` (None without LPIPS)."""
        return float(np.mean([v > self.lpips_threshold for v in self.lpips])) if self.lpips else None

    def summary(self) -> dict[str, Any]:
        """Clip values (means), the severe shares and their thresholds, and why a metric is missing."""
        return {
            "frames": self.frames,
            "psnr": self.mean("psnr"),
            "psnr_clip": self.psnr_clip,
            "ssim": self.mean("ssim"),
            "ms_ssim": self.mean("ms_ssim"),
            "lpips": self.mean("lpips"),
            "severe_psnr_share": self.severe_psnr_share,
            "severe_lpips_share": self.severe_lpips_share,
            "psnr_threshold_db": self.psnr_threshold_db,
            "lpips_threshold": self.lpips_threshold,
            "ms_ssim_scales": self.ms_ssim_scales,
            "lpips_net": self.lpips_net,
            "unavailable": dict(self.unavailable),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(),
                "per_frame": {k: getattr(self, k) for k in ("psnr", "ssim", "ms_ssim", "lpips")}}


class QualityMeter:
    """Accumulates per-frame metrics over batches of frame pairs.

    ``lpips``: an :class:`LPIPS`, ``"auto"`` (load it, or record why it is
    unavailable), or None/"off" (not computed; recorded as switched off).
    """

    def __init__(self, *, lpips: "LPIPS | str | None" = "auto", lpips_weights: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", psnr_threshold_db: float = PSNR_SEVERE_DB,
                 lpips_threshold: float = LPIPS_SEVERE):
        self.report = QualityReport(psnr_threshold_db=psnr_threshold_db, lpips_threshold=lpips_threshold)
        self._lpips: LPIPS | None = None
        if isinstance(lpips, LPIPS):
            self._lpips = lpips
        elif lpips == "auto":
            try:
                self._lpips = load_lpips(lpips_weights, device=device)
            except MetricUnavailable as e:
                self._unavailable("lpips", e.reason)
        elif lpips in (None, "off"):
            self._unavailable("lpips", "switched off (--lpips off)")
        else:
            raise PromptusError(f"lpips={lpips!r}: expected 'auto', 'off' or an LPIPS object")
        if self._lpips is not None:
            self.report.lpips_net = self._lpips.name

    def _unavailable(self, metric: str, reason: str) -> None:
        self.report.unavailable[metric] = reason
        setattr(self.report, metric, None)

    def update(self, reference: torch.Tensor, decoded: torch.Tensor) -> None:
        """Add a batch of frame pairs (uint8 N×H×W×3 each)."""
        check_pair(reference, decoded)
        r = self.report
        r.mse += mse(reference, decoded).tolist()
        r.psnr += psnr(reference, decoded).tolist()
        r.ssim += ssim(reference, decoded).tolist()
        if r.ms_ssim is not None:
            try:
                values = ms_ssim(reference, decoded)
            except MetricUnavailable as e:
                self._unavailable("ms_ssim", e.reason)
            else:
                r.ms_ssim += values.tolist()
                r.ms_ssim_scales = ms_ssim_scales(*reference.shape[1:3])
        if self._lpips is not None:
            r.lpips += self._lpips(reference, decoded).tolist()


def evaluate(reference: torch.Tensor, decoded: torch.Tensor, *, batch: int = 16, **meter_options) -> QualityReport:
    """Every metric of two uint8 N×H×W×3 clips of equal shape, frame by frame.

    ``meter_options`` go to :class:`QualityMeter` (lpips, lpips_weights, device, thresholds).
    """
    check_pair(reference, decoded)
    meter = QualityMeter(**meter_options)
    for i in range(0, reference.shape[0], batch):
        meter.update(reference[i:i + batch], decoded[i:i + batch])
    return meter.report


# ------------------------------------------------------- comparing sources


def _batches(it: Iterator[np.ndarray], batch: int) -> Iterator[torch.Tensor]:
    buf = []
    for frame in it:
        buf.append(frame)
        if len(buf) == batch:
            yield torch.from_numpy(np.stack(buf))
            buf = []
    if buf:
        yield torch.from_numpy(np.stack(buf))


@dataclass
class Comparison:
    """The result of comparing two sources frame by frame (``promptus eval``)."""

    reference: str
    decoded: str
    size: int
    reference_frames: int
    decoded_frames: int
    report: QualityReport

    @property
    def frames_compared(self) -> int:
        return self.report.frames

    def to_dict(self) -> dict[str, Any]:
        d = self.report.to_dict()
        return {"reference": self.reference, "decoded": self.decoded, "size": self.size,
                "reference_frames": self.reference_frames, "decoded_frames": self.decoded_frames,
                "frames_compared": self.frames_compared, **d}


def compare_sources(reference: str | os.PathLike, decoded: str | os.PathLike, *, size: int | None = None,
                    max_frames: int | None = None, batch: int = 16, **meter_options) -> Comparison:
    """Compare two clips (mp4/video files or image folders, any mix), aligned by frame index.

    Frames are centre-cropped to a square and resized to ``size`` (promptus'
    frame convention, :func:`promptus.video.iter_frames`); without ``size`` the
    decoded clip's own size is used, which must then be square. When the clips
    differ in length, the common prefix is compared and a warning says so (both
    lengths are in the result).
    """
    from ..video import iter_frames, native_frame_size

    for path in (reference, decoded):
        if not Path(path).exists():
            raise PromptusError(f"{path} does not exist")
    if size is None:
        w, h = native_frame_size(decoded)
        if w != h:
            raise PromptusError(f"{decoded} has {w}×{h} frames; promptus compares square frames: "
                                "pass --size N to crop both clips to the centre square and resize them to N×N")
        size = w
    if size <= 0:
        raise PromptusError(f"--size {size} must be positive")
    meter = QualityMeter(**meter_options)
    ref_it = _batches(iter_frames(reference, size, size, max_frames), batch)
    dec_it = _batches(iter_frames(decoded, size, size, max_frames), batch)
    n_ref = n_dec = 0
    ref_left = dec_left = None  # frames of one clip beyond the other's end
    while True:
        a = ref_left if ref_left is not None else next(ref_it, None)
        b = dec_left if dec_left is not None else next(dec_it, None)
        ref_left = dec_left = None
        if a is None or b is None:
            n_ref += 0 if a is None else a.shape[0] + sum(x.shape[0] for x in ref_it)
            n_dec += 0 if b is None else b.shape[0] + sum(x.shape[0] for x in dec_it)
            break
        n = min(a.shape[0], b.shape[0])
        meter.update(a[:n], b[:n])
        n_ref, n_dec = n_ref + n, n_dec + n
        if a.shape[0] > n:
            ref_left = a[n:]
        if b.shape[0] > n:
            dec_left = b[n:]
    if n_ref != n_dec:
        log.warning("%s has %d frames but %s has %d: comparing the first %d of each", reference, n_ref, decoded,
                    n_dec, min(n_ref, n_dec))
    if meter.report.frames == 0:
        raise PromptusError(f"nothing to compare: {reference} or {decoded} holds no frames")
    return Comparison(str(reference), str(decoded), size, n_ref, n_dec, meter.report)
