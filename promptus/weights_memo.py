"""What a decoder's start-up learnt about a weights file, kept for the next process.

Two facts cost seconds to recompute and depend only on the bytes of the weights:

* the weights' digest (:func:`promptus.models.model_digest`, the bitstream's model
  check): SHA-256 over 1.7 GB in fp16, 1.2–2.7 s of a decode's start-up on an H100 host;
* the architecture digest and shared-prefix verdict that key the compiled step
  (:mod:`promptus.backends.compile_cache`): without them the start-up builds the
  networks once on the meta device before it can look for the stored step.

A memo entry is keyed by the files it was computed from — the UNet weights and the
TAESD source, each file's resolved path, size, modification time (ns) and inode, a
folder's files likewise — as git's index decides a file is unchanged. Weights that are
built in code, come from the hub or live in a folder of more than :data:`MAX_FILES`
files get no entry. The memo is one small JSON file
(``$PROMPTUS_CACHE_DIR`` or ``$XDG_CACHE_HOME/promptus``, else ``~/.cache/promptus``),
written atomically, at most :data:`MAX_ENTRIES` entries; a missing, oversized or
damaged memo is ignored (and rewritten), never an error. It holds no weights and no
code: a wrong entry can only make the model check or the compiled-step lookup answer
for other weights, and the files' stat would have to be forged for that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1
FILENAME = "weights-memo.json"
MAX_ENTRIES = 64
MAX_BYTES = 1 << 20
#: A folder of more files than this is not fingerprinted by stat (a hub cache, say).
MAX_FILES = 256

_lock = threading.Lock()


def memo_path() -> Path:
    """The memo file: ``$PROMPTUS_CACHE_DIR/weights-memo.json``, else under ``$XDG_CACHE_HOME/promptus`` or
    ``~/.cache/promptus``."""
    env = os.environ.get("PROMPTUS_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptus"
    return base / FILENAME


def _stat_entry(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino]


def files_fingerprint(source: str | os.PathLike | None) -> list | None:
    """Path, size, mtime and inode of ``source`` (a file) or of every file under it (a folder, sorted);
    None for anything else (a hub id, a name, a folder of more than :data:`MAX_FILES` files)."""
    if source is None:
        return None
    path = Path(os.path.expanduser(str(source)))
    try:
        if path.is_file():
            return [_stat_entry(path)]
        if not path.is_dir():
            return None
        out = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                out.append(_stat_entry(Path(root) / name))
                if len(out) > MAX_FILES:
                    return None
        return out or None
    except OSError:
        return None


def weights_key(spec: str, taesd: str | os.PathLike | None, checkpoints_dir: str | os.PathLike) -> str | None:
    """The memo key of the weights ``load_models(spec, taesd=taesd, checkpoints_dir=...)`` reads, or None when
    they are not all local files (see the module docstring)."""
    from .models import TAESD_FOLDER, find_default_weights

    if spec == "auto":
        spec = find_default_weights(checkpoints_dir) or ""
    if spec in ("", "tiny", "random"):
        return None
    unet = files_fingerprint(spec)
    tiny = files_fingerprint(taesd if taesd is not None else Path(checkpoints_dir) / TAESD_FOLDER)
    if unet is None or tiny is None:
        return None
    return hashlib.sha256(json.dumps([FORMAT, unet, tiny]).encode()).hexdigest()


def _read() -> dict:
    from .files import read_cache_json

    entries = read_cache_json(memo_path(), what="weights memo", limit=MAX_BYTES, format=FORMAT, field="entries")
    return {k: v for k, v in (entries or {}).items() if isinstance(k, str) and isinstance(v, dict)}


def get(key: str | None) -> dict:
    """The facts remembered for ``key`` (empty when none)."""
    if key is None:
        return {}
    with _lock:
        return dict(_read().get(key, {}))


def put(key: str | None, **facts) -> None:
    """Remember ``facts`` (JSON values) for ``key``, beside what is remembered already; the least recently
    written entries beyond :data:`MAX_ENTRIES` are dropped. A memo that cannot be written is skipped."""
    if key is None:
        return
    from .files import write_json_atomic

    with _lock:
        entries = _read()
        entry = {**entries.get(key, {}), **facts, "written": time.time()}
        entries[key] = entry
        newest = sorted(entries.items(), key=lambda kv: kv[1].get("written", 0) if isinstance(
            kv[1].get("written", 0), (int, float)) else 0)[-MAX_ENTRIES:]
        # Within MAX_BYTES too (an entry with a name map holds ~60 kB): the oldest entries go first.
        while len(newest) > 1 and len(json.dumps({"format": FORMAT, "entries": dict(newest)})) > MAX_BYTES * 0.9:
            newest = newest[1:]
        try:
            memo_path().parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(memo_path(), {"format": FORMAT, "entries": dict(newest)})
        except OSError as e:
            log.debug("weights memo not written (%s)", e)


__all__ = ["FILENAME", "FORMAT", "MAX_ENTRIES", "MAX_FILES", "files_fingerprint", "get", "memo_path", "put",
           "weights_key"]
