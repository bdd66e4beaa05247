"""Reading and writing .promptus files: atomic writes that are parsed back first, and
reads that name the file in every error."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BitstreamError, PromptusError
from ..files import atomic_write, read_regular
from .parser import from_bytes
from .records import Bitstream, to_bytes


def write(path: str | os.PathLike, bs: Bitstream, *, entropy: str = "auto") -> int:
    """Write ``bs`` to ``path`` atomically; return the number of bytes written.

    :func:`promptus.files.atomic_write`: readers see the old file or the new one,
    never a partial one, and a failure leaves no file behind (PromptusError). The
    bytes are parsed back before they are written: this never writes a file that
    :func:`read` refuses.
    """
    data = to_bytes(bs, entropy=entropy)
    try:
        from_bytes(data)
    except BitstreamError as e:
        raise PromptusError(f"refusing to write {path}: the bitstream would not read back ({e})") from None
    path = Path(path)
    if path.is_dir():
        raise PromptusError(f"cannot write {path}: it is a folder; give a file name such as {path / 'clip.promptus'}")
    folder = path.parent
    if not folder.is_dir():
        raise PromptusError(f"cannot write {path}: the folder {folder} does not exist")
    try:
        atomic_write(path, data, make_folder=False)
    except OSError as e:
        raise PromptusError(f"could not write {path}: {e.strerror or e}") from e
    return len(data)


def read(path: str | os.PathLike) -> Bitstream:
    """Read a complete .promptus file; BitstreamError (with ``partial``) if it is damaged."""
    path = Path(path)
    if path.is_dir():
        raise PromptusError(f"{path} is a folder, not a .promptus file (legacy release folders: "
                            "`promptus import-legacy`)")
    data = read_regular(path, what=".promptus file")
    try:
        return from_bytes(data)
    except BitstreamError as e:
        raise BitstreamError(f"{path}: {e}", record=e.record, partial=e.partial) from None
