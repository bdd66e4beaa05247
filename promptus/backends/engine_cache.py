"""TensorRT engines in the artifact cache: their key, their kind and the TensorRT-only files beside them.

An engine is an entry of kind ``tensorrt_engine`` in the engine folder itself
(:mod:`promptus.backends.artifact_cache` stores, checks, lists and cleans it)::

    <stem>.engine    the serialized engine
    <stem>.json      its sidecar: the key fields, the engine's size and SHA-256, build facts
    <stem>.rtcache   TensorRT-RTX's runtime cache: kernels it compiled for this GPU at first use

and standard TensorRT builds share a timing cache per TensorRT version and GPU model
(``timing_*.timing``), so that a second build skips the tactic timings of the first.
``<stem>`` is readable (component, batch, size, precision, flavour, compute capability)
and ends with a digest of the whole :class:`EngineKey`. Nothing here imports TensorRT;
building is :mod:`promptus.backends.trt_build`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_ENGINE_DIR
from ..files import atomic_write  # noqa: F401 (part of this module's API)
from .artifact_cache import (
    ArtifactCache, ArtifactCacheError, ArtifactKind, CacheEntry, CacheKey, NotARegularFile, clean_artifacts,
    list_artifacts, read_regular_file, register_kind,
)
from .onnx_export import GRAPH_VERSION

#: Layout version of the sidecar files; entries of another format are unusable.
#: 2: the key names the GPU model (``gpu``).
CACHE_FORMAT = 2
ENGINE_SUFFIX = ".engine"
RUNTIME_CACHE_SUFFIX = ".rtcache"
TIMING_CACHE_SUFFIX = ".timing"
#: Key value of ``gpu`` for engines that run on any GPU of their compute capabilities (TensorRT-RTX).
ANY_GPU = "any"
#: The engine folder's errors are the artifact cache's.
EngineCacheError = ArtifactCacheError


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

    def summary(self) -> str:
        target = self.compute_capability + (f" {self.gpu}" if self.gpu != ANY_GPU else "")
        return f"{self.component}, batch {self.batch}, {self.size} px, {self.precision}, {target}"

    def toolkit(self) -> str:
        return f"{self.flavour} {self.trt_version}"


def _stale(key: EngineKey, installed: Mapping[str, str]) -> str | None:
    """Built by another version of an installed TensorRT flavour: it can never load."""
    have = installed.get(key.flavour)
    if have is not None and have != key.trt_version:
        return f"built by {key.flavour} {key.trt_version}, installed {have}"
    return None


#: TensorRT engines: in the engine folder itself, with TensorRT-RTX's runtime cache beside each.
ENGINE_KIND = register_kind(ArtifactKind(
    "tensorrt_engine", "TensorRT engine", EngineKey, subdir="", suffix=ENGINE_SUFFIX, format=CACHE_FORMAT,
    payload="engine", companions=(RUNTIME_CACHE_SUFFIX,), extras=(f"timing_*{TIMING_CACHE_SUFFIX}",), stale=_stale))


def runtime_cache_path(engine: str | os.PathLike) -> Path:
    """The TensorRT-RTX runtime cache file that belongs to the engine file ``engine``."""
    engine = Path(engine)
    return engine.with_name(ENGINE_KIND.stem_of(engine) + RUNTIME_CACHE_SUFFIX)


class EngineCache(ArtifactCache):
    """The TensorRT engines under one folder (an :class:`ArtifactCache` of :data:`ENGINE_KIND`)."""

    def __init__(self, engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR):
        super().__init__(ENGINE_KIND, engine_dir)

    def engine_path(self, key: EngineKey) -> Path:
        return self.path(key)

    def runtime_cache_path(self, key: EngineKey) -> Path:
        """Where TensorRT-RTX's runtime cache (kernels compiled at first use) of this engine lives."""
        return self.companion_path(key, RUNTIME_CACHE_SUFFIX)

    def timing_cache_path(self, key: EngineKey) -> Path:
        """The timing cache shared by standard TensorRT builds of one version on one GPU model."""
        gpu = hashlib.sha256(key.gpu.encode()).hexdigest()[:8]
        return self.dir / f"timing_{key.flavour}-{key.trt_version}_{key.compute_capability}_{gpu}{TIMING_CACHE_SUFFIX}"


def list_engines(engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, *, verify: bool = True,
                 installed: Mapping[str, str] | None = None) -> list[CacheEntry]:
    """Every engine entry and stray file in ``engine_dir`` (:func:`~promptus.backends.artifact_cache.list_artifacts`)."""
    return list_artifacts(engine_dir, [ENGINE_KIND], verify=verify, installed=installed)


def clean_engines(engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, *, everything: bool = False,
                  match: Callable[[EngineKey], bool] | None = None,
                  installed: Iterable[tuple[str, str]] | None = None, dry_run: bool = False) -> list[Path]:
    """Remove engines (:func:`~promptus.backends.artifact_cache.clean_artifacts`): unusable ones, those of
    another version of an ``installed`` flavour (pairs of flavour name and version), and with
    ``everything`` every engine and the timing caches; with ``match``, those whose key it accepts."""
    return clean_artifacts(engine_dir, [ENGINE_KIND], everything=everything, match=match, installed=installed,
                           dry_run=dry_run)


__all__ = [
    "ANY_GPU", "CACHE_FORMAT", "CacheEntry", "CacheKey", "DEFAULT_ENGINE_DIR", "ENGINE_KIND", "EngineCache",
    "EngineCacheError", "EngineKey", "NotARegularFile", "atomic_write", "clean_engines", "list_engines",
    "read_regular_file", "runtime_cache_path",
]
