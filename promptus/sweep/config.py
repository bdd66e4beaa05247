"""What a sweep depends on: :class:`SweepConfig` (serialised into results.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CodecConfig, TrainConfig
from ..errors import PromptusError
from ..metrics.meter import LPIPS_SEVERE, PSNR_SEVERE_DB


@dataclass
class SweepConfig:
    """Everything a sweep depends on (serialised into results.json).

    ``codec`` holds the codec settings every point shares (frame size — square,
    ``width == height`` — and noise seed); each point replaces its rank and interval,
    and its fps is the clip's (``fps``, else the video's, else ``codec.fps``).
    ``train`` holds the inversion trainer's settings.
    """

    clips: list[str]
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    # half, once and twice the published keyframe interval
    intervals: list[int] = field(default_factory=lambda: [CodecConfig.interval // 2, CodecConfig.interval,
                                                          2 * CodecConfig.interval])
    baselines: list[str] = field(default_factory=lambda: ["x264", "x265"])
    out: str = "outputs/sweep"
    # the encoder (as `promptus encode`)
    codec: CodecConfig = field(default_factory=CodecConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fps: float | None = None
    max_frames: int | None = None
    vgg: str | None = None
    model: str = "auto"
    taesd: str | None = None
    device: str = "auto"
    checkpoints: str = "checkpoints"
    decode_backend: str = "torch"
    threads: int = 1
    # the baselines
    baseline_preset: str = "medium"  # x264/x265 -preset
    ffmpeg: str = "ffmpeg"
    tolerance: float = 0.10
    # the metrics
    lpips: str = "auto"
    lpips_weights: str | None = None
    psnr_threshold: float = PSNR_SEVERE_DB
    lpips_threshold: float = LPIPS_SEVERE
    # how jobs run
    ray: bool = False
    ray_address: str | None = None
    gpus_per_point: int = 1
    progress: bool = True

    @property
    def size(self) -> int:
        """Frame size of every point (frames are square)."""
        return self.codec.width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        from ..baselines import BASELINES

        if not self.clips:
            raise PromptusError("give at least one clip (a video file or a folder of frames)")
        for c in self.clips:
            if not Path(c).exists():
                raise PromptusError(f"clip {c} does not exist")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise PromptusError(f"--ranks {self.ranks}: give one or more ranks ≥ 1")
        if not self.intervals or any(t < 1 for t in self.intervals):
            raise PromptusError(f"--intervals {self.intervals}: give one or more intervals ≥ 1")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise PromptusError(f"unknown baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
        if self.codec.width != self.codec.height:
            raise PromptusError(f"the sweep codes square frames; got {self.codec.width}×{self.codec.height}")
        if not 0 < self.tolerance < 1:
            raise PromptusError(f"--tolerance {self.tolerance} must lie between 0 and 1 (0.1 = 10 %)")
        if self.gpus_per_point < 1:
            raise PromptusError(f"--gpus-per-point {self.gpus_per_point} must be ≥ 1")
        if self.gpus_per_point > 1 and not (self.ray or self.ray_address):
            raise PromptusError("--gpus-per-point needs --ray (the points then run on Ray actors with that many "
                                "GPUs each); without Ray, encode one clip on several GPUs with encode --devices")
        if self.threads < 1:
            raise PromptusError(f"--threads {self.threads} must be ≥ 1")
