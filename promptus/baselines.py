"""Baseline codecs (H.264/x264, H.265/x265) through the system ffmpeg, at a requested bitrate.

Each codec is a small class that builds an ffmpeg command line (CompressAI's
``bench/codecs.py`` style); :func:`encode_at_bitrate` drives it to a target
bitrate and :func:`decode_frames` reads the result back as RGB frames.

Input is the clip as a folder of PNG frames ``00000.png, 00001.png, …`` (the same
cropped and resized frames promptus encodes), coded as 8-bit 4:2:0 (yuv420p,
ffmpeg's default BT.601 conversion both ways) into an **mp4** container.

Rate control: first two-pass ABR (``-b:v``), repeated once with the request
scaled by target/achieved when it misses; two-pass at tiny bitrates often misses
anyway, so when the achieved bitrate is still off the target by more than the
tolerance (10 %), a bisection on the (fractional) CRF follows, and of every
attempt the encode closest to the target is kept.
The achieved bitrate is always measured, never assumed: **all bytes of the mp4
file** (container and the encoder's info SEI included) × 8 / (frame count / fps).
A target the codec cannot reach (e.g. above what CRF 0 spends on a tiny clip) is
reported with its achieved rate and ``within_tolerance=False``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import PromptusError
from .prompts import kbps

log = logging.getLogger(__name__)

CRF_RANGE = (0.0, 51.0)
FRAME_PATTERN = "%05d.png"


def find_ffmpeg(ffmpeg: str = "ffmpeg") -> str:
    """The ffmpeg executable's path; a :class:`PromptusError` saying how to install it when there is none."""
    path = shutil.which(ffmpeg)
    if path is None:
        raise PromptusError(
            f"ffmpeg was not found ({ffmpeg!r} is not an executable on PATH); the x264/x265 baselines run the "
            "system ffmpeg: install it (apt-get install -y ffmpeg, brew install ffmpeg or conda install ffmpeg), "
            "pass --ffmpeg PATH, or leave the baselines out (--baselines with no codec)"
        )
    return path


def check_ffmpeg_encoders(ffmpeg: str, encoders: list[str]) -> None:
    """Raise :class:`PromptusError` unless this ffmpeg has every encoder named (libx264, libx265, …)."""
    try:
        out = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise PromptusError(f"cannot run {ffmpeg} -encoders: {e}") from e
    have = set(re.findall(r"^\s*V\S*\s+(\S+)", out, flags=re.M))
    missing = [e for e in encoders if e not in have]
    if missing:
        raise PromptusError(f"{ffmpeg} has no {', '.join(missing)} encoder; install an ffmpeg built with it "
                            "(Debian/Ubuntu's ffmpeg package has libx264 and libx265)")


def _rate(fps: float) -> str:
    return str(Fraction(fps).limit_denominator(1001))


@dataclass(frozen=True)
class BaselineCodec:
    """A baseline codec: builds the ffmpeg command lines for one encode.

    Subclasses set ``name`` (as written in results), ``encoder`` (ffmpeg's
    encoder) and :meth:`rate_args`. ``preset`` is the encoder's speed preset.
    """

    name: ClassVar[str] = ""
    encoder: ClassVar[str] = ""
    container: ClassVar[str] = ".mp4"
    preset: str = "medium"
    ffmpeg: str = "ffmpeg"

    def rate_args(self, *, crf: float | None = None, kbps: float | None = None, pass_number: int | None = None,
                  stats: str | None = None) -> list[str]:
        raise NotImplementedError

    def input_args(self, frames_dir: str | os.PathLike, fps: float) -> list[str]:
        return ["-framerate", _rate(fps), "-start_number", "0", "-i", str(Path(frames_dir) / FRAME_PATTERN)]

    def command(self, frames_dir: str | os.PathLike, fps: float, output: str | os.PathLike | None, *,
                crf: float | None = None, kbps: float | None = None, pass_number: int | None = None,
                stats: str | None = None) -> list[str]:
        """One ffmpeg run: CRF (``crf``) or one pass of two-pass ABR (``kbps``, ``pass_number``, ``stats``).

        ``output`` None discards the video (the first ABR pass).
        """
        if (crf is None) == (kbps is None):
            raise ValueError("give exactly one of crf and kbps")
        cmd = [self.ffmpeg, "-y", "-hide_banner", "-nostdin", "-loglevel", "error",
               *self.input_args(frames_dir, fps), "-an", "-c:v", self.encoder, "-preset", self.preset,
               "-pix_fmt", "yuv420p",
               *self.rate_args(crf=crf, kbps=kbps, pass_number=pass_number, stats=stats)]
        if output is None:
            return cmd + ["-f", "null", os.devnull]
        return cmd + ["-f", "mp4", str(output)]


@dataclass(frozen=True)
class X264(BaselineCodec):
    """H.264 with libx264."""

    name: ClassVar[str] = "x264"
    encoder: ClassVar[str] = "libx264"

    def rate_args(self, *, crf=None, kbps=None, pass_number=None, stats=None) -> list[str]:
        if crf is not None:
            return ["-crf", f"{crf:.3f}"]
        return ["-b:v", f"{kbps:.3f}k", "-pass", str(pass_number), "-passlogfile", str(stats)]


@dataclass(frozen=True)
class X265(BaselineCodec):
    """H.265/HEVC with libx265 (two-pass through ``-x265-params``, which every ffmpeg version accepts)."""

    name: ClassVar[str] = "x265"
    encoder: ClassVar[str] = "libx265"

    def rate_args(self, *, crf=None, kbps=None, pass_number=None, stats=None) -> list[str]:
        if crf is not None:
            return ["-crf", f"{crf:.3f}", "-x265-params", "log-level=error", "-tag:v", "hvc1"]
        # x265 writes its stats file itself; ':' and '\' would break the parameter list.
        if any(ch in str(stats) for ch in ":\\="):
            raise PromptusError(f"x265's stats path {stats!r} must not contain ':', '=' or '\\'")
        return ["-b:v", f"{kbps:.3f}k", "-x265-params", f"pass={pass_number}:stats={stats}:log-level=error",
                "-tag:v", "hvc1"]


BASELINES: dict[str, type[BaselineCodec]] = {"x264": X264, "x265": X265}


def make_baseline(name: str, *, preset: str = "medium", ffmpeg: str = "ffmpeg") -> BaselineCodec:
    try:
        cls = BASELINES[name]
    except KeyError:
        raise PromptusError(f"unknown baseline codec {name!r}; choose from {', '.join(BASELINES)}") from None
    return cls(preset=preset, ffmpeg=ffmpeg)


# ------------------------------------------------------------------ encode


@dataclass
class BaselineEncode:
    """One baseline encode at a target bitrate: what was asked, what was achieved, how."""

    codec: str
    path: str
    target_kbps: float
    kbps: float  # achieved: all bytes of the mp4 file × 8 / duration / 1000
    bytes: int
    frame_count: int
    fps: float
    rate_control: str  # "2pass-abr" or "crf-search"
    crf: float | None
    within_tolerance: bool
    encode_s: float  # ffmpeg wall time of the kept encode (both passes for ABR)
    search_s: float  # ffmpeg wall time of every attempt, the kept one included
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def error(self) -> float:
        return self.kbps / self.target_kbps - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise PromptusError(f"cannot run {cmd[0]}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise PromptusError(f"ffmpeg failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return time.perf_counter() - t0


def _kbps(nbytes: int, frame_count: int, fps: float) -> float:
    return kbps(nbytes, frame_count / fps)


def encode_at_bitrate(codec: BaselineCodec, frames_dir: str | os.PathLike, fps: float, frame_count: int,
                      target_kbps: float, output: str | os.PathLike, *, tolerance: float = 0.10,
                      max_crf_steps: int = 14) -> BaselineEncode:
    """Encode the PNG frames in ``frames_dir`` to ``output`` (mp4) near ``target_kbps``.

    Two-pass ABR first (once more with a corrected request if it misses); if the
    achieved bitrate still misses by more than ``tolerance`` (relative), bisect
    the CRF (fractional, 0–51); the encode closest to the target is kept. The
    output is written atomically (the kept attempt is renamed into place).
    """
    if not target_kbps > 0:
        raise PromptusError(f"target bitrate {target_kbps!r} kbit/s must be positive")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    attempts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=f".{output.stem}.", dir=output.parent) as tmp:
        tmp = Path(tmp)

        def record(path: Path, mode: str, crf: float | None, seconds: float) -> dict[str, Any]:
            n = path.stat().st_size
            a = {"mode": mode, "crf": crf, "bytes": n, "kbps": _kbps(n, frame_count, fps), "seconds": seconds,
                 "path": path}
            attempts.append(a)
            log.debug("%s %s crf=%s: %.1f kbit/s (target %.1f)", codec.name, mode, crf, a["kbps"], target_kbps)
            return a

        def miss(a: dict[str, Any]) -> float:
            return abs(a["kbps"] / target_kbps - 1)

        def two_pass(kbps: float, n: int) -> dict[str, Any]:
            stats, out = tmp / f"stats{n}", tmp / f"abr{n}{codec.container}"
            s1 = _run(codec.command(frames_dir, fps, None, kbps=kbps, pass_number=1, stats=str(stats)))
            s2 = _run(codec.command(frames_dir, fps, out, kbps=kbps, pass_number=2, stats=str(stats)))
            a = record(out, "2pass-abr", None, s1 + s2)
            a["requested_kbps"] = kbps
            return a

        best = two_pass(target_kbps, 0)
        # A steady over- or undershoot (container, headers, tiny clips) is corrected once by scaling the request.
        if miss(best) > tolerance:
            scale = min(4.0, max(0.25, target_kbps / best["kbps"]))
            a = two_pass(target_kbps * scale, 1)
            if miss(a) < miss(best):
                best = a

        if miss(best) > tolerance:  # fall back to a CRF bisection; bitrate falls as CRF rises
            step = iter(range(max_crf_steps + 2))

            def at_crf(crf: float) -> dict[str, Any]:
                nonlocal best
                out = tmp / f"crf{next(step)}{codec.container}"
                a = record(out, "crf-search", crf, _run(codec.command(frames_dir, fps, out, crf=crf)))
                if miss(a) < miss(best):
                    best = a
                return a

            lo, hi = CRF_RANGE
            # First the end of the range the target lies towards: when even it misses, the target is out of reach.
            edge = at_crf(lo if best["kbps"] < target_kbps else hi)
            reachable = edge["kbps"] >= target_kbps if edge["crf"] == lo else edge["kbps"] <= target_kbps
            if reachable and miss(edge) > tolerance:
                for _ in range(max_crf_steps):
                    crf = round((lo + hi) / 2, 3)
                    a = at_crf(crf)
                    if miss(a) <= tolerance or hi - lo < 0.02:
                        break
                    if a["kbps"] > target_kbps:
                        lo = crf
                    else:
                        hi = crf
        os.replace(best["path"], output)
    for a in attempts:
        a["path"] = str(a["path"].name)
    n = output.stat().st_size
    result = BaselineEncode(
        codec=codec.name, path=str(output), target_kbps=float(target_kbps), kbps=_kbps(n, frame_count, fps), bytes=n,
        frame_count=frame_count, fps=fps, rate_control=best["mode"], crf=best["crf"],
        within_tolerance=miss(best) <= tolerance, encode_s=best["seconds"],
        search_s=sum(a["seconds"] for a in attempts), attempts=attempts)
    if not result.within_tolerance:
        log.warning("%s could not land within %.0f %% of %.1f kbit/s on %s: achieved %.1f kbit/s (%s, crf %s)",
                    codec.name, 100 * tolerance, target_kbps, frames_dir, result.kbps, result.rate_control, result.crf)
    return result


# ------------------------------------------------------------------ decode


def decode_frames(path: str | os.PathLike, width: int, height: int, *, ffmpeg: str = "ffmpeg") -> torch.Tensor:
    """Decode a video file with ffmpeg to uint8 RGB frames N×H×W×3 (no scaling: the size must match)."""
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    try:
        proc = subprocess.run(cmd, capture_output=True)
    except OSError as e:
        raise PromptusError(f"cannot run {ffmpeg}: {e}") from e
    if proc.returncode != 0:
        raise PromptusError(f"ffmpeg could not decode {path}: {proc.stderr.decode(errors='replace').strip()[-500:]}")
    frame_bytes = width * height * 3
    data = proc.stdout
    if len(data) % frame_bytes:
        raise PromptusError(f"{path} did not decode to whole {width}×{height} RGB frames ({len(data)} bytes)")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, height, width, 3)
    return torch.from_numpy(arr.copy())
