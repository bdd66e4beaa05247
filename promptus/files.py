"""Files written atomically, and strict JSON.

Durability policy (one for every file promptus writes: bitstreams, checkpoints,
sweep tables, engine cache entries, benchmark JSON): the bytes go to a temporary
sibling, which is fsynced and renamed over the target; then the folder is fsynced
so that the rename itself survives a crash (where the platform allows it). A
reader sees the old file or the new one, never a partial one, and a failure leaves
no temporary file behind.

Reads of user-named files open regular files only: a FIFO, a device (/dev/zero) or a
folder given where a file belongs is refused at once instead of hanging or filling memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import uuid
from pathlib import Path
from typing import Any

from .errors import PromptusError

#: Temporary files start with this, so that clean-ups can find leftovers.
TMP_PREFIX = ".tmp-"


def temp_sibling(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Create a new, uniquely named temporary file (or folder) next to ``path``; returns its path.

    Its permissions come from the umask, like any file the user creates (0644 or 0755 under
    umask 022), unlike :mod:`tempfile`'s private 0600/0700: an output renamed into place keeps
    them, and a shared filesystem (a Ray cluster's) needs them readable.
    """
    tmp = _temp_name(path)
    if folder:
        os.mkdir(tmp, 0o777)
    else:
        os.close(_create_exclusive(tmp))
    return tmp


def _temp_name(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _create_exclusive(path: Path) -> int:
    # O_EXCL: never an existing file, nor one a symlink points to; 0o666 & ~umask, as for open().
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def check_output_path(path: str | os.PathLike, kind: str, *, make_folders: bool = True) -> Path:
    """Refuse, before any work, an output that cannot be written; returns it as a Path.

    ``kind`` is ``"file"`` or ``"folder"`` (the output itself). An existing output of the
    other kind, a missing parent folder when ``make_folders`` is false, a parent path that
    runs through a file, or a folder where no file can be created raise
    :class:`PromptusError` with a one-line message. Nothing is left behind.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', not {kind!r}")
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise PromptusError(f"{path} is a folder; give a file name")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise PromptusError(f"{path} exists and is not a folder; give a folder or another name")
    parent = path.parent
    if not make_folders and not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise PromptusError(f"cannot write {path}: the folder {parent} {what}; create it first or choose another path")
    existing = parent
    while not existing.exists():  # the folders to be made: the nearest existing one must take them
        existing = existing.parent
    if not existing.is_dir():
        raise PromptusError(f"cannot write {path}: {existing} is a file, not a folder")
    try:  # os.access says yes for root everywhere (/proc included): try it for real
        probe = temp_sibling(existing / "probe")
        probe.unlink()
    except OSError as e:
        raise PromptusError(f"cannot write {path}: {existing} does not accept new files "
                            f"({e.strerror or e}); choose another path") from None
    return path


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes | bytearray | memoryview | Any, *,
                 make_folder: bool = True) -> Path:
    """Write ``data`` (text, or anything with the buffer protocol) to ``path`` atomically.

    ``make_folder`` creates missing parent folders first. Raises ``OSError`` on failure.
    """
    path = Path(path)
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    tmp = _temp_name(path)
    try:
        fd = _create_exclusive(tmp)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_folder(path.parent)
    return path


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
    """Write strict JSON (non-finite floats as strings, indent 1) atomically."""
    return atomic_write(path, json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON written by :func:`write_json_atomic` (non-finite floats restored)."""
    return json_restore(json.loads(Path(path).read_text()))


def read_cache_json(path: str | os.PathLike, *, what: str, limit: int, format: int, field: str) -> dict | None:
    """``data[field]`` of a JSON cache file written as ``{"format": format, field: {...}}`` (a dict), or None for a
    file that is missing, unreadable, not a regular file, over ``limit`` bytes, not JSON or of another format:
    a cache is never an error, it is rewritten."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(read_regular(path, what=what, limit=limit))
    except Exception as e:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).debug("%s %s ignored (%s: %s)", what, path, type(e).__name__, e)
        return None
    if not isinstance(data, dict) or data.get("format") != format or not isinstance(data.get(field), dict):
        return None
    return data[field]


def read_regular(path: str | os.PathLike, *, what: str = "file", limit: int | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (symlinks to one are fine).

    Opened non-blocking and checked with fstat before reading, so that a FIFO or a
    device never blocks or streams forever. ``limit``: refuse a larger file. Every
    failure is a :class:`PromptusError` naming the path.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise PromptusError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PromptusError(f"{path} is a folder, not a {what}") from None
    except OSError as e:
        raise PromptusError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise PromptusError(f"{path} is a folder, not a {what}")
        if not stat.S_ISREG(st.st_mode):
            raise PromptusError(f"{path} is not a regular file (a pipe, socket or device?); give a {what}")
        if limit is not None and st.st_size > limit:
            raise PromptusError(f"{path} is {st.st_size} bytes; a {what} is at most {limit} bytes")
        chunks, total = [], 0
        while True:  # read to EOF, but never past the limit even if the file grows meanwhile
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if limit is not None and total > limit:
                raise PromptusError(f"{path} grew past {limit} bytes while being read")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise PromptusError(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


# --------------------------------------------------------------- outputs

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not after hours of work, when no file can be written next to ``path``.

    The probe is a new file with a unique name, created exclusively (O_EXCL: it never
    opens an existing file, nor follows a symbolic link planted under its name), then
    removed: nothing that exists is ever truncated, and two processes probing the same
    folder never collide. Missing parent folders are created.
    """
    path = Path(path)
    probe = path.with_name(f"{TMP_PREFIX}probe-{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PromptusError(f"cannot write next to {path}: {e.strerror or e}; choose another -o path") from None


def open_append(path: str | os.PathLike):
    """A text file opened for appending that is never a symbolic link (O_NOFOLLOW): a link
    planted under the name of a log cannot redirect writes into another file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as e:
        raise PromptusError(f"cannot append to {path}: {e.strerror or e} (a symbolic link is refused)") from None
    return os.fdopen(fd, "a")


class OutputLock:
    """An exclusive lock on an output path, held while one process writes it.

    The lock is ``flock`` on a sibling ``NAME.lock`` holding the owner's pid; a second
    process that asks for the same output gets a :class:`PromptusError` naming that pid
    instead of silently replacing the first one's work. The lock file is opened without
    following symbolic links, and removed (while still locked) on release. The kernel
    drops the lock when its process dies, so a killed run never leaves a stale lock.
    Where ``fcntl`` does not exist (Windows) it is a no-op.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
            except OSError as e:
                raise PromptusError(f"cannot lock {self.path} ({self.lock_path}: {e.strerror or e}); "
                                    "choose another -o path") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise PromptusError(f"{self.path} is being written by another process (pid {owner[:20]}); wait "
                                    f"for it to finish or choose another -o path") from None
            try:  # the file may have been removed by its last owner between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.lock_path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock_path)  # while still holding it: a waiter then retries on a fresh file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
