"""What the studio encodes with: presets, the settings of one encode, and the bitrate they imply.

Pure data and arithmetic, no Gradio: the page only shows what these functions return.
The presets are named by their nominal rate at 30 fps; the rate shown before an
encode is computed for the actual clip (its frame count and fps), counting every
byte a raw-coded file will hold, so that it can be compared with the real file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..backends import backend_names
from ..bitstream import Bitstream, Header, InitLatent, Keyframe, to_bytes
from ..config import INIT_LATENT_SOURCES, INIT_PRECISIONS, CodecConfig, ModelIdentity, TrainConfig
from ..errors import PromptusError
from ..prompts import QuantizedTensor, RateEstimate, estimate_rate

#: Decoder backends the closed loop (and the studio's decode) can run with: the registry's, eager first.
STUDIO_BACKENDS = backend_names(simplest_first=True)
#: Frame sizes offered in Advanced mode.
SIZES = (64, 128, 256, 384, 512)


@dataclass(frozen=True)
class Preset:
    """A Basic-mode choice: a rank and an interval, named by the rate they give at 30 fps."""

    name: str
    nominal_kbps: int
    rank: int
    interval: int

    @property
    def label(self) -> str:
        return f"{self.name} · about {self.nominal_kbps} kbit/s"


# Interval 10 throughout: one segment is one batch of 10 frames, the batch the real-time
# decoders are built for; rank alone moves the rate (8·r·(77+1024) bits per keyframe).
PRESETS = (
    Preset("Low", 100, rank=4, interval=10),
    Preset("Standard", 225, rank=8, interval=10),
    Preset("High", 450, rank=16, interval=10),
)
DEFAULT_PRESET = PRESETS[1]


def preset_by_label(label: str) -> Preset:
    for p in PRESETS:
        if label in (p.label, p.name):
            return p
    raise PromptusError(f"unknown preset {label!r}; choose one of {', '.join(p.name for p in PRESETS)}")


@dataclass(frozen=True)
class StudioSettings:
    """Everything one studio encode is run with (Advanced mode shows every field).

    ``max_frames`` bounds the encoded part of the clip: inversion costs minutes per
    keyframe with real weights, so the studio encodes the first seconds by default.
    """

    rank: int = DEFAULT_PRESET.rank
    interval: int = DEFAULT_PRESET.interval
    size: int = CodecConfig.width
    iters_first: int = 300
    iters: int = 100
    init_latent: str = "vae"
    init_precision: str = TrainConfig.init_precision
    perceptual: bool = True
    backend: str = "eager"
    max_frames: int = 61

    def __post_init__(self) -> None:
        for name in ("rank", "interval", "size", "iters_first", "iters", "max_frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise PromptusError(f"{name} must be a whole number, got {v!r}")
        if self.max_frames < 2:
            raise PromptusError(f"max frames = {self.max_frames}: a clip needs at least 2 frames (keyframes 0 and T)")
        if self.init_latent not in INIT_LATENT_SOURCES:
            raise PromptusError(f"init latent {self.init_latent!r}: choose {' or '.join(INIT_LATENT_SOURCES)}")
        if self.init_precision not in INIT_PRECISIONS:
            raise PromptusError(f"init precision {self.init_precision!r}: choose one of {', '.join(INIT_PRECISIONS)}")
        if self.backend not in STUDIO_BACKENDS:
            raise PromptusError(f"backend {self.backend!r}: choose one of {', '.join(STUDIO_BACKENDS)}")
        self.codec(30.0)  # rank, interval and size checked by the codec's own rules
        self.train()

    def codec(self, fps: float) -> CodecConfig:
        return CodecConfig(width=self.size, height=self.size, fps=fps, rank=self.rank, interval=self.interval)

    def train(self) -> TrainConfig:
        return TrainConfig(iters_first=self.iters_first, iters=self.iters, perceptual=self.perceptual,
                           init_latent=self.init_latent, init_precision=self.init_precision)

    def replace(self, **changes) -> "StudioSettings":
        return dataclasses.replace(self, **changes)

    def with_preset(self, preset: Preset) -> "StudioSettings":
        return self.replace(rank=preset.rank, interval=preset.interval)

    def total_iterations(self, frame_count: int) -> int:
        """Training iterations of a whole encode of ``frame_count`` frames."""
        k = self.codec(30.0).keyframe_count(frame_count)
        return self.iters_first + (k - 1) * self.iters


def frames_to_encode(settings: StudioSettings, clip_frames: int) -> int:
    """How many frames of a ``clip_frames`` clip an encode with ``settings`` covers.

    Raises a :class:`PromptusError` that says what to change when the clip is
    shorter than one interval (keyframes 0 and T both need a frame).
    """
    n = min(clip_frames, settings.max_frames)
    if n <= settings.interval:
        raise PromptusError(
            f"the clip has {clip_frames} frames{f' (max frames {settings.max_frames})' if clip_frames > n else ''} "
            f"but interval {settings.interval} needs at least {settings.interval + 1} (keyframes 0 and "
            f"{settings.interval}): pick a smaller interval in Advanced mode, or a longer clip")
    return n


@dataclass(frozen=True)
class RateSummary:
    """The bitrate an encode will have, before it runs.

    ``estimate`` splits the payload (factor codes, quantizer side information, init
    latent); ``file_bytes`` is the exact size of the file with its codes stored raw
    (signature, header, framing and checksums included). The encoder keeps a
    losslessly compressed block only where it is smaller, so the real file is at
    most ``file_bytes``.
    """

    codec: CodecConfig
    estimate: RateEstimate
    file_bytes: int
    init_precision: str

    @property
    def kbps(self) -> float:
        return 8 * self.file_bytes / self.estimate.duration_s / 1000

    @property
    def framing_bytes(self) -> int:
        e = self.estimate
        return self.file_bytes - e.factor_bytes - e.side_bytes - e.init_bytes


def expected_rate(codec: CodecConfig, frame_count: int, init_precision: str,
                  model: ModelIdentity | None = None) -> RateSummary:
    """The rate of a ``frame_count``-frame clip encoded with ``codec`` (see :class:`RateSummary`)."""
    estimate = estimate_rate(codec, frame_count, init_precision)
    zeros_u = QuantizedTensor(np.zeros((codec.tokens, codec.rank), np.uint8), 1.0, 0)
    zeros_v = QuantizedTensor(np.zeros((codec.rank, codec.embed_dim), np.uint8), 1.0, 0)
    # A placeholder file with the clip's exact layout: its size does not depend on the values.
    placeholder = Bitstream(
        Header(codec, frame_count, model or ModelIdentity.unknown()),
        InitLatent.from_array(np.zeros(codec.latent_shape, np.float32), init_precision),
        [Keyframe(k * codec.interval, zeros_u, zeros_v) for k in range(estimate.keyframes)],
    )
    return RateSummary(codec, estimate, len(to_bytes(placeholder, entropy="none")), init_precision)


def describe_rate(rate: RateSummary, *, nominal: bool = False) -> str:
    """Markdown lines: rank, interval and the expected bitrate with its parts."""
    c, e = rate.codec, rate.estimate
    kbit = lambda n: 8 * n / e.duration_s / 1000  # noqa: E731
    clip = (f"a {e.duration_s:.2f} s clip at {c.fps:g} fps (no clip yet)" if nominal
            else f"this clip: {e.frame_count} frames, {e.duration_s:.2f} s at {c.fps:g} fps")
    return (
        f"**Rank {c.rank} · interval {c.interval} · {c.width}×{c.height}** → "
        f"**{rate.kbps:.1f} kbit/s** expected for {clip}, {e.keyframes} keyframes, {rate.file_bytes:,} bytes\n\n"
        f"factor codes {kbit(e.factor_bytes):.1f} + quantizer scales {kbit(e.side_bytes):.2f} + "
        f"init latent ({rate.init_precision}, {e.init_bytes:,} bytes) {kbit(e.init_bytes):.1f} + "
        f"container {kbit(rate.framing_bytes):.2f} kbit/s. Every byte of the file counts; lossless coding of "
        f"the codes can only make the real file smaller."
    )
