"""Clips prepared once per sweep: cropped and resized PNG frames that promptus and the baselines both code."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import CodecConfig
from ..files import write_json_atomic


@dataclass(frozen=True)
class ClipInfo:
    """A clip prepared for the sweep: PNG frames at the sweep's size."""

    name: str
    source: str
    frames_dir: str
    fps: float
    frame_count: int
    size: int
    digest: str  # of the prepared frames: a changed clip makes its points stale

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps


def clip_names(sources: list[str]) -> list[str]:
    names: list[str] = []
    for s in sources:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(s).resolve().stem or Path(s).resolve().name) or "clip"
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def prepare_clip(source: str | os.PathLike, name: str, out: str | os.PathLike, *, size: int,
                 fps: float | None = None, max_frames: int | None = None) -> ClipInfo:
    """Crop and resize ``source`` to ``size`` and keep it as PNGs under ``out/clips/name-SIZEpx/`` (reused when
    unchanged; one folder per size, so that sweeps at several sizes in one ``out`` share their clips)."""
    from ..encoder import frames_digest
    from ..video import read_frames, video_fps, write_frames

    folder = Path(out) / "clips" / f"{name}-{size}px"
    meta_path = folder.with_suffix(".json")
    frames = read_frames(source, size, size, max_frames)
    rate = float(fps or video_fps(source) or CodecConfig.fps)
    info = ClipInfo(name=name, source=str(Path(source).resolve()), frames_dir=str(folder.resolve()), fps=rate,
                    frame_count=int(frames.shape[0]), size=size, digest=frames_digest(frames))
    try:
        same = json.loads(meta_path.read_text()) == dataclasses.asdict(info)
    except (OSError, ValueError):
        same = False
    if not (same and len(list(folder.glob("*.png"))) == info.frame_count):
        write_frames(frames.numpy(), folder, rate, kind="folder", force=True)  # the sweep's own copy of the clip
        write_json_atomic(meta_path, dataclasses.asdict(info))
    return info
