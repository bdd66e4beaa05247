"""Turning an upload (a video file or a zip of frames) into a clip the encoder can read.

Every way an upload can be wrong ends in an :class:`UploadError` whose message the
page shows as it is: too large, not a video, an unreadable video, frames too small,
a zip without images or with too much inside. Nothing is extracted outside the
session's folder: zip member names are never used as paths.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import PromptusError
from ..video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, _natural_key, list_images, video_fps

log = logging.getLogger(__name__)

MB = 1 << 20
#: Largest upload by default, in MB (``promptus studio --max-upload-mb``).
DEFAULT_MAX_UPLOAD_MB = 200


class UploadError(PromptusError):
    """An upload the studio cannot use; the message says why and what to upload instead."""


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what one upload may hold.

    ``max_bytes`` bounds the uploaded file (the web server refuses larger ones
    before they are stored); ``max_unpacked_bytes`` and ``max_zip_frames`` bound
    what a zip expands to; frames smaller than ``min_side`` pixels are refused.
    """

    max_bytes: int = DEFAULT_MAX_UPLOAD_MB * MB
    max_unpacked_bytes: int = 1024 * MB
    max_zip_frames: int = 5000
    min_side: int = 16


@dataclass(frozen=True)
class ClipInfo:
    """A readable clip: ``path`` is a video file or a folder of frames."""

    path: Path
    name: str
    frame_count: int
    width: int
    height: int
    fps: float

    def describe(self) -> str:
        return (f"**{self.name}**: {self.frame_count} frames of {self.width}×{self.height} at {self.fps:g} fps "
                f"({self.frame_count / self.fps:.2f} s)")


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", MB), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def prepare_clip(upload: str | Path, dest: str | Path, limits: UploadLimits = UploadLimits(),
                 default_fps: float = 30.0) -> ClipInfo:
    """Check ``upload`` and place it under ``dest`` (a fresh folder of the session).

    Video files are moved there; a zip's images are written there as
    ``frames/00000.png``, ... in the natural order of their names. Returns what the
    clip holds; raises :class:`UploadError` with a message for the page.
    """
    src, dest = Path(upload), Path(dest)
    if not src.is_file():
        raise UploadError("the upload did not arrive; try again")
    size = src.stat().st_size
    name = src.name
    if size > limits.max_bytes:
        raise UploadError(f"{name} is {human_bytes(size)}; the studio takes uploads up to "
                          f"{human_bytes(limits.max_bytes)}: trim the clip (a few seconds is plenty) or lower its "
                          "resolution")
    if size == 0:
        raise UploadError(f"{name} is empty; upload an mp4 (or another video) or a zip of frames")
    suffix = src.suffix.lower()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        return _place(src, dest, suffix, name, limits, default_fps)
    except UploadError:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _place(src: Path, dest: Path, suffix: str, name: str, limits: UploadLimits, default_fps: float) -> ClipInfo:
    if suffix in VIDEO_SUFFIXES:
        target = dest / f"clip{suffix}"
        shutil.move(str(src), target)
        return _probe_video(target, name, limits, default_fps)
    if suffix == ".zip":
        folder = _extract_frames(src, dest / "frames", limits)
        src.unlink(missing_ok=True)
        return probe_frames(folder, name, limits, default_fps)
    if suffix in IMAGE_SUFFIXES:
        raise UploadError(f"{name} is a single image; upload a video or a zip of its frames")
    raise UploadError(f"{name} is not a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a zip of frames")


def _check_size(name: str, width: int, height: int, limits: UploadLimits) -> None:
    if min(width, height) < limits.min_side:
        raise UploadError(f"the frames of {name} are {width}×{height} pixels; the studio needs at least "
                          f"{limits.min_side}×{limits.min_side} (frames are cropped to a square and scaled to the "
                          "codec's size, and a few pixels hold nothing to encode)")


def _probe_video(path: Path, name: str, limits: UploadLimits, default_fps: float) -> ClipInfo:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UploadError(f"{name} holds no video stream (audio only?); upload a video")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise UploadError(f"{name} holds no decodable video frames")
            _check_size(name, first.width, first.height, limits)
            count = stream.frames
            if not count:  # not stored in the container: count the packets, no decoding needed
                container.seek(0)
                count = sum(1 for p in container.demux(stream) if p.size)
    except UploadError:
        raise
    except (av.FFmpegError, OSError, ValueError, StopIteration) as e:
        raise UploadError(f"{name} is not a readable video ({_reason(e)}); upload an mp4 (H.264) or a zip of frames") from e
    fps = video_fps(path) or default_fps
    return ClipInfo(path, name, int(count), first.width, first.height, fps)


def _reason(e: BaseException) -> str:
    """What went wrong, in words: no errno and no server-side temporary path (the person uploaded a file of theirs)."""
    text = getattr(e, "strerror", None) or str(e)
    return text.split(": '/")[0].strip() or type(e).__name__


def probe_frames(folder: Path, name: str, limits: UploadLimits = UploadLimits(),
                 default_fps: float = 30.0) -> ClipInfo:
    """The clip of a folder of frames (checks the first frame's size)."""
    from PIL import Image, UnidentifiedImageError

    files = list_images(folder)
    try:
        with Image.open(files[0]) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise UploadError(f"{files[0].name} of {name} is not a readable image ({_reason(e)})") from e
    _check_size(name, width, height, limits)
    return ClipInfo(folder, name, len(files), width, height, default_fps)


def _extract_frames(src: Path, folder: Path, limits: UploadLimits) -> Path:
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as e:
        raise UploadError(f"{src.name} is not a readable zip ({_reason(e)}); zip a folder of frames "
                          "(00000.png, 00001.png, ...)") from e
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir() and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith((".", "__MACOSX")) for part in Path(m.filename).parts)]
        if not members:
            raise UploadError(f"{src.name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); zip a folder of "
                              "frames such as 00000.png, 00001.png, ...")
        if len(members) > limits.max_zip_frames:
            raise UploadError(f"{src.name} holds {len(members)} images; the studio takes up to "
                              f"{limits.max_zip_frames} frames")
        members.sort(key=lambda m: _natural_key(Path(m.filename)))
        folder.mkdir(parents=True)
        budget = limits.max_unpacked_bytes
        for i, m in enumerate(members):
            # Written under our own names, read at most `budget` bytes: no path escapes, no zip bombs.
            try:
                with zf.open(m) as f:
                    data = f.read(budget + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as e:
                raise UploadError(f"{m.filename} in {src.name} cannot be unpacked ({_reason(e)})") from e
            budget -= len(data)
            if budget < 0:
                raise UploadError(f"{src.name} unpacks to more than {human_bytes(limits.max_unpacked_bytes)}; "
                                  "zip fewer or smaller frames")
            (folder / f"{i:05d}{Path(m.filename).suffix.lower()}").write_bytes(data)
    return folder
