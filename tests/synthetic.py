"""Clips made in code for tests, so that no video file is needed."""

from pathlib import Path

import promptus
from promptus.bench import random_bitstream
from promptus.video import synthetic_clip  # noqa: F401  (one definition, shared with the benchmarks)


# ---- a tiny .promptus file whose header names the built-in tiny model

def tiny_file(folder: Path, tiny, name: str = "clip.promptus", frames: int = 9) -> Path:
    cfg = promptus.CodecConfig(width=32, height=32, rank=2, interval=4, fps=24)
    path = folder / name
    promptus.write(path, random_bitstream(cfg, cfg.keyframe_count(frames), identity=tiny.identity()))
    return path
