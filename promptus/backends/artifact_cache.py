"""One cache for everything promptus builds once and loads later, keyed by everything that changes it.

Artifacts of several *kinds* live under one engine folder (``engines/`` by default):
TensorRT engines (:mod:`promptus.backends.engine_cache`), the compile backend's compiled
decoder step and the encoder's compiled trainer step (:mod:`promptus.backends.compile_cache`).
A kind is registered once (:func:`register_kind`) with its key type, sub-folder, payload
suffix and sidecar format; everything else — lookup, store, evict, list, clean — is here,
once. An entry is two files (three for engines once run)::

    <stem><suffix>   the artifact: bytes the cache never interprets
    <stem>.json      its sidecar: the key, the artifact's size and SHA-256, build facts
    <stem><companion>  optional per-entry files that go with it (TensorRT-RTX's .rtcache)

``<stem>`` is readable (the key's main fields) and ends with a digest of the whole key.
The sidecar is written last and vouches for the artifact by size and hash; both writes
are atomic (:func:`promptus.files.atomic_write`). Nothing on disk is trusted: a
half-written, truncated or corrupted artifact, a sidecar that is not JSON, too large,
of another format or of another key is *unusable* — :meth:`ArtifactCache.read` removes
it with a warning and reports a miss, and the caller rebuilds. Only regular files are
opened, never more bytes than the sidecar records (plus one), and no sidecar beyond
:data:`MAX_SIDECAR_BYTES`: a path that is a FIFO, a device or a link to ``/dev/zero``
cannot hang or exhaust a lookup. A folder where a cache file should be is the user's
to remove (:class:`NotARegularFile`).

Entries whose toolkit is not the installed one (another torch, Triton or TensorRT
version) can never load again: they list as ``stale`` and ``clean`` removes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULT_ENGINE_DIR
from ..errors import PromptusError
from ..files import TMP_PREFIX, atomic_write

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
#: A sidecar is a few hundred bytes; anything this big is not one of ours.
MAX_SIDECAR_BYTES = 1 << 20


class ArtifactCacheError(PromptusError):
    """The engine folder (or a kind's sub-folder) cannot be used, e.g. it is a file."""


class NotARegularFile(ArtifactCacheError):
    """A cache path is a folder, a device, a FIFO or a link to one."""


def read_regular_file(path: str | os.PathLike, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path``, which must be a regular file (links are followed).

    Raises :class:`NotARegularFile` for anything else and ``OSError`` when it cannot be
    read. Reading one byte past ``limit`` lets the caller see that a file is too long.
    """
    path = Path(path)
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise NotARegularFile(f"{path} is a folder, not a file; remove it or choose another path")
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{path} is not a regular file (a device, FIFO or socket); remove it")
    # O_NONBLOCK: should the path become a FIFO after the check, opening it must not wait for a writer
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotARegularFile(f"{path} is not a regular file; remove it")
        return f.read(limit + 1)


class CacheKey:
    """What a cached artifact depends on, as a frozen dataclass of int and str fields.

    Subclasses (one per kind) add :attr:`stem` (readable file name ending in :attr:`digest`),
    :meth:`describe` (one line for logs), :meth:`summary` (the key fields that apply, for
    ``promptus engines list``) and :meth:`toolkit` (what built it, with its version).
    """

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any):
        """Inverse of :meth:`as_dict`; raises ``ValueError`` on missing, extra or mistyped fields."""
        if not isinstance(d, dict):
            raise ValueError(f"key is a {type(d).__name__}, not an object")
        fields = dataclasses.fields(cls)
        if set(d) != {f.name for f in fields}:
            raise ValueError(f"key fields {sorted(d)} differ from {sorted(f.name for f in fields)}")
        for f in fields:
            want = int if f.type in (int, "int") else str
            if type(d[f.name]) is not want:
                raise ValueError(f"key field {f.name} is {d[f.name]!r}, expected {want.__name__}")
        return cls(**d)

    @property
    def digest(self) -> str:
        """16 hex digits of SHA-256 over the canonical JSON of every field."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def stem(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return self.stem

    def summary(self) -> str:
        """The key fields that apply to this kind, for a table."""
        return self.describe()

    def toolkit(self) -> str:
        """What built the artifact, named with its version (e.g. ``"tensorrt_rtx 1.7.1"``)."""
        return ""


#: ``stale(key, installed) → why or None``: why an intact entry can never load with the installed
#: toolkit; ``installed`` maps toolkit names to versions the caller found (e.g. TensorRT flavours).
Staleness = Callable[[Any, Mapping[str, str]], "str | None"]


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of cached artifact.

    Attributes:
        name: identifier (``"tensorrt_engine"``, ``"compiled_decoder"``, ``"compiled_trainer"``).
        title: what ``promptus engines list`` calls it ("TensorRT engine").
        key_type: the :class:`CacheKey` subclass of its entries.
        subdir: sub-folder of the engine folder ("" for the folder itself). Kinds sharing a
            folder must use different payload suffixes.
        suffix: the artifact file's suffix.
        format: sidecar layout version; a sidecar of another format is unusable.
        payload: sidecar field prefix: ``<payload>_file``, ``<payload>_bytes``, ``<payload>_sha256``.
        companions: suffixes of per-entry files removed with the entry (stored artifacts replace them).
        extras: glob patterns in the kind's folder that ``clean --all`` also removes (shared caches).
        stale: see :data:`Staleness`; None: never stale.
    """

    name: str
    title: str
    key_type: type
    subdir: str
    suffix: str
    format: int
    payload: str = "artifact"
    companions: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    stale: Staleness | None = None

    @property
    def suffixes(self) -> tuple[str, ...]:
        return (self.suffix, SIDECAR_SUFFIX, *self.companions)

    def stem_of(self, path: Path) -> str:
        """The name without its suffix (stems hold dots: ``Path.with_suffix`` would cut them)."""
        for suffix in self.suffixes:
            if path.name.endswith(suffix):
                return path.name[: -len(suffix)]
        return path.name


_KINDS: dict[str, ArtifactKind] = {}


def register_kind(kind: ArtifactKind) -> ArtifactKind:
    """Add ``kind`` (its module calls this at import); re-registering an equal kind is a no-op."""
    old = _KINDS.get(kind.name)
    if old is not None and old != kind:
        raise ArtifactCacheError(f"an artifact kind named {kind.name!r} is already registered")
    for other in _KINDS.values():
        if other.name != kind.name and other.subdir == kind.subdir and set(other.suffixes) & {kind.suffix}:
            raise ArtifactCacheError(f"artifact kinds {other.name} and {kind.name} would share files in one folder")
    _KINDS[kind.name] = kind
    return kind


def artifact_kind(kind: ArtifactKind | str) -> ArtifactKind:
    if isinstance(kind, ArtifactKind):
        return kind
    try:
        return _KINDS[kind]
    except KeyError:
        raise ArtifactCacheError(f"unknown artifact kind {kind!r}; known: {', '.join(_KINDS)}") from None


def artifact_kinds() -> list[ArtifactKind]:
    """Every registered kind, in registration order."""
    return list(_KINDS.values())


@dataclass
class CacheEntry:
    """One entry (or stray file) of a kind's folder, as :func:`list_artifacts` finds it.

    ``status``: ``"ok"``; ``"stale"`` (intact, but made by a toolkit other than the installed
    one: it can never load again); ``"corrupt"`` (``reason`` says why); ``"orphan"`` (an
    artifact without sidecar or a sidecar without artifact); ``"temp"`` (left over from
    an interrupted write).
    """

    kind: ArtifactKind
    path: Path
    status: str
    reason: str = ""
    key: CacheKey | None = None
    sidecar: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0

    @property
    def created(self) -> str:
        value = self.sidecar.get("created")
        return value if isinstance(value, str) else ""

    @property
    def files(self) -> list[Path]:
        """The entry's files that exist, sidecar first (what a removal must take first)."""
        if self.status == "temp":
            return [self.path]
        stem = self.kind.stem_of(self.path)
        order = (SIDECAR_SUFFIX, self.kind.suffix, *self.kind.companions)
        return [p for p in (self.path.with_name(stem + s) for s in order) if os.path.lexists(p)]


def _remove(path: Path) -> None:
    """Remove a cache file (or link); a folder in its place is the user's to remove."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise NotARegularFile(f"{path} is a folder, not a cache file; remove it or choose another --engine-dir")
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def read_sidecar(path: Path, kind: ArtifactKind) -> tuple[dict[str, Any] | None, str]:
    """(sidecar, "") when ``path`` holds a sidecar of ``kind``'s format, else (None, why); bounded and hardened."""
    if not os.path.lexists(path):
        return None, "no sidecar"
    try:
        raw = read_regular_file(path, MAX_SIDECAR_BYTES)
    except (OSError, ArtifactCacheError) as e:
        return None, f"sidecar is not readable ({e})"
    if len(raw) > MAX_SIDECAR_BYTES:
        return None, f"sidecar is over {MAX_SIDECAR_BYTES} bytes"
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        return None, f"sidecar is not readable JSON ({type(e).__name__})"
    if not isinstance(meta, dict):
        return None, "sidecar is not a JSON object"
    if meta.get("format") != kind.format:
        return None, f"sidecar format {meta.get('format')!r} is not {kind.format}"
    return meta, ""


def _payload_problem(path: Path, meta: dict[str, Any], kind: ArtifactKind, *,
                     verify_hash: bool = True) -> tuple[bytes | None, str | None]:
    """(bytes or None, None) when the artifact matches its sidecar, else (None, why).

    Reads the artifact once, at most the size the sidecar records (plus one byte), and only
    when it is a regular file of that size; ``verify_hash=False`` checks only the size.
    """
    what = kind.payload
    if not os.path.lexists(path):
        return None, f"{what} file missing"
    expected = meta.get(f"{what}_bytes")
    if type(expected) is not int or expected < 0:
        return None, f"sidecar gives no {what} size ({expected!r})"
    try:
        st = os.stat(path)
    except OSError as e:
        return None, f"{what} file cannot be read ({e})"
    if stat.S_ISDIR(st.st_mode):
        raise NotARegularFile(f"{path} is a folder, not a {what} file; remove it or choose another --engine-dir")
    if not stat.S_ISREG(st.st_mode):
        return None, f"{what} path is not a regular file (a device, FIFO or a link to one)"
    if st.st_size != expected:
        return None, f"{what} file has {st.st_size} bytes, the sidecar says {expected} (truncated?)"
    if not verify_hash:
        return None, None
    try:
        data = read_regular_file(path, expected)
    except (OSError, NotARegularFile) as e:
        return None, f"{what} file cannot be read ({e})"
    if len(data) != expected:
        return None, f"{what} file changed while it was read ({len(data)} bytes, expected {expected})"
    if hashlib.sha256(data).hexdigest() != meta.get(f"{what}_sha256"):
        return None, f"{what} file's SHA-256 differs from the sidecar's (corrupted)"
    return data, None


class ArtifactCache:
    """The entries of one kind under one engine folder; see the module docstring.

    ``read(key)`` → bytes or None (an unusable entry is removed, with a warning: rebuild);
    ``store(key, data, **facts)`` → path; ``evict(key)``; ``check(key)`` → (bytes, None) or
    (None, why) without removing anything; ``lookup(key)`` → the artifact's path or None.
    """

    def __init__(self, kind: ArtifactKind | str, engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR):
        self.kind = artifact_kind(kind)
        root = Path(engine_dir)
        if root.exists() and not root.is_dir():
            raise ArtifactCacheError(f"engine folder {root} is a file; pass --engine-dir with a folder")
        self.dir = root / self.kind.subdir if self.kind.subdir else root
        if self.dir.exists() and not self.dir.is_dir():
            raise ArtifactCacheError(f"{self.dir} is a file; remove it or pass another --engine-dir")

    def path(self, key: CacheKey) -> Path:
        """Where the artifact of ``key`` lives."""
        return self.dir / (key.stem + self.kind.suffix)

    def sidecar_path(self, key: CacheKey) -> Path:
        return self.dir / (key.stem + SIDECAR_SUFFIX)

    def companion_path(self, key: CacheKey, suffix: str) -> Path:
        return self.dir / (key.stem + suffix)

    def _check_key(self, key: CacheKey) -> tuple[dict[str, Any] | None, str | None]:
        """(sidecar, None) when the sidecar vouches for ``key``, else (None, why); why is "missing" if absent."""
        if not os.path.lexists(self.sidecar_path(key)) and not os.path.lexists(self.path(key)):
            return None, "missing"
        meta, why = read_sidecar(self.sidecar_path(key), self.kind)
        if meta is None:
            return None, why
        try:
            found = self.kind.key_type.from_dict(meta.get("key"))
        except (ValueError, TypeError) as e:
            return None, f"sidecar key is malformed ({e})"
        if found != key:
            want = key.as_dict()
            diff = [f"{k}: {v!r} ≠ {want[k]!r}" for k, v in found.as_dict().items() if want[k] != v]
            return None, "sidecar key does not match (" + ", ".join(diff) + ")"
        return meta, None

    def check(self, key: CacheKey) -> tuple[bytes | None, str | None]:
        """(artifact bytes, None) for an intact entry, else (None, why: ``"missing"`` if absent); removes nothing."""
        meta, why = self._check_key(key)
        if meta is None:
            return None, why
        return _payload_problem(self.path(key), meta, self.kind)

    def problem(self, key: CacheKey) -> str | None:
        """Why the entry for ``key`` cannot be used (``"missing"`` if absent), or None if it can."""
        return self.check(key)[1]

    def read(self, key: CacheKey) -> bytes | None:
        """The artifact of ``key``, read once and checked against its sidecar; None on a miss.

        An unusable entry is removed (and logged), so the caller rebuilds. A folder where
        a cache file should be raises :class:`NotARegularFile`: removing it is the user's call.
        """
        data, why = self.check(key)
        if data is not None:
            return data
        if why != "missing":
            log.warning("%s %s is unusable (%s); it will be rebuilt", self.kind.title, self.path(key).name, why)
            self.evict(key)
        return None

    def lookup(self, key: CacheKey) -> Path | None:
        """The artifact file for ``key`` if its entry is intact (it is read and hashed); else as :meth:`read`."""
        return self.path(key) if self.read(key) is not None else None

    def store(self, key: CacheKey, data: Any, **facts: Any) -> Path:
        """Write ``data`` (bytes-like), then its sidecar (what makes the entry valid), each atomically.

        ``facts`` (JSON values: build seconds, model name, ...) go into the sidecar. Companion
        files of the entry this one replaces are removed first.
        """
        view = memoryview(data)
        path = self.path(key)
        for suffix in self.kind.companions:
            _remove(self.companion_path(key, suffix))
        atomic_write(path, view)
        what = self.kind.payload
        meta = {
            "format": self.kind.format,
            "kind": self.kind.name,
            "key": key.as_dict(),
            "key_digest": key.digest,
            f"{what}_file": path.name,
            f"{what}_bytes": view.nbytes,
            f"{what}_sha256": hashlib.sha256(view).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **facts,
        }
        atomic_write(self.sidecar_path(key), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return path

    def evict(self, key: CacheKey) -> None:
        """Remove the entry for ``key`` (sidecar first, so no half-entry looks valid)."""
        _remove(self.sidecar_path(key))
        _remove(self.path(key))
        for suffix in self.kind.companions:
            _remove(self.companion_path(key, suffix))

    def entries(self, *, verify: bool = True, installed: Mapping[str, str] | None = None) -> list[CacheEntry]:
        """Every entry and stray file of this kind, sorted by name (see :func:`list_artifacts`)."""
        return _list_kind(self.dir, self.kind, verify=verify, installed=installed or {})


def _list_kind(d: Path, kind: ArtifactKind, *, verify: bool, installed: Mapping[str, str]) -> list[CacheEntry]:
    if not d.is_dir():
        return []
    entries: list[CacheEntry] = []
    stems = set()
    for p in sorted(d.iterdir()):
        if p.name.startswith(TMP_PREFIX):
            if p.is_file():
                entries.append(CacheEntry(kind, p, "temp", "left over from an interrupted write",
                                          nbytes=p.stat().st_size))
            continue
        if p.name.endswith(kind.suffixes):
            stems.add(kind.stem_of(p))
    what = kind.payload
    for stem in sorted(stems):
        path, sidecar = d / (stem + kind.suffix), d / (stem + SIDECAR_SUFFIX)
        nbytes = path.stat().st_size if path.is_file() else 0
        if not os.path.lexists(sidecar):
            why = f"{what} without sidecar" if os.path.lexists(path) else f"{'/'.join(kind.companions)} without {what}"
            entries.append(CacheEntry(kind, path, "orphan", why, nbytes=nbytes))
            continue
        if not os.path.lexists(path):
            entries.append(CacheEntry(kind, path, "orphan", f"sidecar without {what}"))
            continue
        meta, why = read_sidecar(sidecar, kind)
        if meta is None:
            entries.append(CacheEntry(kind, path, "corrupt", why, nbytes=nbytes))
            continue
        try:
            key = kind.key_type.from_dict(meta.get("key"))
        except (ValueError, TypeError) as e:
            entries.append(CacheEntry(kind, path, "corrupt", f"sidecar key is malformed ({e})", sidecar=meta,
                                      nbytes=nbytes))
            continue
        try:
            why = _payload_problem(path, meta, kind, verify_hash=verify)[1]
        except NotARegularFile as e:
            why = str(e)
        if why is None and key.stem != stem:
            why = f"file name does not match its key (expected {key.stem})"
        status = "corrupt" if why else "ok"
        if status == "ok" and kind.stale is not None:
            why = kind.stale(key, installed)
            status = "stale" if why else "ok"
        entries.append(CacheEntry(kind, path, status, why or "", key, meta, nbytes))
    return sorted(entries, key=lambda e: e.path.name)


def _kinds(kinds: Iterable[ArtifactKind | str] | None) -> list[ArtifactKind]:
    return artifact_kinds() if kinds is None else [artifact_kind(k) for k in kinds]


def list_artifacts(engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, kinds: Iterable[ArtifactKind | str] | None = None,
                   *, verify: bool = True, installed: Mapping[str, str] | None = None) -> list[CacheEntry]:
    """Every entry and stray file of ``kinds`` (default: all registered) under ``engine_dir``.

    Sorted by kind (in registration order), then by name. ``verify=False`` skips the SHA-256
    of each artifact (the size is still checked). ``installed``: toolkit versions found by
    the caller (e.g. TensorRT flavours), against which entries are judged stale.
    """
    root = Path(engine_dir)
    out: list[CacheEntry] = []
    for kind in _kinds(kinds):
        out += _list_kind(root / kind.subdir if kind.subdir else root, kind, verify=verify, installed=installed or {})
    return out


def clean_artifacts(engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, kinds: Iterable[ArtifactKind | str] | None = None,
                    *, everything: bool = False, match: Callable[[CacheKey], bool] | None = None,
                    installed: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                    dry_run: bool = False) -> list[Path]:
    """Remove entries of ``kinds`` (default: all); returns the files removed (or that would be, with ``dry_run``).

    Always removed: unusable entries (corrupt, orphan, stale) and temporary files. Also removed:
    with ``everything``, every entry and each kind's shared extras (TensorRT timing caches);
    with ``match``, the entries whose key it accepts. An entry's sidecar goes first, so that an
    interrupted clean never leaves an artifact its sidecar vouches for half-deleted. A folder
    where a cache file should be raises :class:`NotARegularFile`.
    """
    installed = dict(installed or {})
    root = Path(engine_dir)
    removed: list[Path] = []
    for kind in _kinds(kinds):
        d = root / kind.subdir if kind.subdir else root
        for e in _list_kind(d, kind, verify=True, installed=installed):
            if not (everything or e.status != "ok" or (match is not None and e.key is not None and match(e.key))):
                continue
            for p in e.files:
                removed.append(p)
                if not dry_run:
                    _remove(p)
        if everything and d.is_dir():
            for pattern in kind.extras:
                for p in sorted(d.glob(pattern)):
                    removed.append(p)
                    if not dry_run:
                        _remove(p)
    return removed


__all__ = [
    "ArtifactCache", "ArtifactCacheError", "ArtifactKind", "CacheEntry", "CacheKey", "MAX_SIDECAR_BYTES",
    "NotARegularFile", "SIDECAR_SUFFIX", "artifact_kind", "artifact_kinds", "clean_artifacts", "list_artifacts",
    "read_regular_file", "read_sidecar", "register_kind",
]
