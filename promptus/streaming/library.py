"""The clips a server offers: the .promptus files under one root folder, and nothing else.

Every name a client sends is resolved by :meth:`ClipLibrary.resolve`: relative,
no ``..``, no backslash or NUL, and after following symlinks still inside the
root. A symlink that leads out of the root is refused like ``../``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..bitstream import Header, InitLatent, Keyframe, StreamParser, split_records
from ..config import ServerConfig
from ..errors import BitstreamError, PromptusError

log = logging.getLogger(__name__)

#: Video files shown beside a clip when one with the same stem sits next to it.
ORIGINAL_SUFFIXES = (".mp4", ".webm", ".m4v", ".mov")
#: Files the listing looks at before it stops (a root with more is probably a mistake).
MAX_LISTED = 10_000


class ClipNotFound(PromptusError):
    """No such file under the root (HTTP 404)."""


class ClipForbidden(PromptusError):
    """The name points outside the root, or at something that is not a plain file (HTTP 403)."""


@dataclass(frozen=True)
class Clip:
    """A parsed .promptus file: its pieces as sent on the wire and its items.

    ``error`` describes damage found in the file (the intact part before it is
    served); ``original`` names a video of the same clip next to it, if any.
    """

    name: str
    path: Path
    size: int
    header: Header
    init: InitLatent
    keyframes: list[Keyframe]
    pieces: list[bytes]
    error: str | None = None
    original: str | None = None
    original_kbps: float | None = None
    original_codec: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def kbps(self) -> float:
        """The whole file's bitrate over the clip's duration (every byte counted)."""
        return 8 * self.size / self.header.duration_s / 1000

    def info(self) -> dict:
        h = self.header
        return {"name": self.name, "bytes": self.size, "frames": h.frame_count, "fps": h.fps,
                "width": h.width, "height": h.height, "rank": h.rank, "interval": h.interval,
                "keyframes": h.keyframe_count, "duration_s": h.duration_s, "kbps": self.kbps,
                "model": h.model.name, "damaged": self.error, "original": self.original,
                "original_kbps": self.original_kbps, "original_codec": self.original_codec}


class ClipLibrary:
    """The .promptus files under ``root``, parsed on demand and cached by (path, mtime, size)."""

    def __init__(self, root: str | os.PathLike, *, max_file_bytes: int = ServerConfig.max_file_bytes,
                 cache_size: int = 64):
        root = Path(root)
        if not root.is_dir():
            raise PromptusError(f"{root} is not a folder; give the folder that holds the .promptus files to serve")
        self.root = root.resolve()
        self.max_file_bytes = max_file_bytes
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Clip] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, name: str, *, suffixes: tuple[str, ...] | None = None) -> Path:
        """The real path of file ``name`` under the root; ClipForbidden / ClipNotFound otherwise."""
        if not isinstance(name, str) or not name or len(name) > 1024 or "\x00" in name or "\\" in name:
            raise ClipForbidden("a clip name is a relative path with '/' separators")
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            raise ClipForbidden(f"{name!r} points outside the served folder")
        try:
            real = (self.root / pure).resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            raise ClipNotFound(f"no file {name!r} in the served folder") from None
        except (OSError, RuntimeError) as e:  # a symlink loop, say
            raise ClipForbidden(f"{name!r} cannot be opened ({e})") from None
        if not real.is_relative_to(self.root):
            raise ClipForbidden(f"{name!r} points outside the served folder")
        if not real.is_file():
            raise ClipForbidden(f"{name!r} is not a file")
        if suffixes is not None and real.suffix.lower() not in suffixes:
            raise ClipForbidden(f"{name!r} is not one of the served kinds of file ({', '.join(suffixes)})")
        return real

    def names(self) -> list[str]:
        """Names (relative, '/'-separated) of the .promptus files under the root, sorted."""
        out = []
        seen = 0
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                seen += 1
                if seen > MAX_LISTED:
                    log.warning("listing stopped after %d files under %s", MAX_LISTED, self.root)
                    return out
                if not f.endswith(".promptus"):
                    continue
                name = (Path(folder) / f).relative_to(self.root).as_posix()
                try:
                    self.resolve(name)
                except PromptusError:
                    continue  # a symlink out of the root, say: not offered
                out.append(name)
        return out

    def list(self) -> list[dict]:
        """``info()`` of every clip that parses; damaged ones say so in ``damaged``."""
        out = []
        for name in self.names():
            try:
                out.append(self.clip(name).info())
            except PromptusError as e:
                out.append({"name": name, "error": str(e)})
        return out

    def clip(self, name: str) -> Clip:
        """The parsed clip ``name`` (cached while the file is unchanged)."""
        path = self.resolve(name, suffixes=(".promptus",))
        st = path.stat()
        if st.st_size > self.max_file_bytes:
            raise ClipForbidden(f"{name!r} is {st.st_size} bytes, over this server's limit of {self.max_file_bytes}")
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        clip = self._load(name, path)
        with self._lock:
            self._cache[key] = clip
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return clip

    def _load(self, name: str, path: Path) -> Clip:
        data = path.read_bytes()
        pieces, error = split_records(data)
        parser = StreamParser()
        try:
            parser.feed(data)
        except BitstreamError:
            pass  # split_records reported it; the parser keeps what came before
        if parser.header is None or parser.init is None:
            raise PromptusError(f"{name}: {error}" if error else f"{name}: not a .promptus file")
        keyframes = list(parser.keyframes)
        pieces = pieces[:2 + len(keyframes) + (1 if parser.done else 0)]
        original, kbps, codec = self._original(name, parser.header)
        return Clip(name, path, len(data), parser.header, parser.init, keyframes, pieces,
                    str(error) if error else None, original, kbps, codec)

    def _original(self, name: str, header: Header) -> tuple[str | None, float | None, str | None]:
        stem = PurePosixPath(name).with_suffix("")
        for suffix in ORIGINAL_SUFFIXES:
            candidate = f"{stem}{suffix}"
            try:
                path = self.resolve(candidate)
            except PromptusError:
                continue
            seconds, codec = header.duration_s, None
            try:
                import av

                with av.open(str(path)) as c:
                    v = c.streams.video[0]
                    codec = v.codec_context.name
                    if v.duration is not None and v.time_base is not None:
                        seconds = float(v.duration * v.time_base) or seconds
            except Exception as e:  # noqa: BLE001 - an unreadable original is only not described
                log.info("could not probe %s: %s", path, e)
            return candidate, 8 * path.stat().st_size / seconds / 1000, codec
        return None, None, None
