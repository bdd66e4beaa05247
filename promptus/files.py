"""Files written atomically, and strict JSON.

Durability policy (one for every file promptus writes: bitstreams, checkpoints,
sweep tables, engine cache entries, benchmark JSON): the bytes go to a temporary
sibling, which is fsynced and renamed over the target; then the folder is fsynced
so that the rename itself survives a crash (where the platform allows it). A
reader sees the old file or the new one, never a partial one, and a failure leaves
no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

#: Temporary files start with this, so that clean-ups can find leftovers.
TMP_PREFIX = ".tmp-"


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
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        # 0o666: the umask decides the final permissions, as for a plain open() (mkstemp would give 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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
