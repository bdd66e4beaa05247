"""The engine cache: built TensorRT engines on disk, keyed by everything that changes them.

An entry is two files in the engine folder (``engines/`` by default), and a third once run::

    <stem>.engine    the serialized engine
    <stem>.json      its sidecar: the key fields, the engine's size and SHA-256, build facts
    <stem>.rtcache   TensorRT-RTX's runtime cache: kernels it compiled for this GPU at first use

and standard TensorRT builds share a timing cache per TensorRT version and GPU model
(``timing_*.timing``), so that a second build skips the tactic timings of the first.

where ``<stem>`` is readable (component, batch, size, precision, flavour, compute
capability) and ends with a digest of the whole :class:`EngineKey`. The sidecar is
written last and vouches for the engine by size and hash, so a half-written, truncated
or corrupted engine, a sidecar that is not JSON, or one whose key differs from the key
asked for is *unusable*: :meth:`EngineCache.read` removes it and reports a miss, and
the caller rebuilds. Only regular files are opened, and never more bytes than the
sidecar records (an engine path that is a FIFO or a link to ``/dev/zero`` cannot hang a
lookup). Nothing here imports TensorRT; building is :mod:`promptus.backends.trt_build`.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config import DEFAULT_ENGINE_DIR
from ..errors import PromptusError
from ..files import TMP_PREFIX, atomic_write  # noqa: F401 (atomic_write: part of this module's API)
from .onnx_export import GRAPH_VERSION

log = logging.getLogger(__name__)

#: Layout version of the sidecar files; entries of another format are unusable.
#: 2: the key names the GPU model (``gpu``).
CACHE_FORMAT = 2
ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".json"
RUNTIME_CACHE_SUFFIX = ".rtcache"
TIMING_CACHE_SUFFIX = ".timing"
SUFFIXES = (ENGINE_SUFFIX, SIDECAR_SUFFIX, RUNTIME_CACHE_SUFFIX)
#: A sidecar is a few hundred bytes; anything this big is not one of ours.
MAX_SIDECAR_BYTES = 1 << 20
#: Key value of ``gpu`` for engines that run on any GPU of their compute capabilities (TensorRT-RTX).
ANY_GPU = "any"


class EngineCacheError(PromptusError):
    """The engine folder cannot be used (e.g. it is a file)."""


class CacheKey:
    """What a cached artifact depends on, as a frozen dataclass of int and str fields.

    Shared by :class:`EngineKey` and the compiled decoder's key: the JSON round trip
    that a sidecar stores, and the digest that tells keys apart in file names.
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


@dataclass(frozen=True)
class EngineKey(CacheKey):
    """Everything an engine depends on. Two builds with equal keys are interchangeable.

    Attributes:
        model_digest: hex digest of the weights (``Models.identity().hexdigest``).
        component: ``"unet"`` or ``"taesd_decoder"``.
        batch, size: the fixed batch and frame size (pixels) the engine runs.
        precision: ``"fp16"`` or ``"fp32"`` (the ONNX graph's float type; engines are strongly typed).
        flavour: ``"tensorrt"`` or ``"tensorrt_rtx"``.
        trt_version: the version of that TensorRT library (engines do not move across versions).
        compute_capability: the GPUs the engine targets: ``"sm89"`` for one compute
            capability, or ``"portable"`` for TensorRT-RTX's default multi-GPU target
            (what it builds on a machine without a GPU).
        gpu: the GPU model a standard TensorRT engine was built and tuned on
            (``torch.cuda.get_device_name``: NVIDIA advises against moving its engines
            between models, even of one compute capability); ``"any"`` for
            TensorRT-RTX, which compiles its kernels for the GPU it finds at first use.
        graph_version: :data:`promptus.backends.onnx_export.GRAPH_VERSION` (export layout).
    """

    model_digest: str
    component: str
    batch: int
    size: int
    precision: str
    flavour: str
    trt_version: str
    compute_capability: str
    gpu: str = ANY_GPU
    graph_version: int = GRAPH_VERSION


    @property
    def stem(self) -> str:
        """File name without suffix: readable fields, then the digest that tells keys apart."""
        return (f"{self.component}_b{self.batch}_{self.size}px_{self.precision}_"
                f"{self.flavour}-{self.trt_version}_{self.compute_capability}_{self.digest}")

    def describe(self) -> str:
        return (f"{self.component} (batch {self.batch}, {self.size} px, {self.precision}, "
                f"{self.flavour} {self.trt_version}, {self.compute_capability}, model {self.model_digest[:12]})")


@dataclass
class CacheEntry:
    """One engine (or stray file) found in an engine folder by :func:`list_engines`.

    ``status`` is ``"ok"`` (sidecar and engine agree), ``"corrupt"`` (``reason`` says
    why), ``"orphan"`` (an engine without sidecar or a sidecar without engine) or
    ``"temp"`` (left over from an interrupted write).
    """

    path: Path
    status: str
    reason: str = ""
    key: EngineKey | None = None
    sidecar: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0

    @property
    def files(self) -> list[Path]:
        if self.status == "temp":
            return [self.path]
        stem = _stem(self.path)
        return [p for p in (self.path.with_name(stem + s) for s in SUFFIXES) if os.path.lexists(p)]


def _stem(path: Path) -> str:
    """The name without its suffix (stems hold dots: ``Path.with_suffix`` would cut them)."""
    for suffix in SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def runtime_cache_path(engine: str | os.PathLike) -> Path:
    """The TensorRT-RTX runtime cache file that belongs to the engine file ``engine``."""
    engine = Path(engine)
    return engine.with_name(_stem(engine) + RUNTIME_CACHE_SUFFIX)


class NotARegularFile(EngineCacheError):
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


class EngineCache:
    """Engines under one folder; see the module docstring for the layout."""

    def __init__(self, engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR):
        self.dir = Path(engine_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise EngineCacheError(f"engine folder {self.dir} is a file; pass --engine-dir with a folder")

    def engine_path(self, key: EngineKey) -> Path:
        return self.dir / (key.stem + ENGINE_SUFFIX)

    def sidecar_path(self, key: EngineKey) -> Path:
        return self.dir / (key.stem + SIDECAR_SUFFIX)

    def runtime_cache_path(self, key: EngineKey) -> Path:
        """Where TensorRT-RTX's runtime cache (kernels compiled at first use) of this engine lives."""
        return runtime_cache_path(self.engine_path(key))

    def timing_cache_path(self, key: EngineKey) -> Path:
        """The timing cache shared by standard TensorRT builds of one version on one GPU model."""
        gpu = hashlib.sha256(key.gpu.encode()).hexdigest()[:8]
        return self.dir / f"timing_{key.flavour}-{key.trt_version}_{key.compute_capability}_{gpu}{TIMING_CACHE_SUFFIX}"

    def _check_key(self, key: EngineKey) -> tuple[dict[str, Any] | None, str | None]:
        """(sidecar, None) when the sidecar vouches for ``key``, else (None, why); why is "missing" if absent."""
        engine, sidecar = self.engine_path(key), self.sidecar_path(key)
        if not os.path.lexists(sidecar) and not os.path.lexists(engine):
            return None, "missing"
        meta, why = _read_sidecar(sidecar)
        if meta is None:
            return None, why
        try:
            found = EngineKey.from_dict(meta.get("key"))
        except (ValueError, TypeError) as e:
            return None, f"sidecar key is malformed ({e})"
        if found != key:
            diff = [f"{k}: {v!r} ≠ {key.as_dict()[k]!r}" for k, v in found.as_dict().items() if key.as_dict()[k] != v]
            return None, "sidecar key does not match (" + ", ".join(diff) + ")"
        return meta, None

    def problem(self, key: EngineKey) -> str | None:
        """Why the entry for ``key`` cannot be used (``"missing"`` if absent), or ``None`` if it can."""
        meta, why = self._check_key(key)
        if meta is None:
            return why
        return _engine_problem(self.engine_path(key), meta)[1]

    def read(self, key: EngineKey) -> bytes | None:
        """The engine of ``key``, read once and checked against its sidecar; ``None`` on a miss.

        An unusable entry is removed (and logged), so the caller rebuilds. A folder where
        the engine file should be raises :class:`NotARegularFile`: removing it is the user's call.
        """
        meta, why = self._check_key(key)
        if meta is None:
            return self._miss(key, why)
        data, why = _engine_problem(self.engine_path(key), meta)
        return data if why is None else self._miss(key, why)

    def lookup(self, key: EngineKey) -> Path | None:
        """The engine file for ``key`` if its entry is intact (it is read and hashed); else as :meth:`read`."""
        return self.engine_path(key) if self.read(key) is not None else None

    def _miss(self, key: EngineKey, why: str) -> None:
        if why != "missing":
            log.warning("engine cache: %s is unusable (%s); it will be rebuilt", self.engine_path(key).name, why)
            self.evict(key)
        return None

    def store(self, key: EngineKey, engine: Any, **facts: Any) -> Path:
        """Write ``engine`` (bytes-like) and its sidecar atomically; ``facts`` go into the sidecar."""
        view = memoryview(engine)
        path = self.engine_path(key)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.runtime_cache_path(key))  # kernels compiled for the engine this one replaces
        atomic_write(path, view)
        meta = {
            "format": CACHE_FORMAT,
            "key": key.as_dict(),
            "key_digest": key.digest,
            "engine_file": path.name,
            "engine_bytes": view.nbytes,
            "engine_sha256": hashlib.sha256(view).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **facts,
        }
        # the sidecar is written last: it is what makes the entry valid
        atomic_write(self.sidecar_path(key), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return path

    def evict(self, key: EngineKey) -> None:
        """Remove the entry for ``key`` (sidecar first, so no half-entry looks valid)."""
        for p in (self.sidecar_path(key), self.engine_path(key), self.runtime_cache_path(key)):
            _remove(p)


def _remove(path: Path) -> None:
    """Remove a cache file (or link); a folder in its place is the user's to remove."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise NotARegularFile(f"{path} is a folder, not a cache file; remove it or choose another --engine-dir")
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _read_sidecar(path: Path) -> tuple[dict[str, Any] | None, str]:
    if not os.path.lexists(path):
        return None, "no sidecar"
    try:
        raw = read_regular_file(path, MAX_SIDECAR_BYTES)
    except (OSError, EngineCacheError) as e:
        return None, f"sidecar is not readable ({e})"
    if len(raw) > MAX_SIDECAR_BYTES:
        return None, f"sidecar is over {MAX_SIDECAR_BYTES} bytes"
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        return None, f"sidecar is not readable JSON ({type(e).__name__})"
    if not isinstance(meta, dict):
        return None, "sidecar is not a JSON object"
    if meta.get("format") != CACHE_FORMAT:
        return None, f"sidecar format {meta.get('format')!r} is not {CACHE_FORMAT}"
    return meta, ""


def _engine_problem(engine: Path, meta: dict[str, Any], *, verify_hash: bool = True) -> tuple[bytes | None, str | None]:
    """(engine bytes or None, None) when the engine file matches its sidecar, else (None, why).

    Reads the engine once, at most the size the sidecar records (plus one byte), and only
    when it is a regular file of that size; ``verify_hash=False`` checks only the size.
    """
    if not os.path.lexists(engine):
        return None, "engine file missing"
    expected = meta.get("engine_bytes")
    if type(expected) is not int or expected < 0:
        return None, f"sidecar gives no engine size ({expected!r})"
    try:
        st = os.stat(engine)
    except OSError as e:
        return None, f"engine file cannot be read ({e})"
    if stat.S_ISDIR(st.st_mode):
        raise NotARegularFile(f"{engine} is a folder, not an engine file; remove it or choose another --engine-dir")
    if not stat.S_ISREG(st.st_mode):
        return None, "engine path is not a regular file (a device, FIFO or a link to one)"
    if st.st_size != expected:
        return None, f"engine file has {st.st_size} bytes, the sidecar says {expected} (truncated?)"
    if not verify_hash:
        return None, None
    try:
        data = read_regular_file(engine, expected)
    except (OSError, NotARegularFile) as e:
        return None, f"engine file cannot be read ({e})"
    if len(data) != expected:
        return None, f"engine file changed while it was read ({len(data)} bytes, expected {expected})"
    if hashlib.sha256(data).hexdigest() != meta.get("engine_sha256"):
        return None, "engine file's SHA-256 differs from the sidecar's (corrupted)"
    return data, None


def list_engines(engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, *, verify: bool = True) -> list[CacheEntry]:
    """Every entry and stray file in ``engine_dir``, sorted by name.

    ``verify=False`` skips the SHA-256 of each engine (size is still checked).
    """
    d = Path(engine_dir)
    if not d.is_dir():
        return []
    entries: list[CacheEntry] = []
    stems = set()
    for p in sorted(d.iterdir()):
        if p.name.startswith(TMP_PREFIX):
            if p.is_file():
                entries.append(CacheEntry(p, "temp", "left over from an interrupted write", nbytes=p.stat().st_size))
            continue
        if p.name.endswith(SUFFIXES):
            stems.add(_stem(p))
    for stem in sorted(stems):
        engine, sidecar = d / (stem + ENGINE_SUFFIX), d / (stem + SIDECAR_SUFFIX)
        nbytes = engine.stat().st_size if engine.is_file() else 0
        if not os.path.lexists(sidecar):
            what = "engine without sidecar" if os.path.lexists(engine) else "runtime cache without engine"
            entries.append(CacheEntry(engine, "orphan", what, nbytes=nbytes))
            continue
        if not os.path.lexists(engine):
            entries.append(CacheEntry(engine, "orphan", "sidecar without engine"))
            continue
        meta, why = _read_sidecar(sidecar)
        if meta is None:
            entries.append(CacheEntry(engine, "corrupt", why, nbytes=nbytes))
            continue
        try:
            key = EngineKey.from_dict(meta.get("key"))
        except (ValueError, TypeError) as e:
            entries.append(CacheEntry(engine, "corrupt", f"sidecar key is malformed ({e})", sidecar=meta,
                                      nbytes=nbytes))
            continue
        try:
            why = _engine_problem(engine, meta, verify_hash=verify)[1]
        except NotARegularFile as e:
            why = str(e)
        if why is None and key.stem != stem:
            why = f"file name does not match its key (expected {key.stem})"
        entries.append(CacheEntry(engine, "corrupt" if why else "ok", why or "", key, meta, nbytes))
    return sorted(entries, key=lambda e: e.path.name)


def clean_engines(
    engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR,
    *,
    everything: bool = False,
    match: Callable[[EngineKey], bool] | None = None,
    installed: Iterable[tuple[str, str]] | None = None,
    dry_run: bool = False,
) -> list[Path]:
    """Remove engines from ``engine_dir``; returns the files removed (or that would be, with ``dry_run``).

    Always removed: unusable entries (corrupt, orphan) and temporary files. Also removed:
    with ``everything``, every entry and the timing caches; with ``match``, the entries
    whose key it accepts; with ``installed`` (pairs of flavour name and version), the
    entries built by a version of that flavour other than the installed one — they can
    never load again. An entry goes with its runtime cache. A folder where a cache file
    should be raises :class:`NotARegularFile`.
    """
    installed = dict(installed or {})
    removed: list[Path] = []
    for e in list_engines(engine_dir, verify=True):
        drop = everything or e.status != "ok"
        if not drop and e.key is not None:
            if match is not None and match(e.key):
                drop = True
            elif e.key.flavour in installed and installed[e.key.flavour] != e.key.trt_version:
                drop = True
        if not drop:
            continue
        # sidecar first: a crash mid-clean must not leave an engine its sidecar vouches for half-deleted
        for p in sorted(e.files, key=lambda p: p.suffix != SIDECAR_SUFFIX):
            removed.append(p)
            if not dry_run:
                _remove(p)
    if everything and Path(engine_dir).is_dir():
        for p in sorted(Path(engine_dir).glob(f"timing_*{TIMING_CACHE_SUFFIX}")):
            removed.append(p)
            if not dry_run:
                _remove(p)
    return removed


__all__ = [
    "ANY_GPU", "CACHE_FORMAT", "CacheEntry", "DEFAULT_ENGINE_DIR", "EngineCache", "EngineCacheError", "EngineKey",
    "NotARegularFile", "atomic_write", "clean_engines", "list_engines", "read_regular_file", "runtime_cache_path",
]
