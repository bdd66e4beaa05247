"""Building TensorRT engines: which TensorRT is installed, which GPUs it can target, the builder.

Two TensorRT flavours work, with the same Python API where it matters:

* ``tensorrt`` — NVIDIA's standard library (datacenter and RTX GPUs; installed from
  NVIDIA's package index). It builds an engine only on the GPU that will run it.
* ``tensorrt_rtx`` — TensorRT for RTX (``pip install tensorrt-rtx-cu13-libs
  tensorrt-rtx-cu13-bindings``; import name ``tensorrt_rtx_bindings``, or
  ``tensorrt_rtx`` from NVIDIA's own wheels). It builds ahead of time on any machine,
  GPU or not, and JIT-compiles kernels on the GPU at first use. It runs only on the
  compute capabilities it lists (``ComputeCapability``: 7.5, 8.0, 8.6, 8.9, 12.0, 12.1
  in 1.7) — *not* on Hopper (H100/H200, 9.0), which refuses its engines at load time.

Differences handled here: TensorRT-RTX has no ``BuilderFlag.FP16`` — networks are
strongly typed, so the precision is the ONNX graph's (we export float16 graphs and
build strongly typed networks with both flavours); it takes target compute capabilities
in the builder config (none set = its portable default, 8.0/8.6/8.9/12.0/12.1 in 1.7).

:func:`get_or_build` exports (:mod:`promptus.backends.onnx_export`), builds and stores
engines in the cache (:mod:`promptus.backends.engine_cache`). Running them is
:mod:`promptus.backends.trt_runtime`; the backend is :mod:`promptus.backends.tensorrt`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from ..config import DEFAULT_ENGINE_DIR
from ..errors import PromptusError
from ..files import atomic_write
from . import trt_cuda
from .artifact_cache import read_regular_file
from .engine_cache import ANY_GPU, EngineCache, EngineKey
from .onnx_export import (
    GRAPH_VERSION, component_spec, export_component, precision_name, require_onnx, validate_shape,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..models import Models

log = logging.getLogger(__name__)

INSTALL_HELP = (
    "pip install tensorrt (NVIDIA's index: --extra-index-url https://pypi.nvidia.com) for datacenter GPUs "
    "(A100, H100, H200, L4 ...), or pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings "
    "for RTX GPUs (compute capability 7.5, 8.0, 8.6, 8.9, 12.x)"
)

#: Import names tried for each flavour, in order.
FLAVOURS: dict[str, tuple[str, ...]] = {
    "tensorrt": ("tensorrt",),
    "tensorrt_rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings"),
}
#: Compute capabilities TensorRT-RTX runs on, used only when the library does not list
#: them (its ``ComputeCapability`` enum: SM75 ... SM121 in 1.7.1).
RTX_COMPUTE_CAPABILITIES_FALLBACK = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
#: Key value for TensorRT-RTX's default target: no compute capability set in the builder
#: config; 1.7.1 then targets 8.0, 8.6, 8.9, 12.0 and 12.1 (its load-time refusal on an
#: H200 lists them; the library exposes no getter for the default set).
PORTABLE = "portable"
RTX_PORTABLE_TARGETS = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
#: Timing caches are tens of MB at most; a bigger file is not one.
MAX_TIMING_CACHE_BYTES = 1 << 30


class TensorRTError(PromptusError):
    """TensorRT is missing, cannot run here, or failed to build, load or run an engine."""


class TensorRTNotInstalledError(TensorRTError):
    """No TensorRT flavour can be imported."""


class EngineBuildError(TensorRTError):
    """The ONNX parser or the builder rejected a network."""


class EngineLoadError(TensorRTError):
    """A serialized engine could not be deserialized.

    ``rebuildable`` says whether building the engine again can help: yes for an engine of
    another TensorRT version, for another GPU, or a malformed one; no for out-of-memory,
    CUDA errors or an old driver, which a rebuild would meet again after minutes of work.
    """

    def __init__(self, message: str, *, rebuildable: bool = False):
        super().__init__(message)
        self.rebuildable = rebuildable


# ---------------------------------------------------------------------------------
# Flavours
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRTFlavour:
    """An importable TensorRT library: its flavour name, import name, version and module.

    ``cuda_major`` is the CUDA major version its wheels are built for (``tensorrt_rtx_cu13_*``
    → 13), read from the installed distribution's name; ``None`` when that is unknown.
    """

    name: str
    module_name: str
    version: str
    module: ModuleType = field(compare=False, repr=False)
    cuda_major: int | None = None

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    def supported_compute_capabilities(self) -> tuple[tuple[int, int], ...] | None:
        """(major, minor) pairs this library can target; ``None`` for standard TensorRT (any it supports)."""
        if not self.is_rtx:
            return None
        enum = getattr(self.module, "ComputeCapability", None)
        names = list(getattr(enum, "__members__", {}) or {})
        pairs = sorted(_parse_sm(n) for n in names if re.fullmatch(r"SM\d{2,3}", n))
        return tuple(pairs) or RTX_COMPUTE_CAPABILITIES_FALLBACK

    def describe(self) -> str:
        return f"{self.name} {self.version}"


def _parse_sm(name: str) -> tuple[int, int]:
    digits = name[2:]
    return int(digits[:-1]), int(digits[-1])


def find_tensorrt(flavour: str = "auto") -> TensorRTFlavour:
    """Import TensorRT: ``"auto"`` prefers standard ``tensorrt``, then ``tensorrt_rtx``.

    Raises :class:`TensorRTNotInstalledError` (with the pip command) when none imports.
    """
    if flavour != "auto" and flavour not in FLAVOURS:
        raise PromptusError(f"unknown TensorRT flavour {flavour!r}; choose auto, {', '.join(FLAVOURS)}")
    names = list(FLAVOURS) if flavour == "auto" else [flavour]
    failures = []
    for name in names:
        for module_name in FLAVOURS[name]:
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                if e.name != module_name:  # installed but broken (a library it needs is missing)
                    failures.append(f"{module_name}: {e}")
                continue
            except Exception as e:  # e.g. OSError from a missing shared library
                failures.append(f"{module_name}: {type(e).__name__}: {e}")
                continue
            if not hasattr(module, "Builder"):  # the PyPI 'tensorrt' stub, a namespace leftover ...
                failures.append(f"{module_name}: imports but is not a TensorRT library (no Builder)")
                continue
            version = str(getattr(module, "__version__", "unknown"))
            return TensorRTFlavour(name, module_name, version, module, cuda_major=_wheel_cuda_major(module_name))
    which = "TensorRT" if flavour == "auto" else flavour
    detail = f" ({'; '.join(failures)})" if failures else ""
    raise TensorRTNotInstalledError(f"{which} is not installed{detail}: {INSTALL_HELP}")


# ---------------------------------------------------------------------------------
# GPUs and compute capabilities
# ---------------------------------------------------------------------------------


def _wheel_cuda_major(module_name: str) -> int | None:
    """13 for a module installed by ``tensorrt_rtx_cu13_bindings`` (or ``tensorrt-cu12``...); None if unknown."""
    try:
        from importlib.metadata import packages_distributions

        dists = packages_distributions().get(module_name, [])
    except Exception:  # metadata is a hint only: a broken environment must not stop the import
        return None
    majors = {int(m.group(1)) for d in dists if (m := re.search(r"[-_]cu(\d+)", d.lower()))}
    return majors.pop() if len(majors) == 1 else None


def sm_name(major: int, minor: int) -> str:
    """``(8, 9)`` → ``"sm89"``."""
    return f"sm{major}{minor}"


def _parse_cc(text: str) -> tuple[int, int]:
    t = str(text).strip().lower().removeprefix("sm").removeprefix("_")
    m = re.fullmatch(r"(\d+)\.(\d)", t) or re.fullmatch(r"(\d+)(\d)", t)
    if not m:
        raise PromptusError(f"compute capability {text!r} is not like 8.9 or sm89")
    return int(m.group(1)), int(m.group(2))


def _cuda_index(device: torch.device | str | None) -> int | None:
    """The CUDA device index for ``device`` (None: the current one), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.current_device()
    d = torch.device(device)
    if d.type != "cuda":
        return None
    return d.index if d.index is not None else torch.cuda.current_device()


def resolve_compute_capability(flavour: TensorRTFlavour, compute_capability: str = "auto",
                               device: torch.device | str | None = None) -> str:
    """The key value of the GPUs an engine is built for: ``"sm89"``-like, or ``"portable"``.

    ``"auto"``: the CUDA device's compute capability when there is a CUDA GPU the flavour
    can target; otherwise, with TensorRT-RTX, ``"portable"`` (its default targets, what it
    builds on a machine without a GPU). Standard TensorRT builds only for the GPU it runs on.
    """
    index = _cuda_index(device)
    current = torch.cuda.get_device_capability(index) if index is not None else None
    supported = flavour.supported_compute_capabilities()
    if compute_capability in ("auto", None):
        if current is not None and (supported is None or current in supported):
            return sm_name(*current)
        if not flavour.is_rtx:
            raise TensorRTError(
                "standard TensorRT builds an engine on the GPU that will run it, and this machine has no CUDA GPU; "
                "build on the target machine, or use tensorrt_rtx (builds portable engines without a GPU)"
            )
        if current is not None:
            log.warning("%s cannot target this GPU (compute capability %d.%d); building its portable engine",
                        flavour.describe(), *current)
        return PORTABLE
    if compute_capability == PORTABLE:
        if not flavour.is_rtx:
            raise TensorRTError("portable engines need tensorrt_rtx; standard TensorRT builds for the current GPU only")
        return PORTABLE
    cc = _parse_cc(compute_capability)
    if supported is not None and cc not in supported:
        raise TensorRTError(
            f"{flavour.describe()} cannot target compute capability {cc[0]}.{cc[1]}; it supports "
            + ", ".join(f"{a}.{b}" for a, b in supported)
        )
    if not flavour.is_rtx and cc != current:
        have = f"{current[0]}.{current[1]}" if current else "none (no CUDA GPU)"
        raise TensorRTError(
            f"standard TensorRT builds for the GPU it runs on (compute capability {have}), not {cc[0]}.{cc[1]}"
        )
    return sm_name(*cc)


def tensorrt_status(device: torch.device | str = "cuda", flavour: str = "auto") -> tuple[bool, str]:
    """Whether the TensorRT backend can build and run engines on ``device`` here, and why (not).

    Checks, in order: a CUDA device (PyTorch sees one), an importable TensorRT flavour,
    the packages the ONNX export needs, a driver new enough for the flavour's CUDA
    (when the driver can be asked), and — for TensorRT-RTX — that it supports the GPU's
    compute capability. What it cannot check (export, build, load, the first inference)
    can still fail: ``make_backend("auto", ...)`` then falls back to another backend.
    """
    d = torch.device(device)
    if d.type != "cuda":
        return False, f"TensorRT engines run on CUDA GPUs, not on {d.type}"
    if not torch.cuda.is_available():
        return False, "no CUDA: PyTorch sees no CUDA GPU here, and TensorRT engines run only on one"
    try:
        found = find_tensorrt(flavour)
        require_onnx()
    except PromptusError as e:
        return False, str(e)
    index = d.index if d.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        return False, f"no CUDA device {index} (this machine has {torch.cuda.device_count()})"
    cc = torch.cuda.get_device_capability(index)
    gpu = f"{torch.cuda.get_device_name(index)} (compute capability {cc[0]}.{cc[1]})"
    driver = trt_cuda.CUDA.driver_version()
    if driver is not None and found.cuda_major is not None and driver[0] < found.cuda_major:
        return False, (
            f"the NVIDIA driver here supports up to CUDA {driver[0]}.{driver[1]}, but {found.describe()} is built for "
            f"CUDA {found.cuda_major}: update the driver (CUDA 13 needs driver 580 or newer), or install a "
            f"TensorRT build for CUDA {driver[0]}"
        )
    supported = found.supported_compute_capabilities()
    if supported is not None and cc not in supported:
        listed = ", ".join(f"{a}.{b}" for a, b in supported)
        return False, (
            f"{found.describe()} refuses compute capability {cc[0]}.{cc[1]}: it runs only on {listed}; "
            f"{gpu} needs the standard tensorrt package (pip install tensorrt from NVIDIA's index)"
        )
    return True, f"{found.describe()} on {gpu}"


# ---------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------


def make_logger(trt: ModuleType):
    """A TensorRT logger that forwards to :mod:`logging` and keeps the error messages."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            s = trt.ILogger.Severity
            if severity in (s.INTERNAL_ERROR, s.ERROR):
                self.errors.append(msg)
                log.debug("TensorRT error: %s", msg)  # raised (with the message) by our caller
            elif severity == s.WARNING:
                log.warning("TensorRT: %s", msg)  # e.g. an engine used on another GPU model than it was built on

    return _Logger()


def build_engine(onnx_path: str | os.PathLike, flavour: TensorRTFlavour, *, compute_capability: str = PORTABLE,
                 precision: str = "fp16", builder_optimization_level: int | None = None,
                 workspace_bytes: int | None = None, timing_cache: str | os.PathLike | None = None):
    """Parse ``onnx_path`` and build a serialized engine (a bytes-like ``IHostMemory``).

    The network is strongly typed (the ONNX graph's float16/float32 is the precision)
    where the flavour has ``STRONGLY_TYPED``; older TensorRT gets ``BuilderFlag.FP16``
    instead where it has that flag. ``compute_capability`` is a
    :func:`resolve_compute_capability` value; with TensorRT-RTX an ``"smXY"`` value sets
    that single target, ``"portable"`` none. ``workspace_bytes`` caps the builder's
    workspace (the memory free on the GPU, so that it does not try tactics that cannot
    get theirs). ``timing_cache`` (standard TensorRT only; a no-op in TensorRT-RTX) is a
    file of tactic timings loaded before and saved after the build.
    """
    trt = flavour.module
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    creation = trt.NetworkDefinitionCreationFlag
    strongly_typed = hasattr(creation, "STRONGLY_TYPED")
    flags = 0
    if strongly_typed:
        flags |= 1 << int(creation.STRONGLY_TYPED)
    elif hasattr(creation, "EXPLICIT_BATCH"):  # TensorRT 8.x
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise EngineBuildError(f"{flavour.describe()} cannot parse {onnx_path}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    if not strongly_typed and precision == "fp16":
        if hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        else:  # TensorRT 11 and RTX dropped the flag (and always have STRONGLY_TYPED): do not fail over it
            log.warning("%s has neither strongly typed networks nor BuilderFlag.FP16; building with the "
                        "graph's types as they are", flavour.describe())
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    cache = _load_timing_cache(trt, config, timing_cache) if timing_cache is not None and not flavour.is_rtx else None
    if builder_optimization_level is not None:
        config.builder_optimization_level = builder_optimization_level
    if flavour.is_rtx and compute_capability != PORTABLE:
        major, minor = _parse_cc(compute_capability)
        config.num_compute_capabilities = 1
        if not config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{major}{minor}"), 0):
            raise EngineBuildError(f"{flavour.describe()} refused compute capability {major}.{minor}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"{flavour.describe()} failed to build an engine from {onnx_path}: " + "; ".join(logger.errors[-5:])
        )
    if cache is not None:
        try:
            atomic_write(timing_cache, memoryview(config.get_timing_cache().serialize()))
        except OSError as e:  # the cache only saves time: a read-only folder must not fail the build
            log.warning("could not save the timing cache %s: %s", timing_cache, e)
    return serialized


def _load_timing_cache(trt: ModuleType, config, path: str | os.PathLike):
    """Attach the timing cache in ``path`` (or a new one) to ``config``; returns it (it must outlive the build)."""
    data = b""
    if os.path.lexists(path):
        try:
            data = read_regular_file(path, MAX_TIMING_CACHE_BYTES)
        except (OSError, PromptusError) as e:
            log.warning("ignoring the timing cache %s: %s", path, e)
        if len(data) > MAX_TIMING_CACHE_BYTES:
            data = b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):  # another GPU's or version's timings: start afresh
        log.info("timing cache %s does not fit this GPU or TensorRT; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def engine_key(models: "Models", component: str, *, batch: int, size: int,
               dtype: torch.dtype = torch.float16, flavour: TensorRTFlavour | str = "auto",
               compute_capability: str = "auto", device: torch.device | str | None = None) -> EngineKey:
    """The cache key of ``component`` of ``models`` built with these settings here."""
    found = flavour if isinstance(flavour, TensorRTFlavour) else find_tensorrt(flavour)
    component_spec(component)
    cc = resolve_compute_capability(found, compute_capability, device)
    gpu = ANY_GPU
    if not found.is_rtx:  # standard TensorRT builds for (and tunes on) the GPU it runs on
        gpu = torch.cuda.get_device_name(_cuda_index(device))
    return EngineKey(
        model_digest=models.identity().hexdigest,
        component=component,
        batch=batch,
        size=size,
        precision=precision_name(dtype),
        flavour=found.name,
        trt_version=found.version,
        compute_capability=cc,
        gpu=gpu,
        graph_version=GRAPH_VERSION,
    )


def get_or_build(models: "Models", component: str, *, batch: int, size: int, **options) -> Path:
    """The cached engine file of ``component``, exported and built first if it is not there.

    Takes the arguments of :func:`load_or_build`; for callers that want the file (the
    ``engines build`` command), not the engine's bytes.
    """
    return load_or_build(models, component, batch=batch, size=size, **options)[0]


def load_or_build(
    models: "Models",
    component: str,
    *,
    batch: int,
    size: int,
    dtype: torch.dtype = torch.float16,
    engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR,
    flavour: TensorRTFlavour | str = "auto",
    compute_capability: str = "auto",
    device: torch.device | str | None = None,
    force: bool = False,
    keep_onnx: bool = False,
    exporter: str = "auto",
) -> tuple[Path, Any]:
    """The engine of ``component`` as (cache file, its bytes), exported and built first if not cached.

    ``batch`` (the clip's keyframe interval) and ``size`` (its frame size) come from the
    caller. The cache key (:func:`engine_key`) covers the model digest, component,
    batch, size, precision, TensorRT flavour and version, the target compute capability
    and, for standard TensorRT, the GPU model. A cached engine is read once: the bytes
    that were checked against the sidecar's SHA-256 are the bytes returned. An unusable
    entry is removed and rebuilt; ``force`` rebuilds regardless. With TensorRT-RTX and
    ``compute_capability="auto"`` on a GPU its portable engines cover, a cached portable
    engine is used when there is none for that exact GPU.

    Building on a GPU: the export runs first, then PyTorch's cached memory is handed back
    to the driver and the builder's workspace is capped at the memory then free; the
    build runs with ``device`` current; standard TensorRT keeps a timing cache in the
    engine folder. The ONNX file is built in a temporary folder beside the engines and
    removed, unless ``keep_onnx`` (then it stays as ``<engine_dir>/onnx/<stem>.onnx``).
    """
    found = flavour if isinstance(flavour, TensorRTFlavour) else find_tensorrt(flavour)
    validate_shape(models, batch, size)
    key = engine_key(models, component, batch=batch, size=size, dtype=dtype, flavour=found,
                     compute_capability=compute_capability, device=device)
    cache = EngineCache(engine_dir)
    if force:
        cache.evict(key)
    else:
        hit, data = key, cache.read(key)
        covered = key.compute_capability != PORTABLE and _parse_cc(key.compute_capability) in RTX_PORTABLE_TARGETS
        if data is None and found.is_rtx and compute_capability in ("auto", None) and covered:
            # a portable engine (built without a GPU, say on CI) runs here too: use it rather than build
            hit = dataclasses.replace(key, compute_capability=PORTABLE)
            data = cache.read(hit)
        if data is not None:
            log.debug("engine cache hit: %s", cache.engine_path(hit))
            return cache.engine_path(hit), data
    log.info("building the TensorRT engine for %s; first use, this takes a while", key.describe())
    index = _cuda_index(device)
    gpu = torch.device("cuda", index) if index is not None else None
    cuda = trt_cuda.CUDA
    t0 = time.perf_counter()
    cache.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.dir, prefix=".tmp-onnx-") as tmp:
        onnx_path = (cache.dir / "onnx" if keep_onnx else Path(tmp)) / f"{key.stem}.onnx"
        export_component(models, component, onnx_path, batch=batch, size=size, dtype=dtype, exporter=exporter)
        t_export = time.perf_counter() - t0
        workspace = None
        if gpu is not None:
            cuda.release_cached_memory()  # the export's activations (an fp16 UNet forward) stay cached otherwise
            workspace = cuda.mem_get_info(gpu)[0]
        with cuda.device(gpu) if gpu is not None else contextlib.nullcontext():
            serialized = build_engine(onnx_path, found, compute_capability=key.compute_capability,
                                      precision=key.precision, workspace_bytes=workspace,
                                      timing_cache=None if found.is_rtx else cache.timing_cache_path(key))
    t_build = time.perf_counter() - t0 - t_export
    path = cache.store(key, serialized, model_name=models.name, export_seconds=round(t_export, 3),
                       build_seconds=round(t_build, 3), torch_version=torch.__version__,
                       flavour_module=found.module_name)
    log.info("built %s in %.1f s (ONNX export %.1f s, engine build %.1f s, %.1f MB)", path.name,
             t_export + t_build, t_export, t_build, path.stat().st_size / 1e6)
    return path, memoryview(serialized)


__all__ = [
    "EngineBuildError", "EngineLoadError", "FLAVOURS", "INSTALL_HELP", "PORTABLE", "TensorRTError",
    "TensorRTFlavour", "TensorRTNotInstalledError", "build_engine", "engine_key", "find_tensorrt", "get_or_build",
    "load_or_build", "make_logger", "resolve_compute_capability", "sm_name", "tensorrt_status",
]
