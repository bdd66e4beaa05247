"""Turning an upload (a video file or a zip of frames) into a clip the encoder can read.

Every way an upload can be wrong ends in an :class:`UploadError` whose message the
page shows as it is: too large, not a video, an unreadable video, frames too small
or too large, a zip without images or with too much inside. Nothing is extracted
outside the session's folder: zip member names are never used as paths.

Sizes are read from headers before any pixel is decoded: a video's frame size from
its stream parameters (FFmpeg's probe itself refuses frames over ``max_frame_pixels``),
a zipped image's from its header, read from the first bytes of the member before the
rest is unpacked; a member is unpacked in chunks and may not be longer than its
image's raw pixels. So an upload under 1 MB cannot make the server allocate much more
than a valid upload of the same kind (tests/test_studio_uploads.py measures it).
"""

from __future__ import annotations

import io
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
    max_frame_pixels: int = 3840 * 2160  # 4K: frames are cropped and scaled to the codec's size anyway


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
    except Exception as e:  # noqa: BLE001 - a reader's surprise is still the upload's fault, never a traceback
        shutil.rmtree(dest, ignore_errors=True)
        log.info("studio: upload %s refused: %s: %s", name, type(e).__name__, e)
        raise UploadError(f"{name} cannot be read ({_reason(e)[:200]}); upload an mp4 (H.264) "
                          "or a zip of frames") from None


def _place(src: Path, dest: Path, suffix: str, name: str, limits: UploadLimits, default_fps: float) -> ClipInfo:
    if suffix in VIDEO_SUFFIXES:
        # Copied, never moved: the web framework may hand two visitors' identical uploads the same file.
        target = dest / f"clip{suffix}"
        shutil.copyfile(src, target)
        return _probe_video(target, name, limits, default_fps)
    if suffix == ".zip":
        folder = _extract_frames(src, dest / "frames", limits)
        return probe_frames(folder, name, limits, default_fps)
    if suffix in IMAGE_SUFFIXES:
        raise UploadError(f"{name} is a single image; upload a video or a zip of its frames")
    raise UploadError(f"{name} is not a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a zip of frames")


def _check_size(name: str, width: int, height: int, limits: UploadLimits) -> None:
    if width * height > limits.max_frame_pixels:
        raise UploadError(f"the frames of {name} are {width}×{height} pixels; the studio takes frames of up to "
                          f"{limits.max_frame_pixels:,} pixels (4K): scale the clip down first")
    if min(width, height) < limits.min_side:
        raise UploadError(f"the frames of {name} are {width}×{height} pixels; the studio needs at least "
                          f"{limits.min_side}×{limits.min_side} (frames are cropped to a square and scaled to the "
                          "codec's size, and a few pixels hold nothing to encode)")


def _probe_video(path: Path, name: str, limits: UploadLimits, default_fps: float) -> ClipInfo:
    import av

    # FFmpeg's own probe decodes a frame to learn the stream: max_pixels stops it at a bomb's size.
    bound = {"max_pixels": str(limits.max_frame_pixels)}
    try:
        with av.open(str(path), stream_options=[bound] * 64) as container:
            if not container.streams.video:
                raise UploadError(f"{name} holds no video stream (audio only?); upload a video")
            stream = container.streams.video[0]
            cc = stream.codec_context
            if cc.width and cc.height:  # from the stream's parameters, before any frame is decoded
                _check_size(name, cc.width, cc.height, limits)
            cc.options = bound
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
        raise UploadError(f"{name} is not a readable video, or its frames are over {limits.max_frame_pixels:,} "
                          f"pixels ({_reason(e)}); upload an mp4 (H.264) or a zip of frames") from None
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
        with Image.open(files[0]) as im:  # lazy: the header only
            width, height = im.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UploadError(f"{files[0].name} of {name} is not a readable image, or too large ({_reason(e)})") from None
    _check_size(name, width, height, limits)
    return ClipInfo(folder, name, len(files), width, height, default_fps)


def _extract_frames(src: Path, folder: Path, limits: UploadLimits) -> Path:
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise UploadError(f"{src.name} is not a readable zip ({_reason(e)}); zip a folder of frames "
                          "(00000.png, 00001.png, ...)") from None
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
        declared = sum(m.file_size for m in members)
        if declared > limits.max_unpacked_bytes:
            raise UploadError(f"{src.name} unpacks to more than {human_bytes(limits.max_unpacked_bytes)} (its "
                              f"entries declare {human_bytes(declared)}); zip fewer or smaller frames")
        folder.mkdir(parents=True)
        budget = [limits.max_unpacked_bytes]
        for i, m in enumerate(members):
            # Written under our own names, in chunks, at most the image's raw size: no path escapes, no bombs.
            try:
                with zf.open(m) as f:
                    _unpack_image(f, folder / f"{i:05d}{Path(m.filename).suffix.lower()}", m.filename, src.name,
                                  budget, limits)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as e:
                raise UploadError(f"{m.filename} in {src.name} cannot be unpacked ({_reason(e)})") from None
    return folder


def _png_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk (None when ``head`` is no PNG)."""
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR" or len(head) < 24:
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


#: Bytes of a zipped image read before its header is judged (PNG's is in the first 33, JPEG's within a few kB).
HEADER_BYTES = 64 << 10
CHUNK_BYTES = 1 << 20


def _unpack_image(f, out: Path, member: str, zip_name: str, budget: list[int], limits: UploadLimits) -> None:
    """Copy one zipped image to ``out``: its header (size) checked first, then at most its raw size in chunks."""
    from PIL import Image, UnidentifiedImageError

    head = f.read(HEADER_BYTES)
    size = _png_size(head)
    if size is None:
        try:
            with Image.open(io.BytesIO(head)) as im:  # the header only: no pixel is decoded
                size = im.size
        except Image.DecompressionBombError as e:
            raise UploadError(f"{member} in {zip_name} is too large a picture ({_reason(e)})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise UploadError(f"{member} in {zip_name} is not a readable image ({_reason(e)})") from None
    width, height = size
    _check_size(f"{member} in {zip_name}", width, height, limits)
    most = min(budget[0], 4 * width * height + HEADER_BYTES)  # no image file is longer than its raw pixels
    n = len(head)
    with open(out, "wb") as w:
        w.write(head)
        while chunk := f.read(CHUNK_BYTES):
            n += len(chunk)
            if n > most:
                what = (f"a {width}×{height} image holds" if most < budget[0]
                        else human_bytes(limits.max_unpacked_bytes) + " in all")
                raise UploadError(f"{member} in {zip_name} unpacks to more than {what}; zip fewer or smaller frames")
            w.write(chunk)
    budget[0] -= n
