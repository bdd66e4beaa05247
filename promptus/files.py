"""Atomic file writes: a temporary sibling, fsync, then a rename over the target.

A reader never sees a half-written file, and a crash leaves the old file (or none).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

#: Temporary files start with this, so that clean-ups can find leftovers.
TMP_PREFIX = ".tmp-"


def atomic_write(path: str | os.PathLike, data: str | bytes | bytearray | memoryview | Any) -> Path:
    """Write ``data`` (text, or anything with the buffer protocol) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as f:  # plain open: the umask's permissions, unlike mkstemp's 0600
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path
