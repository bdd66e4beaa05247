"""The engine cache: built TensorRT engines on disk, keyed by everything that changes them.

An entry is two files in the engine folder (``engines/`` by default)::

    <stem>.engine    the serialized engine
    <stem>.json      its sidecar: the key fields, the engine's size and SHA-256, build facts

where ``<stem>`` is readable (component, batch, size, precision, flavour, compute
capability) and ends with a digest of the whole :class:`EngineKey`. The sidecar is
written last and vouches for the engine by size and hash, so a half-written, truncated
or corrupted engine, a sidecar that is not JSON, or one whose key differs from the key
asked for is *unusable*: :meth:`EngineCache.lookup` removes it and reports a miss, and
the caller rebuilds. Nothing here imports TensorRT; building and loading live in
:mod:`promptus.backends.tensorrt`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import PromptusError
from ..files import TMP_PREFIX, atomic_write  # noqa: F401 (atomic_write: part of this module's API)
from .onnx_export import GRAPH_VERSION

log = logging.getLogger(__name__)

#: Layout version of the sidecar files; entries of another format are unusable.
CACHE_FORMAT = 1
ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".json"
#: Prefix of the temporary files of an interrupted write (removed by ``clean``).
DEFAULT_ENGINE_DIR = "engines"


class EngineCacheError(PromptusError):
    """The engine folder cannot be used (e.g. it is a file)."""


@dataclass(frozen=True)
class EngineKey:
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
    graph_version: int = GRAPH_VERSION

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "EngineKey":
        """Inverse of :meth:`as_dict`; raises ``ValueError`` on missing, extra or mistyped fields."""
        if not isinstance(d, dict):
            raise ValueError(f"key is a {type(d).__name__}, not an object")
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        if set(d) != set(names):
            raise ValueError(f"key fields {sorted(d)} differ from {sorted(names)}")
        for f in dataclasses.fields(cls):
            want = int if f.name in ("batch", "size", "graph_version") else str
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
        return [p for p in (self.path.with_name(stem + ENGINE_SUFFIX), self.path.with_name(stem + SIDECAR_SUFFIX))
                if p.exists()]


def _stem(path: Path) -> str:
    """The name without ``.engine``/``.json`` (stems hold dots: ``Path.with_suffix`` would cut them)."""
    for suffix in (ENGINE_SUFFIX, SIDECAR_SUFFIX):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


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

    def problem(self, key: EngineKey) -> str | None:
        """Why the entry for ``key`` cannot be used (``"missing"`` if absent), or ``None`` if it can."""
        engine, sidecar = self.engine_path(key), self.sidecar_path(key)
        if not sidecar.exists() and not engine.exists():
            return "missing"
        meta, why = _read_sidecar(sidecar)
        if meta is None:
            return why
        try:
            found = EngineKey.from_dict(meta.get("key"))
        except (ValueError, TypeError) as e:
            return f"sidecar key is malformed ({e})"
        if found != key:
            diff = [f"{k}: {v!r} ≠ {key.as_dict()[k]!r}" for k, v in found.as_dict().items() if key.as_dict()[k] != v]
            return "sidecar key does not match (" + ", ".join(diff) + ")"
        return _engine_problem(engine, meta)

    def lookup(self, key: EngineKey) -> Path | None:
        """The engine file for ``key`` if its entry is intact; an unusable entry is removed (→ ``None``)."""
        why = self.problem(key)
        if why is None:
            return self.engine_path(key)
        if why != "missing":
            log.warning("engine cache: %s is unusable (%s); it will be rebuilt", self.engine_path(key).name, why)
            self.evict(key)
        return None

    def store(self, key: EngineKey, engine: Any, **facts: Any) -> Path:
        """Write ``engine`` (bytes-like) and its sidecar atomically; ``facts`` go into the sidecar."""
        view = memoryview(engine)
        path = self.engine_path(key)
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
        for p in (self.sidecar_path(key), self.engine_path(key)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _read_sidecar(path: Path) -> tuple[dict[str, Any] | None, str]:
    if not path.exists():
        return None, "no sidecar"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"sidecar is not readable JSON ({type(e).__name__})"
    if not isinstance(meta, dict):
        return None, "sidecar is not a JSON object"
    if meta.get("format") != CACHE_FORMAT:
        return None, f"sidecar format {meta.get('format')!r} is not {CACHE_FORMAT}"
    return meta, ""


def _engine_problem(engine: Path, meta: dict[str, Any], *, verify_hash: bool = True) -> str | None:
    if not engine.exists():
        return "engine file missing"
    size = engine.stat().st_size
    if size != meta.get("engine_bytes"):
        return f"engine file has {size} bytes, the sidecar says {meta.get('engine_bytes')} (truncated?)"
    if verify_hash and _sha256_file(engine) != meta.get("engine_sha256"):
        return "engine file's SHA-256 differs from the sidecar's (corrupted)"
    return None


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
        if p.name.endswith((ENGINE_SUFFIX, SIDECAR_SUFFIX)) and p.is_file():
            stems.add(_stem(p))
    for stem in sorted(stems):
        engine, sidecar = d / (stem + ENGINE_SUFFIX), d / (stem + SIDECAR_SUFFIX)
        nbytes = engine.stat().st_size if engine.exists() else 0
        if not sidecar.exists():
            entries.append(CacheEntry(engine, "orphan", "engine without sidecar", nbytes=nbytes))
            continue
        if not engine.exists():
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
        why = _engine_problem(engine, meta, verify_hash=verify)
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
    with ``everything``, every entry; with ``match``, the entries whose key it accepts;
    with ``installed`` (pairs of flavour name and version), the entries built by a
    version of that flavour other than the installed one — they can never load again.
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
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
    return removed


__all__ = [
    "CACHE_FORMAT", "CacheEntry", "DEFAULT_ENGINE_DIR", "EngineCache", "EngineCacheError", "EngineKey",
    "atomic_write", "clean_engines", "list_engines",
]
