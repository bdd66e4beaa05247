"""Reading and writing frames: folders of images and video files (PyAV).

Input frames are RGB, centre-cropped to a square (the longer side is cropped
symmetrically) and resized to the codec's frame size (docs/design.md, "The method"). Output goes to a
folder of PNGs or a video file at the clip's fps; both are written atomically.

Inputs are bounded: an image or video frame over :data:`MAX_INPUT_PIXELS` is refused
before it is decoded (a small PNG can declare 20000×20000 pixels). Outputs never
destroy data: an existing non-empty output folder is refused unless ``force=True``, and
even then only the frame files this writer makes are replaced.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import logging
import os
import sys
import re
import shutil
import threading
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import MAX_FPS, MIN_FPS, PNG_LEVEL, PNG_QUEUE_PER_THREAD, CodecConfig
from .errors import VideoError
from .files import check_output_path, temp_sibling

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}
#: Largest input frame in pixels (8K UHD is 33 M); larger ones are refused before decoding.
MAX_INPUT_PIXELS = 40_000_000
#: x264's preset: "veryfast" keeps up with the decoder on a many-core host (medium: 4× slower for files
#: within 1 % of the size at CRF 12, measured on the sky clip; docs/decoding.md).
_X264 = {"preset": "veryfast"}
#: Video files the frame writer makes: suffix → (PyAV container format, CPU encoder, encoder options).
#: VP9: b=0 takes the quality from the crf alone; the realtime deadline encodes ~20× faster than "good".
VIDEO_OUTPUTS = {
    ".mp4": ("mp4", "libx264", _X264),
    ".m4v": ("mp4", "libx264", _X264),
    ".mov": ("mov", "libx264", _X264),
    ".mkv": ("matroska", "libx264", _X264),
    ".avi": ("avi", "libx264", _X264),
    ".webm": ("webm", "libvpx-vp9", {"b": "0", "row-mt": "1", "deadline": "realtime", "cpu-used": "6"}),
}
#: NVENC stand-ins for the CPU encoders: encoder → (NVENC encoder, options). Constant quality ``cq`` plays the
#: part of the CPU encoder's crf (filled in from it); VP9 has no NVENC encoder.
NVENC_ENCODERS = {"libx264": ("h264_nvenc", {"preset": "p4", "tune": "hq", "rc": "vbr", "b": "0"})}
#: Datacenter GPUs without an NVENC unit (NVIDIA's encode/decode support matrix).
NO_NVENC_GPUS = ("A100", "A800", "H100", "H800", "H200", "H20")


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of ``folder`` in natural order (frame2 before frame10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoError(f"{folder} is not a folder of frames (it does not exist or is a file)")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise VideoError(
            f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "point to a folder of frames such as 00000.png, 00001.png, ..."
        )
    return sorted(files, key=_natural_key)


def center_crop_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop the longer side symmetrically to a square, then resize to ``width``×``height``.

    Resizing uses PIL's bilinear filter (with its antialiasing when shrinking).
    """
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    if square.shape[0] == height and square.shape[1] == width:
        return np.ascontiguousarray(square)
    return np.asarray(Image.fromarray(square).resize((width, height), Image.BILINEAR))


def _load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            w, h = im.size  # from the file's header, before any pixel is decoded
            if w * h > MAX_INPUT_PIXELS:
                raise VideoError(f"{path} is {w}×{h} pixels; promptus reads frames of at most "
                                 f"{MAX_INPUT_PIXELS // 1_000_000} megapixels — scale it down first")
            im.load()
            mode = im.mode
            if mode == "RGB":
                return np.asarray(im)
            if mode in ("L", "LA", "I", "I;16", "1", "F"):
                raise VideoError(
                    f"{path} is a grayscale image (mode {mode}); promptus encodes RGB video — "
                    "convert the frames to RGB first (e.g. ffmpeg -i in.png -pix_fmt rgb24 out.png)"
                )
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                raise VideoError(
                    f"{path} has an alpha channel (mode {mode}); promptus encodes opaque RGB video — "
                    "flatten the frames onto a background first"
                )
            return np.asarray(im.convert("RGB"))
    except VideoError:
        raise
    except Image.DecompressionBombError as e:
        raise VideoError(f"cannot read image {path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's parsers raise these
        raise VideoError(f"cannot read image {path}: {e}") from e


def iter_frames(source: str | os.PathLike, width: int, height: int,
                max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Frames of a folder of images or a video file as uint8 H×W×3 arrays, cropped and resized."""
    source = Path(source)
    if not source.exists():
        raise VideoError(f"input {source} does not exist")
    if source.is_dir():
        files = list_images(source)
        if max_frames is not None:
            files = files[:max_frames]
        first_size = None
        for f in files:
            img = _load_image(f)
            if first_size is None:
                first_size = img.shape[:2]
            elif img.shape[:2] != first_size:
                raise VideoError(
                    f"{f} is {img.shape[1]}×{img.shape[0]} but the first frame is "
                    f"{first_size[1]}×{first_size[0]}; all frames of a clip must have one size"
                )
            yield center_crop_resize(img, width, height)
        return
    if source.suffix.lower() in IMAGE_SUFFIXES:
        yield center_crop_resize(_load_image(source), width, height)
        return
    yield from _iter_video(source, width, height, max_frames)


def _iter_video(path: Path, width: int, height: int, max_frames: int | None) -> Iterator[np.ndarray]:
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"cannot open video {path}: {e}") from e
    with container:
        if not container.streams.video:
            raise VideoError(f"{path} has no video stream")
        ctx = container.streams.video[0].codec_context
        if (ctx.width or 0) * (ctx.height or 0) > MAX_INPUT_PIXELS:
            raise VideoError(f"{path} is {ctx.width}×{ctx.height} pixels; promptus reads frames of at most "
                             f"{MAX_INPUT_PIXELS // 1_000_000} megapixels — scale it down first")
        n = 0
        try:
            for frame in container.decode(video=0):
                if max_frames is not None and n >= max_frames:
                    break
                if frame.width * frame.height > MAX_INPUT_PIXELS:
                    raise VideoError(f"{path}: frame {n} is {frame.width}×{frame.height} pixels, more than "
                                     f"{MAX_INPUT_PIXELS // 1_000_000} megapixels")
                yield center_crop_resize(frame.to_ndarray(format="rgb24"), width, height)
                n += 1
        except av.FFmpegError as e:
            raise VideoError(f"cannot decode {path} after {n} frames: {e}") from e
        if n == 0:
            raise VideoError(f"{path} holds no decodable video frames")


def _frame_count_hint(source: Path, max_frames: int | None) -> int:
    """How many frames ``source`` holds, as far as is known before decoding (0: unknown)."""
    if source.is_dir():
        n = len(list_images(source))
    elif source.suffix.lower() in IMAGE_SUFFIXES:
        n = 1
    else:
        import av

        try:
            with av.open(str(source)) as c:
                n = c.streams.video[0].frames if c.streams.video else 0
        except (av.FFmpegError, OSError):
            n = 0  # iter_frames reports the problem in words
    return min(n, max_frames) if max_frames is not None else n


def frame_count_hint(source: str | os.PathLike, max_frames: int | None = None) -> int:
    """How many frames ``source`` holds (at most ``max_frames``), as far as its container says (0: unknown)."""
    return _frame_count_hint(Path(source), max_frames)


def read_frames(source: str | os.PathLike, width: int = CodecConfig.width, height: int = CodecConfig.height,
                max_frames: int | None = None) -> torch.Tensor:
    """All frames of ``source`` as a uint8 tensor N×H×W×3.

    The result is allocated once, from the frame count the folder or the container
    states, and filled in place: reading holds the clip once, not as a list plus a copy.
    """
    source = Path(source)
    hint = _frame_count_hint(source, max_frames) if source.exists() else 0
    out = np.empty((hint, height, width, 3), np.uint8)
    extra: list[np.ndarray] = []  # frames beyond a count the container understated
    n = 0
    for f in iter_frames(source, width, height, max_frames):
        if n < hint:
            out[n] = f
        else:
            extra.append(f)
        n += 1
    if n == 0:
        raise VideoError(f"{source} holds no frames")
    if extra:
        out = np.concatenate([out, np.stack(extra)])
    elif n < hint:
        out = out[:n].copy()
    return torch.from_numpy(out)


def video_fps(source: str | os.PathLike) -> float | None:
    """The frame rate stored in a video file, or None for image folders."""
    source = Path(source)
    if not source.exists():
        raise VideoError(f"input {source} does not exist")
    if source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES:
        return None
    import av

    try:
        with av.open(str(source)) as c:
            rate = c.streams.video[0].average_rate or c.streams.video[0].base_rate
            return float(rate) if rate else None
    except (av.FFmpegError, OSError, IndexError) as e:
        raise VideoError(f"cannot read the frame rate of {source}: {e}") from e


# ------------------------------------------------------------------ writers


def _video_outputs_text() -> str:
    return ", ".join(VIDEO_OUTPUTS)


def output_kind(path: str | os.PathLike, kind: str | None = None) -> str:
    """Whether the frames for ``path`` go to a video file or a folder of PNGs: ``"video"`` or ``"folder"``.

    A folder when asked for one: ``kind="folder"``, a path string ending in a separator, an
    existing folder, or a path without a suffix. A video when the suffix is one of
    :data:`VIDEO_OUTPUTS`. Any other suffix (``out.gif``, ``out.png``) is a VideoError
    rather than a folder of that name.
    """
    text = os.fspath(path)
    if kind not in (None, "video", "folder"):
        raise ValueError(f"kind must be 'video', 'folder' or None, not {kind!r}")
    if kind == "folder" or text.endswith(("/", os.sep)) or Path(text).is_dir():
        return "folder"
    suffix = Path(text).suffix.lower()
    if suffix in VIDEO_OUTPUTS:
        return "video"
    if kind == "video" or suffix:
        what = "a single image" if suffix in IMAGE_SUFFIXES else f"a {suffix} file"
        raise VideoError(f"cannot write {what} ({text}): give a video file ({_video_outputs_text()}) "
                         f"or a folder for PNG frames (a path ending in /)")
    return "folder"


def _encode_probe(fmt: str, codec: str, options: dict, side: int) -> None:
    """Encode one ``side``×``side`` frame in memory with ``codec`` in ``fmt``; raises what PyAV raises."""
    import av

    with av.open(io.BytesIO(), "w", format=fmt) as c:
        stream = c.add_stream(codec, rate=30)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options)
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")):
            c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


@functools.lru_cache(maxsize=None)
def _check_encoder(suffix: str) -> None:
    """Encode one small frame in memory: the container and encoder work in this PyAV build."""
    import av

    fmt, codec, options = VIDEO_OUTPUTS[suffix]
    try:
        _encode_probe(fmt, codec, options, 16)
    except (av.FFmpegError, ValueError, OSError) as e:
        raise VideoError(f"this PyAV build cannot write {suffix} files ({codec} in {fmt}: {e}); "
                         f"choose another of {_video_outputs_text()} or a folder") from None


@functools.lru_cache(maxsize=None)
def nvenc_problem(suffix: str) -> str | None:
    """Why NVENC cannot encode ``suffix`` files here (``None`` when it can): no NVENC stand-in for its
    encoder, no CUDA GPU, or the PyAV build or the GPU (H100/H200 have no NVENC unit) refuses a test frame."""
    import av

    fmt, codec, _ = VIDEO_OUTPUTS[suffix]
    if codec not in NVENC_ENCODERS:
        return f"{codec} has no NVENC encoder"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    name = torch.cuda.get_device_name()
    if any(chip in name for chip in NO_NVENC_GPUS):  # known: no probe (it would open a second CUDA context)
        return f"the {name} has no NVENC unit"
    nvenc, options = NVENC_ENCODERS[codec]
    if nvenc not in av.codecs_available:
        return f"this PyAV build has no {nvenc}"
    try:
        _encode_probe(fmt, nvenc, options, 256)  # NVENC refuses frames below about 145 pixels
    except (av.FFmpegError, ValueError, OSError) as e:
        return f"{nvenc} does not open here ({str(e)[:120]})"
    return None


def choose_video_encoder(suffix: str, choice: str = "cpu", crf: int = 12) -> tuple[str, str, dict[str, str]]:
    """(container format, encoder, options) for a ``suffix`` file: ``choice`` is one of
    :data:`promptus.config.VIDEO_ENCODERS`; "auto" falls back from NVENC to the CPU encoder with a message."""
    from .config import VIDEO_ENCODERS

    if choice not in VIDEO_ENCODERS:
        raise VideoError(f"unknown video encoder {choice!r}; choose one of {', '.join(VIDEO_ENCODERS)}")
    fmt, codec, options = VIDEO_OUTPUTS[suffix]
    cpu = (fmt, codec, {"crf": str(crf), **options})
    if choice == "cpu":
        return cpu
    why = nvenc_problem(suffix)
    if why is None:
        nvenc, nv_options = NVENC_ENCODERS[codec]
        return fmt, nvenc, {"cq": str(max(crf, 1)), **nv_options}
    if choice == "nvenc":
        raise VideoError(f"NVENC cannot write {suffix} files here: {why}; use --video-encoder cpu")
    log.info("video: NVENC not used (%s); encoding with %s on the CPU", why, codec)
    return cpu


def _png_workers() -> int:
    """Threads for PNG encoding: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def save_png(frame: np.ndarray, path: Path, level: int) -> None:
    """One PNG file, as the serial writer has always written it (PIL, ``compress_level``)."""
    Image.fromarray(frame).save(path, format="PNG", compress_level=level)


def _png_processes():
    """A multiprocessing context for PNG workers: forkserver (a clean single-threaded server that has
    imported this module once; workers fork from it), or None where there is none (Windows)."""
    import multiprocessing as mp

    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return None
    ctx.set_forkserver_preload([__name__])
    return ctx


def main_reimport_safe() -> bool:
    """Whether a forkserver's (or spawn's) children can import this program's main module again without
    running it: ``python -m`` (multiprocessing skips a package's ``__main__``), no main file (``python -c``,
    a REPL), or a main file that guards its work with ``if __name__ == "__main__":`` (the ``promptus``
    console script does). A script that calls the decoder at top level is not safe: its children would run
    it again."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and (spec.name == "__main__" or spec.name.endswith(".__main__")):
        return True
    path = getattr(main, "__file__", None)
    if not path:
        return True
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except OSError:
        return False
    return b"__name__ ==" in text and b"__main__" in text


def _worker_ready() -> int:
    return os.getpid()


def _save_png_in_worker(frame: np.ndarray, path: Path, level: int, umask: int) -> None:
    """:func:`save_png` in a worker process, with the writer's umask (the forkserver kept the one it started
    with), so the files get the permissions the serial writer gives them."""
    os.umask(umask)
    save_png(frame, path, level)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class PngPool:
    """PNG files encoded by ``workers`` processes (threads with ``processes=False`` or where processes are
    not available), at most ``depth`` frames in flight. Both run in parallel: PIL releases the GIL while
    zlib compresses (15 threads wrote 455 noisy 512² frames/s at level 1 on an H100 host; an earlier 87
    frames/s was zlib level 6, ~98 ms a frame there). Processes pay for sending each frame to a worker
    (slower than threads on a 2-core machine, ``scripts/png_writer_bench.py``) and import the main module
    again (see :class:`FrameWriter`). A worker's failure is raised as a VideoError by the next
    :meth:`submit` or :meth:`drain`."""

    def __init__(self, workers: int, level: int, depth: int, *, processes: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.level, self.depth = level, max(1, depth)
        ctx = _png_processes() if processes else None
        self.processes = ctx is not None  # until the first frame shows whether they started
        self._workers = workers
        self._ready = self._pool = self._starting = None
        if ctx is not None:
            # Started on a thread: a first worker forks only once the forkserver has run its preload of this
            # module, which imports promptus and torch (1.2-1.7 s). `promptus decode` makes its writer before the
            # models load, and waiting here put the first frame of PNG output 1.2 s behind .mp4 (5.58 s against
            # 4.12 s on an H100 host).
            self._starting = threading.Thread(target=self._start_processes, args=(ctx,),
                                              name="promptus-png-start", daemon=True)
            self._starting.start()
        else:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="promptus-png")
        self._pending: collections.deque = collections.deque()
        self._umask = _current_umask()

    def _start_processes(self, ctx) -> None:
        """On the start thread: the pool and a first worker (the forkserver starts with it). A failure is kept
        in ``_ready`` for :meth:`_check_processes`."""
        from concurrent.futures import Future, ProcessPoolExecutor

        try:
            self._pool = ProcessPoolExecutor(self._workers, mp_context=ctx)
            self._ready = self._pool.submit(_worker_ready)
        except BaseException as e:  # noqa: BLE001 - reported on the writer's thread, which then uses threads
            self._ready = Future()
            self._ready.set_exception(e)

    def _check_processes(self) -> None:
        """Before the first frame (or :meth:`drain`, :meth:`cancel`): the worker processes started, else threads
        (a host without forkserver support)."""
        from concurrent.futures import ThreadPoolExecutor

        if self._starting is None:
            return
        self._starting.join()
        self._starting = None
        ready, self._ready = self._ready, None
        try:
            ready.result(timeout=120)
        except Exception as e:  # noqa: BLE001 - any failure to start: threads still write the same files
            log.warning("PNG writer: worker processes did not start (%s: %s); encoding on threads",
                        type(e).__name__, e)
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="promptus-png")
            self.processes = False

    def submit(self, frame: np.ndarray, path: Path) -> None:
        self._check_processes()
        while len(self._pending) >= self.depth:
            self._wait_oldest()
        # A copy: the caller may reuse its buffer (the pipelined decoder's pinned host memory) at once.
        if self.processes:  # an absolute path: the workers keep the forkserver's working folder
            job = self._pool.submit(_save_png_in_worker, np.array(frame), path.absolute(), self.level, self._umask)
        else:
            job = self._pool.submit(save_png, np.array(frame), path, self.level)
        self._pending.append((path, job))

    def _wait_oldest(self) -> None:
        path, future = self._pending.popleft()
        try:
            future.result()
        except OSError as e:
            self.cancel()
            raise VideoError(f"cannot write frame {path.name}: {e.strerror or e}") from None
        except Exception as e:
            self.cancel()
            raise VideoError(f"encoding frame {path.name} failed ({type(e).__name__}: {e})") from e

    def drain(self) -> None:
        """Wait for every frame submitted; then the pool is shut down."""
        self._check_processes()
        while self._pending:
            self._wait_oldest()
        self._pool.shutdown(wait=True)

    def cancel(self) -> None:
        """Drop the frames not started and wait for those running (so nothing writes after this returns)."""
        if self._starting is not None:  # no frame yet: what the start made is shut down, no worker waited for
            self._starting.join()
            self._starting = self._ready = None
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def check_frames_output(path: str | os.PathLike, kind: str | None = None) -> str:
    """Check before any work that frames can be written to ``path``; returns its :func:`output_kind`.

    The format must be one this PyAV build writes, and the place writable
    (:func:`promptus.files.check_output_path`); errors are VideoError/PromptusError.
    """
    kind = output_kind(path, kind)
    if kind == "video":
        _check_encoder(Path(path).suffix.lower())
        check_output_path(path, "file")
    else:
        check_output_path(path, "folder")
    return kind


class FrameWriter:
    """Writes uint8 H×W×3 frames to a PNG folder or a video file, atomically.

    ``kind`` (``"video"``, ``"folder"`` or None) and the path decide which, as
    :func:`output_kind` says; the format and the place are checked on construction,
    before any frame is made (:func:`check_frames_output`).
    Frames go to a temporary sibling first; :meth:`close` moves the result into
    place, :meth:`abort` removes it. Use it as a context manager: an exception
    inside the block aborts, so a failed decode never leaves a half-written output.

    A folder that exists and is not empty is refused unless ``force``; then only the
    frame files written here (00000.png, ...) replace their namesakes, one by one, and
    every other file in it is kept. ``size=(width, height)``: refuse frames of another
    size. ``fps`` must lie in [MIN_FPS, MAX_FPS] (a video container stores it as a fraction).
    ``first``: the number of the first PNG (``00020.png`` for a clip played from frame 20).

    PNG frames are encoded by ``workers`` threads (default: one per core; 1: on the calling thread;
    PIL releases the GIL while zlib compresses), or with ``png_processes=True`` by worker processes
    forked from a forkserver, as ``promptus decode`` does. Processes are for programs whose main module
    is safe to import again (``if __name__ == "__main__":``, or ``python -m``): a forkserver's children
    import it, and a script without that guard would run its top-level code again in them. At most two
    frames per worker wait, each goes to its own numbered file, so the bytes do not depend on the
    worker count; ``png_level`` is the zlib level (:data:`promptus.config.PNG_LEVEL`).
    A worker's failure surfaces as a VideoError from the next :meth:`write` or :meth:`close` and
    leaves no output. ``video_encoder`` (:data:`promptus.config.VIDEO_ENCODERS`): "cpu" (the
    default here), "auto" (NVENC where it opens, else the CPU encoder, saying so) or "nvenc".
    """

    def __init__(self, out: str | os.PathLike, fps: float, *, crf: int = 12, force: bool = False,
                 size: tuple[int, int] | None = None, kind: str | None = None, png_level: int = PNG_LEVEL,
                 workers: int | None = None, video_encoder: str = "cpu", png_processes: bool = False,
                 first: int = 0):
        self.out = Path(out)
        self.first = first  # the number of the first PNG: a stream played from a seek point keeps the clip's
        self.fps = fps
        self.count = 0
        self.size = size
        if not (isinstance(png_level, int) and 0 <= png_level <= 9):
            raise VideoError(f"PNG level {png_level!r}: choose a zlib level from 0 (fastest) to 9 (smallest)")
        self.png_level = png_level
        self.workers = _png_workers() if workers is None else max(1, int(workers))
        self.png_processes = png_processes
        self._pngs: PngPool | None = None
        self.video_encoder = video_encoder
        try:
            rate_ok = MIN_FPS <= float(fps) <= MAX_FPS
        except (TypeError, ValueError):
            rate_ok = False
        if not rate_ok:
            raise VideoError(f"fps={fps!r}: frames per second must lie in [{MIN_FPS:g}, {MAX_FPS:g}]")
        self._video = check_frames_output(out, kind) == "video"  # format and place, before any work
        self._into_existing = False
        if self._video:  # NVENC or the CPU encoder, chosen (and said) before any work
            self._codec = choose_video_encoder(self.out.suffix.lower(), video_encoder, crf)
            log.debug("video: %s in %s, %s", self._codec[1], self._codec[0], self._codec[2])
        try:
            if self._video:
                self.out.parent.mkdir(parents=True, exist_ok=True)
                # Temporary siblings with the umask's permissions: the renamed output keeps them.
                self._tmp = temp_sibling(self.out)
                self._crf = crf
                self._container = None
            elif self.out.is_dir():
                held = sum(1 for _ in self.out.iterdir())
                if held and not force:
                    raise VideoError(f"the output folder {self.out} already holds {held} "
                                     f"{'entry' if held == 1 else 'entries'}; choose a new or empty folder, or "
                                     "pass --force to replace its frame files (nothing else in it is touched)")
                # Written inside the folder itself: the same file system, and it works for "-o .".
                self._into_existing = True
                self._tmp = temp_sibling(self.out / ".promptus-frames", folder=True)
            else:
                self.out.parent.mkdir(parents=True, exist_ok=True)
                self._tmp = temp_sibling(self.out, folder=True)
        except OSError as e:
            raise VideoError(f"cannot write {self.out}: {e.strerror or e}") from None
        if not self._video and self.workers > 1:  # started now: its workers are up when the first frames come
            self._pngs = PngPool(self.workers, self.png_level, self.workers * PNG_QUEUE_PER_THREAD,
                                 processes=png_processes)

    def _open_video(self, h: int, w: int) -> None:
        import av

        fmt, codec, options = self._codec
        self._container = av.open(str(self._tmp), mode="w", format=fmt)
        rate = Fraction(self.fps).limit_denominator(1001)
        stream = self._container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options)
        stream.codec_context.thread_count = 0  # the encoder's own threads, as many as it finds cores
        self._stream = stream

    def write(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame)
        if self.size is not None and (frame.shape[1], frame.shape[0]) != tuple(self.size):
            raise VideoError(f"frame {self.count} is {frame.shape[1]}×{frame.shape[0]} but the clip is "
                             f"{self.size[0]}×{self.size[1]}; the model does not fit this clip")
        if self._video:
            import av

            if self._container is None:
                self._open_video(*frame.shape[:2])
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        elif self._pngs is not None:
            self._pngs.submit(frame, self._tmp / f"{self.first + self.count:05d}.png")
        else:
            save_png(frame, self._tmp / f"{self.first + self.count:05d}.png", self.png_level)
        self.count += 1

    def write_batch(self, frames: torch.Tensor | np.ndarray) -> None:
        arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else frames
        for f in arr:
            self.write(f)

    def close(self) -> Path:
        if self._pngs is not None:
            try:
                self._pngs.drain()  # every frame on disk (or the first failure raised) before anything moves
            except BaseException:
                self.abort()
                raise
        if self._video:
            if self._container is None:
                self.abort()
                raise VideoError("no frames were written")
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            os.replace(self._tmp, self.out)
        elif self._into_existing:
            # Only our own frame files replace their namesakes; nothing else in the folder is touched.
            for i in range(self.first, self.first + self.count):
                name = f"{i:05d}.png"
                try:
                    os.replace(self._tmp / name, self.out / name)
                except OSError as e:
                    self.abort()
                    raise VideoError(f"cannot write {self.out / name}: {e.strerror or e} "
                                     f"({i} of {self.count} frames are in place)") from None
            with contextlib.suppress(OSError):
                os.rmdir(self._tmp)
            stale = [p.name for p in self.out.glob("[0-9][0-9][0-9][0-9][0-9].png")
                     if int(p.stem) >= self.first + self.count]
            if stale:
                log.warning("%s still holds %d older frame files after the %d written now (%s...); they were "
                            "kept", self.out, len(stale), self.count, min(stale))
        else:
            os.replace(self._tmp, self.out)
        return self.out

    def abort(self) -> None:
        if self._pngs is not None:
            self._pngs.cancel()  # no worker writes into the temporary folder after it is removed
        if self._video:
            if self._container is not None:
                try:
                    self._container.close()
                except Exception:  # noqa: BLE001 - best effort cleanup of a temp file
                    pass
            self._tmp.unlink(missing_ok=True)
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "FrameWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_frames(frames: Iterable[np.ndarray], out: str | os.PathLike, fps: float, *, force: bool = False,
                 kind: str | None = None) -> int:
    """Write frames to ``out`` (PNG folder or video file, see :class:`FrameWriter`); returns the count."""
    with FrameWriter(out, fps, force=force, kind=kind) as w:
        for f in frames:
            w.write(f)
    return w.count


def _smooth_noise(rng: np.random.RandomState, h: int, w: int, scale: int) -> np.ndarray:
    """A bicubically upsampled random grid in [0, 1]: soft cloud shapes."""
    gh, gw = h // scale + 2, w // scale + 2
    grid = (rng.rand(gh, gw) * 255).astype(np.uint8)
    img = Image.fromarray(grid).resize((gw * scale, gh * scale), Image.BICUBIC)
    return np.asarray(img, np.float32)[:h, :w] / 255


def sky_clip(frame_count: int = 141, size: int = 128, seed: int = 0) -> np.ndarray:
    """The project's sample clip: a blue sky with clouds drifting past, uint8 N×size×size×3.

    Deterministic for a given seed on every machine (numpy RandomState + PIL).
    """
    rng = np.random.RandomState(seed)
    h = w = size
    span = w + int(frame_count * 0.75 * size / 64) + 1
    clouds = 0.6 * _smooth_noise(rng, h, span, max(1, size // 4)) + 0.4 * _smooth_noise(rng, h, span, max(1, size // 8))
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    top, horizon = np.array([40, 90, 190], np.float32), np.array([170, 205, 240], np.float32)
    sky = top + (horizon - top) * yy
    out = []
    for t in range(frame_count):
        x0 = int(t * 0.75 * size / 64)
        c = clouds[:, x0:x0 + w, None]
        alpha = np.clip((c - 0.45) * 3.0, 0, 1) * (0.4 + 0.6 * yy)
        out.append(np.clip(sky * (1 - alpha) + 250 * alpha + 0.5, 0, 255).astype(np.uint8))
    return np.stack(out)


def ensure_sample_clip(folder: str | os.PathLike, frame_count: int = 141, size: int = 128) -> Path:
    """Make the sample clip as PNG frames in ``folder`` unless it is already there."""
    folder = Path(folder)
    if folder.is_dir() and len(list(folder.glob("*.png"))) >= frame_count:
        return folder
    log.info("making the sample clip (%d frames, %d×%d) in %s", frame_count, size, size, folder)
    write_frames(sky_clip(frame_count, size), folder, fps=30, force=True, kind="folder")  # its own folder
    return folder


def native_frame_size(source: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the first frame of a folder of images, an image or a video file."""
    source = Path(source)
    if not source.exists():
        raise VideoError(f"{source} does not exist")
    if source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES:
        first = list_images(source)[0] if source.is_dir() else source
        with Image.open(first) as im:
            return im.size
    import av

    try:
        with av.open(str(source)) as c:
            if not c.streams.video:
                raise VideoError(f"{source} has no video stream")
            for frame in c.decode(video=0):
                return frame.width, frame.height
    except av.FFmpegError as e:
        raise VideoError(f"cannot read video {source}: {e}") from e
    raise VideoError(f"{source} holds no decodable video frames")


def synthetic_clip(frame_count: int, width: int = 64, height: int = 64, seed: int = 0) -> torch.Tensor:
    """A small deterministic test clip (uint8 N×H×W×3): a sky gradient with a drifting disc.

    Made in code so that tests and benchmarks (benchmarks/convergence.py) need no video files.
    """
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([60 + 100 * yy / height, 120 + 80 * yy / height, 200 + 40 * xx / width], -1)
    cx0, cy0 = rng.uniform(0.2, 0.4) * width, rng.uniform(0.3, 0.7) * height
    r = 0.18 * min(width, height)
    frames = []
    for t in range(frame_count):
        cx, cy = cx0 + 0.02 * width * t, cy0 + 0.01 * height * np.sin(t / 4)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img = base.copy()
        img[disc] = (240, 200, 80)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(frames))
