"""Quality metrics of decoded video: PSNR, SSIM, MS-SSIM, LPIPS, and Bjøntegaard deltas.

Every metric takes two uint8 tensors N×H×W×3 (RGB; reference first) and gives one
value per frame; :class:`QualityMeter` accumulates them batch by batch and reports
means and the share of severely distorted frames. How each is computed:

* **PSNR** — ours, in float64 over all R, G, B samples of a frame, peak 255:
  ``10·log10(255² / MSE)``; identical frames give ``inf``. The clip value ``psnr``
  is the mean of the per-frame PSNRs (``inf`` if any frame is identical);
  ``psnr_clip`` is the PSNR of the clip's mean MSE.
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

The ``promptus eval`` command (``add_eval_parser``) compares two clips.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PromptusError

log = logging.getLogger(__name__)

#: A frame below this PSNR (dB) counts as severely distorted.
PSNR_SEVERE_DB = 20.0
#: A frame above this LPIPS distance counts as severely distorted.
LPIPS_SEVERE = 0.4
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
#: torchvision's file of AlexNet's ImageNet weights: LPIPS' backbone.
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_BACKBONE_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


class MetricUnavailable(PromptusError):
    """A metric cannot be computed here; ``reason`` says why (and what would fix it)."""

    def __init__(self, metric: str, reason: str):
        super().__init__(f"{metric} is unavailable: {reason}")
        self.metric = metric
        self.reason = reason


# ------------------------------------------------------------------ frames


def _check_pair(reference: torch.Tensor, decoded: torch.Tensor) -> None:
    for name, t in (("reference", reference), ("decoded", decoded)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
            shape = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
            raise PromptusError(f"{name} frames must be a uint8 tensor N×H×W×3 (RGB), got "
                                f"{getattr(t, 'dtype', '?')} {shape}")
    if reference.shape != decoded.shape:
        raise PromptusError(f"reference frames are {tuple(reference.shape)} but decoded frames are "
                            f"{tuple(decoded.shape)}; compare frames of one size (promptus eval --size resizes both)")


def _unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×3 → float32 N×3×H×W in [0, 1]."""
    return frames.permute(0, 3, 1, 2).float().div_(255.0)


def _torchmetrics_image():
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
    _check_pair(reference, decoded)
    d = reference.double() - decoded.double()
    return d.pow(2).flatten(1).mean(1)


def psnr(reference: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per frame (float64): ``10·log10(255²/MSE)``, ``inf`` for identical frames."""
    m = mse(reference, decoded)
    return torch.where(m == 0, torch.full_like(m, math.inf), 10 * torch.log10(255.0**2 / m))


def ssim(reference: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """SSIM per frame (Gaussian 11×11, σ 1.5; RGB channels averaged); 1 for identical frames."""
    _check_pair(reference, decoded)
    image = _torchmetrics_image()
    values = image.structural_similarity_index_measure(
        _unit(decoded), _unit(reference), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL,
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
    _check_pair(reference, decoded)
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
    image = _torchmetrics_image()
    values = image.multiscale_structural_similarity_index_measure(
        _unit(decoded), _unit(reference), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL,
        reduction="none", data_range=1.0, betas=tuple(b / total for b in weights), normalize="relu")
    return values.double()


# ------------------------------------------------------------------- LPIPS


def _alexnet_features() -> torch.nn.Sequential:
    """torchvision's AlexNet ``features``: the layout its weight file's keys ``features.N.*`` refer to."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


class LPIPSNet(torch.nn.Module):
    """LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), as torchmetrics computes it.

    Inputs in [-1, 1]; each of the five ReLU outputs is unit-normalised over
    channels, the squared differences are weighted by a 1×1 linear head, averaged
    over space and summed over layers. Built from plain torch: no torchvision.
    """

    SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # ends of relu1..relu5 in ``features``
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _alexnet_features()
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for a, b in self.SLICES:
            for i in range(a, b):
                h = self.features[i](h)
            out.append(h / torch.sqrt(1e-8 + h.pow(2).sum(1, keepdim=True)))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for lin, fx, fy in zip(self.lins, self._feats(x), self._feats(y)):
            total = total + lin((fx - fy).pow(2)).mean((2, 3))
        return total.flatten()


class LPIPS:
    """LPIPS distance per frame (lower is more similar). Build it with :func:`load_lpips`."""

    def __init__(self, net: LPIPSNet, source: str, device: torch.device):
        self.net, self.source, self.device = net, source, device
        self.name = "alex"

    @torch.no_grad()
    def __call__(self, reference: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        _check_pair(reference, decoded)
        a = _unit(reference).to(self.device) * 2 - 1
        b = _unit(decoded).to(self.device) * 2 - 1
        return self.net(a, b).double().cpu()

    def describe(self) -> str:
        return f"LPIPS (alex, backbone weights {self.source})"


def lpips_backbone_path(weights: str | os.PathLike | None = None) -> Path | None:
    """The backbone weights file: ``weights`` if given, else torch.hub's cached copy, else None."""
    if weights is not None:
        return Path(os.path.expanduser(os.fspath(weights)))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILE
    return cached if cached.is_file() else None


def _lpips_heads_path() -> Path:
    try:
        import torchmetrics
    except ImportError as e:
        raise MetricUnavailable("LPIPS", f"its linear heads ship with torchmetrics, which is not installed ({e}); "
                                         "pip install torchmetrics") from e
    path = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "alex.pth"
    if not path.is_file():
        raise MetricUnavailable("LPIPS", f"this torchmetrics has no LPIPS heads at {path}")
    return path


def load_lpips(weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS (AlexNet) with the backbone's ImageNet weights read from a local file.

    ``weights`` is torchvision's AlexNet state dict (``alexnet-owt-7be5be79.pth``;
    only its ``features.*`` entries are used); without it the file is looked up in
    torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``). Nothing is
    downloaded, and torchvision is not needed. The linear heads are the LPIPS v0.1
    weights that torchmetrics ships.

    Raises:
        MetricUnavailable: the weights are missing or unreadable, or torchmetrics is absent.
    """
    heads = _lpips_heads_path()
    path = lpips_backbone_path(weights)
    if path is None:
        raise MetricUnavailable(
            "LPIPS", f"no ImageNet weights for its AlexNet backbone here: pass --lpips-weights PATH (torchvision's "
                     f"{LPIPS_BACKBONE_FILE}, from {LPIPS_BACKBONE_URL}) or put that file in "
                     f"{Path(torch.hub.get_dir()) / 'checkpoints'}")
    if not path.is_file():
        raise MetricUnavailable("LPIPS", f"backbone weights {str(path)!r} do not exist")
    net = LPIPSNet()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        net.features.load_state_dict(feats)
        lin = torch.load(heads, map_location="cpu", weights_only=True)
        for k, conv in enumerate(net.lins):
            conv.weight.data.copy_(lin[f"lin{k}.model.1.weight"])
    except Exception as e:  # unreadable or wrong file: say so instead of a traceback
        raise MetricUnavailable("LPIPS", f"cannot load AlexNet weights from {str(path)!r}: "
                                         f"{type(e).__name__}: {e}") from e
    dev = torch.device(device)
    return LPIPS(net.to(dev).eval().requires_grad_(False), str(path), dev)


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
        m = float(np.mean(self.mse))
        return math.inf if m == 0 else 10 * math.log10(255.0**2 / m)

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
        _check_pair(reference, decoded)
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
    _check_pair(reference, decoded)
    meter = QualityMeter(**meter_options)
    for i in range(0, reference.shape[0], batch):
        meter.update(reference[i:i + batch], decoded[i:i + batch])
    return meter.report


# --------------------------------------------------------------- BD deltas


def _finite_curve(rates: Sequence[float], quality: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rates, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if r.shape != q.shape:
        raise PromptusError(f"a rate–distortion curve needs as many rates ({r.size}) as quality values ({q.size})")
    keep = np.isfinite(r) & np.isfinite(q) & (r > 0)
    return r[keep], q[keep]


def _fit_degree(*xs: np.ndarray) -> int:
    # The classic method fits a cubic (4+ points); shorter curves get the highest degree they determine.
    return min([3] + [len(np.unique(x)) - 1 for x in xs])


def bd_rate(anchor_rates: Sequence[float], anchor_quality: Sequence[float],
            test_rates: Sequence[float], test_quality: Sequence[float]) -> float | None:
    """Bjøntegaard delta rate in percent: the test codec's average bitrate change at equal quality.

    Negative means the test codec needs fewer bits than the anchor. log10(rate) is
    fitted as a cubic polynomial of quality per curve (a lower degree for curves
    of fewer than 4 distinct points) and the fits are integrated over the quality
    range both curves cover. Returns None when that range is empty or a curve has
    fewer than 2 usable points (non-finite values are dropped).
    """
    r1, q1 = _finite_curve(anchor_rates, anchor_quality)
    r2, q2 = _finite_curve(test_rates, test_quality)
    deg = _fit_degree(q1, q2)
    if deg < 1:
        return None
    lo, hi = max(q1.min(), q2.min()), min(q1.max(), q2.max())
    if not hi > lo:
        return None
    p1 = np.polyint(np.polyfit(q1, np.log10(r1), deg))
    p2 = np.polyint(np.polyfit(q2, np.log10(r2), deg))
    avg = ((np.polyval(p2, hi) - np.polyval(p2, lo)) - (np.polyval(p1, hi) - np.polyval(p1, lo))) / (hi - lo)
    return float((10.0**avg - 1.0) * 100.0)


def bd_quality(anchor_rates: Sequence[float], anchor_quality: Sequence[float],
               test_rates: Sequence[float], test_quality: Sequence[float]) -> float | None:
    """Bjøntegaard delta quality (e.g. BD-PSNR in dB): the test codec's average quality change at equal rate.

    Quality is fitted as a cubic polynomial of log10(rate) and integrated over the
    overlapping log-rate range; None where the rate ranges don't overlap.
    """
    r1, q1 = _finite_curve(anchor_rates, anchor_quality)
    r2, q2 = _finite_curve(test_rates, test_quality)
    l1, l2 = np.log10(r1) if r1.size else r1, np.log10(r2) if r2.size else r2
    deg = _fit_degree(l1, l2)
    if deg < 1:
        return None
    lo, hi = max(l1.min(), l2.min()), min(l1.max(), l2.max())
    if not hi > lo:
        return None
    p1 = np.polyint(np.polyfit(l1, q1, deg))
    p2 = np.polyint(np.polyfit(l2, q2, deg))
    return float(((np.polyval(p2, hi) - np.polyval(p2, lo)) - (np.polyval(p1, hi) - np.polyval(p1, lo))) / (hi - lo))


# ------------------------------------------------------------ JSON helpers


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings "inf", "-inf", "nan" (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_restore(value: Any) -> Any:
    """The inverse of :func:`json_safe`."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: json_restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_restore(v) for v in value]
    return value


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write strict JSON (non-finite floats as strings) via a temporary file and a rename."""
    from .files import atomic_write

    return atomic_write(path, json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n")


# ------------------------------------------------------- comparing sources


def native_frame_size(source: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the first frame of a folder of images, an image or a video file."""
    from PIL import Image

    from .video import IMAGE_SUFFIXES, list_images

    source = Path(source)
    if not source.exists():
        raise PromptusError(f"{source} does not exist")
    if source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES:
        first = list_images(source)[0] if source.is_dir() else source
        with Image.open(first) as im:
            return im.size
    import av

    try:
        with av.open(str(source)) as c:
            if not c.streams.video:
                raise PromptusError(f"{source} has no video stream")
            for frame in c.decode(video=0):
                return frame.width, frame.height
    except av.FFmpegError as e:
        raise PromptusError(f"cannot read video {source}: {e}") from e
    raise PromptusError(f"{source} holds no decodable video frames")


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
    from .video import iter_frames

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


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def format_table(comp: Comparison) -> str:
    """The table ``promptus eval`` prints: mean, min and max per metric, severe shares, and why a metric is missing."""
    r = comp.report
    lines = [f"reference {comp.reference} ({comp.reference_frames} frames)",
             f"decoded   {comp.decoded} ({comp.decoded_frames} frames)",
             f"compared  {comp.frames_compared} frames at {comp.size}×{comp.size}", "",
             f"  {'metric':<10}{'mean':>10}{'min':>10}{'max':>10}"]
    for name, label, digits in (("psnr", "PSNR dB", 2), ("ssim", "SSIM", 4), ("ms_ssim", "MS-SSIM", 4),
                                ("lpips", "LPIPS", 4)):
        values = getattr(r, name)
        if values is None:
            lines.append(f"  {label:<10}{'unavailable':>10}  ({r.unavailable.get(name, '')})")
            continue
        extra = f"  ({r.ms_ssim_scales} scales)" if name == "ms_ssim" and r.ms_ssim_scales not in (None, 5) else ""
        lines.append(f"  {label:<10}{_fmt(r.mean(name), digits):>10}{_fmt(min(values), digits):>10}"
                     f"{_fmt(max(values), digits):>10}{extra}")
    lines.append(f"  {'PSNR (clip MSE)':<20}{_fmt(r.psnr_clip, 2):>10}")
    lines.append(f"  severe frames, PSNR < {r.psnr_threshold_db:g} dB: {_fmt(r.severe_psnr_share, 3)}")
    lines.append(f"  severe frames, LPIPS > {r.lpips_threshold:g}: "
                 + (_fmt(r.severe_lpips_share, 3) if r.lpips is not None else "n/a (LPIPS unavailable)"))
    return "\n".join(lines)


# ---------------------------------------------------------------- command


def add_metric_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``eval`` and ``sweep``: LPIPS and the severe-distortion thresholds."""
    p.add_argument("--lpips", choices=["auto", "off"], default="auto",
                   help="LPIPS: auto computes it when AlexNet's ImageNet weights are here (--lpips-weights or torch.hub's "
                        "cache), and otherwise reports it unavailable with the reason (default: auto)")
    p.add_argument("--lpips-weights", default=None,
                   help="local ImageNet weights of LPIPS' AlexNet backbone (torchvision's alexnet-owt-7be5be79.pth; "
                        "default: torch.hub's checkpoint folder). Never downloaded")
    p.add_argument("--psnr-threshold", type=float, default=PSNR_SEVERE_DB,
                   help=f"a frame below this PSNR counts as severely distorted (default: {PSNR_SEVERE_DB:g} dB)")
    p.add_argument("--lpips-threshold", type=float, default=LPIPS_SEVERE,
                   help=f"a frame above this LPIPS counts as severely distorted (default: {LPIPS_SEVERE:g})")


def meter_options(args) -> dict[str, Any]:
    return {"lpips": args.lpips, "lpips_weights": args.lpips_weights, "psnr_threshold_db": args.psnr_threshold,
            "lpips_threshold": args.lpips_threshold}


def cmd_eval(args) -> int:
    comp = compare_sources(args.reference, args.decoded, size=args.size, max_frames=args.max_frames,
                           **meter_options(args))
    print(format_table(comp))
    if args.json:
        write_json_atomic(args.json, comp.to_dict())
        print(f"wrote {args.json}")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``promptus eval REFERENCE DECODED`` to the command's subparsers."""
    e = subparsers.add_parser(
        "eval", help="compare a decoded clip with its reference: PSNR, SSIM, MS-SSIM, LPIPS",
        description="Compare two clips frame by frame (video files or folders of images, any mix), aligned by "
                    "frame index. Clips of different lengths are compared over the common prefix, with a warning. "
                    "Prints a table; --json writes per-frame values and means (identical frames: PSNR \"inf\").")
    e.add_argument("reference", help="the original clip: a video file or a folder of frames")
    e.add_argument("decoded", help="the decoded clip: a video file or a folder of frames")
    e.add_argument("--json", default=None, help="write the results here as JSON")
    e.add_argument("--size", type=int, default=None,
                   help="crop both clips to the centre square and resize to SIZE×SIZE (default: the decoded "
                        "clip's size, which must be square)")
    e.add_argument("--max-frames", type=int, default=None, help="compare only the first N frames")
    add_metric_args(e)
    e.set_defaults(func=cmd_eval)
    return e
