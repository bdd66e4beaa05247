"""TensorRT engines for the decoder: build (cached), load, run; and the ``tensorrt`` backend.

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
in the builder config (none set = its portable default, 8.0/8.6/8.9/12.0/12.1 in 1.7);
it captures CUDA graphs itself (``IRuntimeConfig.cuda_graph_strategy``), while with
standard TensorRT we capture ``execute_async_v3`` into a ``torch.cuda.CUDAGraph``.

Engines are cached by :mod:`promptus.backends.engine_cache`; :func:`get_or_build`
exports (:mod:`promptus.backends.onnx_export`), builds and stores on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..errors import PromptusError
from .base import Backend
from .engine_cache import DEFAULT_ENGINE_DIR, EngineCache, EngineKey, clean_engines, list_engines
from .onnx_export import (
    COMPONENTS, GRAPH_VERSION, component_spec, export_component, precision_name, validate_shape,
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


class TensorRTError(PromptusError):
    """TensorRT is missing, cannot run here, or failed to build, load or run an engine."""


class TensorRTNotInstalledError(TensorRTError):
    """No TensorRT flavour can be imported."""


class EngineBuildError(TensorRTError):
    """The ONNX parser or the builder rejected a network."""


class EngineLoadError(TensorRTError):
    """A serialized engine could not be deserialized (wrong version, GPU, or damaged file)."""


# ---------------------------------------------------------------------------------
# Flavours
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRTFlavour:
    """An importable TensorRT library: its flavour name, import name, version and module."""

    name: str
    module_name: str
    version: str
    module: ModuleType = field(compare=False, repr=False)

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
            return TensorRTFlavour(name, module_name, version, module)
    which = "TensorRT" if flavour == "auto" else flavour
    detail = f" ({'; '.join(failures)})" if failures else ""
    raise TensorRTNotInstalledError(f"{which} is not installed{detail}: {INSTALL_HELP}")


# ---------------------------------------------------------------------------------
# GPUs and compute capabilities
# ---------------------------------------------------------------------------------


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
    """Whether the TensorRT backend can run engines on ``device`` here, and why (not).

    Checks, in order: a CUDA device (PyTorch sees one), an importable TensorRT flavour,
    and — for TensorRT-RTX — that it supports the GPU's compute capability.
    """
    d = torch.device(device)
    if d.type != "cuda":
        return False, f"TensorRT engines run on CUDA GPUs, not on {d.type}"
    if not torch.cuda.is_available():
        return False, "no CUDA: PyTorch sees no CUDA GPU here, and TensorRT engines run only on one"
    try:
        found = find_tensorrt(flavour)
    except TensorRTError as e:
        return False, str(e)
    index = d.index if d.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        return False, f"no CUDA device {index} (this machine has {torch.cuda.device_count()})"
    cc = torch.cuda.get_device_capability(index)
    gpu = f"{torch.cuda.get_device_name(index)} (compute capability {cc[0]}.{cc[1]})"
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


def _make_logger(trt: ModuleType):
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
                log.debug("TensorRT warning: %s", msg)

    return _Logger()


def build_engine(onnx_path: str | os.PathLike, flavour: TensorRTFlavour, *, compute_capability: str = PORTABLE,
                 precision: str = "fp16", builder_optimization_level: int | None = None):
    """Parse ``onnx_path`` and build a serialized engine (a bytes-like ``IHostMemory``).

    The network is strongly typed (the ONNX graph's float16/float32 is the precision)
    where the flavour has ``STRONGLY_TYPED``; older TensorRT gets ``BuilderFlag.FP16``
    instead. ``compute_capability`` is a :func:`resolve_compute_capability` value; with
    TensorRT-RTX an ``"smXY"`` value sets that single target, ``"portable"`` none.
    """
    trt = flavour.module
    logger = _make_logger(trt)
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
        config.set_flag(trt.BuilderFlag.FP16)
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
    return serialized


def engine_key(models: "Models", component: str, *, batch: int = 10, size: int = 512,
               dtype: torch.dtype = torch.float16, flavour: TensorRTFlavour | str = "auto",
               compute_capability: str = "auto", device: torch.device | str | None = None) -> EngineKey:
    """The cache key of ``component`` of ``models`` built with these settings here."""
    found = flavour if isinstance(flavour, TensorRTFlavour) else find_tensorrt(flavour)
    component_spec(component)
    return EngineKey(
        model_digest=models.identity().hexdigest,
        component=component,
        batch=batch,
        size=size,
        precision=precision_name(dtype),
        flavour=found.name,
        trt_version=found.version,
        compute_capability=resolve_compute_capability(found, compute_capability, device),
        graph_version=GRAPH_VERSION,
    )


def get_or_build(
    models: "Models",
    component: str,
    *,
    batch: int = 10,
    size: int = 512,
    dtype: torch.dtype = torch.float16,
    engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR,
    flavour: TensorRTFlavour | str = "auto",
    compute_capability: str = "auto",
    device: torch.device | str | None = None,
    force: bool = False,
    keep_onnx: bool = False,
    exporter: str = "auto",
) -> Path:
    """The cached engine file of ``component``, exported and built first if it is not there.

    The cache key (:func:`engine_key`) covers the model digest, component, batch, size,
    precision, TensorRT flavour and version and the target compute capability. An
    unusable entry is removed and rebuilt; ``force`` rebuilds regardless. The ONNX file
    is built in a temporary folder beside the engines and removed, unless ``keep_onnx``
    (then it stays as ``<engine_dir>/onnx/<stem>.onnx``). With TensorRT-RTX and
    ``compute_capability="auto"`` on a GPU its portable engines cover, a cached portable
    engine is used when there is none for that exact GPU.
    """
    found = flavour if isinstance(flavour, TensorRTFlavour) else find_tensorrt(flavour)
    validate_shape(models, batch, size)
    key = engine_key(models, component, batch=batch, size=size, dtype=dtype, flavour=found,
                     compute_capability=compute_capability, device=device)
    cache = EngineCache(engine_dir)
    if force:
        cache.evict(key)
    else:
        path = cache.lookup(key)
        covered = key.compute_capability != PORTABLE and _parse_cc(key.compute_capability) in RTX_PORTABLE_TARGETS
        if path is None and found.is_rtx and compute_capability in ("auto", None) and covered:
            # a portable engine (built without a GPU, say on CI) runs here too: use it rather than build
            path = cache.lookup(dataclasses.replace(key, compute_capability=PORTABLE))
        if path is not None:
            log.debug("engine cache hit: %s", path)
            return path
    log.info("building the TensorRT engine for %s; first use, this takes a while", key.describe())
    t0 = time.perf_counter()
    cache.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.dir, prefix=".tmp-onnx-") as tmp:
        onnx_path = (cache.dir / "onnx" if keep_onnx else Path(tmp)) / f"{key.stem}.onnx"
        export_component(models, component, onnx_path, batch=batch, size=size, dtype=dtype, exporter=exporter)
        t_export = time.perf_counter() - t0
        serialized = build_engine(onnx_path, found, compute_capability=key.compute_capability,
                                  precision=key.precision)
    t_build = time.perf_counter() - t0 - t_export
    path = cache.store(key, serialized, model_name=models.name, export_seconds=round(t_export, 3),
                       build_seconds=round(t_build, 3), torch_version=torch.__version__,
                       flavour_module=found.module_name)
    log.info("built %s in %.1f s (ONNX export %.1f s, engine build %.1f s, %.1f MB)", path.name,
             t_export + t_build, t_export, t_build, path.stat().st_size / 1e6)
    return path


# ---------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------

_TORCH_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
}


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType`` (either flavour)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise TensorRTError(f"engine tensor type {name} has no torch equivalent") from None


@dataclass(frozen=True)
class TensorInfo:
    """An engine input or output: name, static shape, torch dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_input: bool


class Engine:
    """A deserialized engine with its execution context, device buffers and CUDA stream.

    Every I/O tensor gets a torch tensor on ``device`` whose address is bound once with
    ``set_tensor_address``; :meth:`infer` copies the feeds into the input buffers on the
    caller's stream, runs ``execute_async_v3`` on the engine's own stream (TensorRT
    syncs the whole device on the legacy default stream) ordered by stream waits — no
    host round trip — and returns the output buffers, overwritten by the next call.

    ``cuda_graph=True``: TensorRT-RTX captures and replays the engine itself
    (``CudaGraphStrategy.WHOLE_GRAPH_CAPTURE``); with standard TensorRT the second
    :meth:`infer` captures ``execute_async_v3`` into a ``torch.cuda.CUDAGraph`` (after one
    plain warm-up run) and later calls replay it. If capture fails, it logs and runs plainly.
    """

    def __init__(self, path: str | os.PathLike, *, flavour: TensorRTFlavour | str = "auto",
                 device: torch.device | str = "cuda", cuda_graph: bool = False):
        self.path = Path(path)
        self.flavour = flavour if isinstance(flavour, TensorRTFlavour) else find_tensorrt(flavour)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise TensorRTError(f"TensorRT engines run on CUDA devices, not {self.device}")
        if not torch.cuda.is_available():
            raise TensorRTError("no CUDA: PyTorch sees no CUDA GPU here, and TensorRT engines run only on one")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda_graph = cuda_graph
        self.engine = None
        self.context = None
        self.stream: torch.cuda.Stream | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.io: list[TensorInfo] = []
        self._graph: torch.cuda.CUDAGraph | None = None
        self._runs = 0
        self._logger = None
        self._runtime = None

    # -- loading

    def load(self) -> "Engine":
        """Deserialize the engine file; raises :class:`EngineLoadError` with TensorRT's reason."""
        trt = self.flavour.module
        self._logger = _make_logger(trt)
        data = self.path.read_bytes()
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            if self.flavour.is_rtx and hasattr(self._runtime, "get_engine_validity"):
                validity, diagnostics = self._runtime.get_engine_validity(data)
                if validity == trt.EngineValidity.INVALID:
                    raise EngineLoadError(
                        f"{self.path.name}: {self.flavour.describe()} says the engine cannot run on this GPU "
                        f"({_validity_reasons(trt, diagnostics)}); rebuild it (promptus engines build --force)"
                    )
            self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            why = "; ".join(self._logger.errors[-3:]) or "no reason given"
            raise EngineLoadError(f"{self.path.name}: {self.flavour.describe()} could not deserialize it: {why}")
        self.io = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineLoadError(f"{self.path.name}: tensor {name} has a dynamic shape {shape}; "
                                      "promptus engines are static — rebuild it")
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            self.io.append(TensorInfo(name, shape, torch_dtype(self.engine.get_tensor_dtype(name)), is_input))
        return self

    def activate(self) -> "Engine":
        """Create the execution context, the stream and the I/O buffers, and bind them."""
        if self.engine is None:
            self.load()
        trt = self.flavour.module
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            if self.cuda_graph and self.flavour.is_rtx and hasattr(self.engine, "create_runtime_config"):
                config = self.engine.create_runtime_config()
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                self._runtime_config = config  # kept alive with the context
                self.context = self.engine.create_execution_context(config)
            else:
                self.context = self.engine.create_execution_context()
            if self.context is None:
                raise TensorRTError(f"{self.path.name}: could not create an execution context: "
                                    + "; ".join(self._logger.errors[-3:]))
            for t in self.io:
                buf = torch.empty(t.shape, dtype=t.dtype, device=self.device)
                if t.is_input:
                    self.context.set_input_shape(t.name, t.shape)
                if not self.context.set_tensor_address(t.name, buf.data_ptr()):
                    raise TensorRTError(f"{self.path.name}: could not bind tensor {t.name}")
                self.buffers[t.name] = buf
        return self

    # -- running

    @property
    def inputs(self) -> list[TensorInfo]:
        return [t for t in self.io if t.is_input]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [t for t in self.io if not t.is_input]

    @property
    def batch(self) -> int:
        return self.io[0].shape[0]

    def infer(self, feeds: Mapping[str, torch.Tensor | int | float]) -> dict[str, torch.Tensor]:
        """Run once. ``feeds`` maps input names to tensors of the engine's shape, or of fewer
        rows (copied into the first rows; the rest keep old values), or to a number that
        fills the whole input. Returns the output buffers (valid until the next call)."""
        if self.context is None:
            self.activate()
        with torch.inference_mode():  # buffers made under inference mode may only be written under it
            return self._infer(feeds)

    def _infer(self, feeds: Mapping[str, torch.Tensor | int | float]) -> dict[str, torch.Tensor]:
        caller = torch.cuda.current_stream(self.device)
        missing = {t.name for t in self.inputs} - set(feeds)
        if missing:
            raise PromptusError(f"{self.path.name}: missing inputs {sorted(missing)}")
        for name, value in feeds.items():
            buf = self.buffers.get(name)
            if buf is None or name not in {t.name for t in self.inputs}:
                raise PromptusError(f"{self.path.name}: no input named {name!r}; inputs: "
                                    + ", ".join(t.name for t in self.inputs))
            if isinstance(value, (int, float)):
                buf.fill_(value)
                continue
            if tuple(value.shape[1:]) != tuple(buf.shape[1:]) or value.shape[0] > buf.shape[0]:
                raise PromptusError(f"{self.path.name}: input {name} has shape {tuple(value.shape)}; the engine "
                                    f"takes {tuple(buf.shape)} (at most {buf.shape[0]} rows)")
            buf[: value.shape[0]].copy_(value)  # casts; on the caller's stream
        self.stream.wait_stream(caller)
        if self._graph is not None:
            with torch.cuda.stream(self.stream):
                self._graph.replay()
        else:
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise TensorRTError(f"{self.path.name}: execute_async_v3 failed: "
                                    + "; ".join(self._logger.errors[-3:]))
            self._runs += 1
            if self.cuda_graph and not self.flavour.is_rtx and self._runs == 1:
                self._capture()
        caller.wait_stream(self.stream)
        return {t.name: self.buffers[t.name] for t in self.outputs}

    def _capture(self) -> None:
        """Capture ``execute_async_v3`` into a CUDA graph (standard TensorRT, after one warm-up run)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                ok = self.context.execute_async_v3(self.stream.cuda_stream)
            if not ok:
                raise TensorRTError("execute_async_v3 returned False during capture")
        except Exception as e:  # capture is an optimisation: fall back to plain enqueues
            log.warning("%s: CUDA graph capture failed (%s); running without it", self.path.name, e)
            self.cuda_graph = False
            return
        self._graph = graph

    def close(self) -> None:
        """Release the graph, context, buffers and engine (in that order)."""
        self._graph = None
        self.context = None
        self.buffers.clear()
        self.engine = None
        self._runtime = None


def _validity_reasons(trt: ModuleType, diagnostics: int) -> str:
    enum = getattr(trt, "EngineInvalidityDiagnostics", None)
    names = [n for n, v in getattr(enum, "__members__", {}).items() if int(diagnostics) & int(v)]
    return ", ".join(names) or f"diagnostics {int(diagnostics):#x}"


# ---------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------


class TensorRTBackend(Backend):
    """Runs the UNet and the TAESD decoder as TensorRT engines of a fixed batch and size.

    Engines come from :func:`get_or_build` (built on first use, then cached in
    ``engine_dir``). :meth:`denoise` and :meth:`decode` take any number of frames: fewer
    than the engine's batch are padded (the spare rows hold stale data, and rows never
    mix), more are run in engine-sized chunks. Inputs are cast to the engine's precision
    at the boundary; results come back as fresh float32 tensors on the device.
    ``engines`` (``{"unet": ..., "taesd_decoder": ...}``, objects with ``infer``) skips
    building, for callers that manage engines themselves. ``batch``/``size`` ``None``
    mean 10 and 512.
    """

    name = "tensorrt"

    def __init__(self, models: "Models", device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16, *,
                 batch: int | None = 10, size: int | None = 512, engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR,
                 flavour: str = "auto", compute_capability: str = "auto", cuda_graph: bool = True,
                 engines: Mapping[str, Any] | None = None):
        super().__init__(torch.device(device), dtype)
        batch = 10 if batch is None else batch  # the default interval: one engine call per segment
        size = 512 if size is None else size  # the codec's default frame size
        precision_name(dtype)
        validate_shape(models, batch, size)
        self.batch, self.size, self.latent = batch, size, size // 8
        self.flavour_name = "injected"
        if engines is None:
            ok, why = tensorrt_status(self.device, flavour)
            if not ok:
                raise TensorRTError(f"the tensorrt backend cannot run here: {why}")
            found = find_tensorrt(flavour)
            self.flavour_name = found.describe()
            engines = {c: self._load(models, c, found, engine_dir, compute_capability, cuda_graph) for c in COMPONENTS}
        missing = set(COMPONENTS) - set(engines)
        if missing:
            raise PromptusError(f"TensorRTBackend: engines missing for {sorted(missing)}")
        self.engines = dict(engines)

    def _load(self, models, component, found, engine_dir, compute_capability, cuda_graph) -> Engine:
        kwargs = dict(batch=self.batch, size=self.size, dtype=self.dtype, engine_dir=engine_dir, flavour=found,
                      compute_capability=compute_capability, device=self.device)
        path = get_or_build(models, component, **kwargs)
        try:
            return Engine(path, flavour=found, device=self.device, cuda_graph=cuda_graph).load().activate()
        except EngineLoadError as e:
            # a cache entry that passed its checks but does not load (another driver, say): rebuild once
            log.warning("%s; rebuilding it", e)
            path = get_or_build(models, component, force=True, **kwargs)
            return Engine(path, flavour=found, device=self.device, cuda_graph=cuda_graph).load().activate()

    def _run(self, component: str, feeds: dict[str, Any], rows: int, out_name: str,
             out_shape: tuple[int, ...]) -> torch.Tensor:
        engine = self.engines[component]
        result = torch.empty((rows, *out_shape), dtype=torch.float32, device=self.device)
        for start in range(0, rows, self.batch):
            stop = min(rows, start + self.batch)
            chunk = {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in feeds.items()}
            out = engine.infer(chunk)[out_name]
            result[start:stop].copy_(out[: stop - start])  # a fresh float32 copy of the engine's buffer
        return result

    def _check(self, what: str, x: torch.Tensor, shape: tuple[int, ...]) -> None:
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise PromptusError(
                f"tensorrt backend: {what} has shape {tuple(x.shape)}, expected N×{'×'.join(map(str, shape))}; "
                f"the engines were built for {self.size}×{self.size} frames (rebuild with --size for another size)"
            )

    @torch.inference_mode()
    def denoise(self, z, timestep, context):
        self._check("z", z, (4, self.latent, self.latent))
        self._check("context", context, (77, 1024))
        if context.shape[0] != z.shape[0]:
            raise PromptusError(f"tensorrt backend: {z.shape[0]} latents but {context.shape[0]} prompts")
        feeds = {"z": z.to(self.device), "timestep": int(timestep), "context": context.to(self.device)}
        return self._run("unet", feeds, z.shape[0], "eps", (4, self.latent, self.latent))

    @torch.inference_mode()
    def decode(self, latent):
        self._check("latent", latent, (4, self.latent, self.latent))
        return self._run("taesd_decoder", {"latent": latent.to(self.device)}, latent.shape[0], "image",
                         (3, self.size, self.size))

    def describe(self) -> str:
        return f"{super().describe()} [{self.flavour_name}, batch {self.batch}, {self.size} px]"


# ---------------------------------------------------------------------------------
# Command line: promptus engines build|list|clean
# ---------------------------------------------------------------------------------


def add_engines_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``promptus engines build|list|clean`` on ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "engines", help="build, list and clean the cached TensorRT engines",
        description="TensorRT engines of the UNet and the TAESD decoder, for one batch, frame size and GPU, "
                    "cached in the engine folder and built automatically by the tensorrt backend on first use. "
                    "'build' builds them ahead of time; 'list' shows the cache; 'clean' removes engines.",
    )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    sub = p.add_subparsers(dest="engines_command", metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--engine-dir", default=DEFAULT_ENGINE_DIR,
                       help=f"folder of the engine cache (default: {DEFAULT_ENGINE_DIR})")

    def model_args(q: argparse.ArgumentParser, default: str | None) -> None:
        q.add_argument("--model", default=default,
                       help="model weights: 'auto' (checkpoints/), 'tiny' (built-in test model), 'random' (full-size "
                            "architecture, random weights), a .safetensors file, a diffusers folder or a hub id"
                            + (f" (default: {default})" if default else ""))
        q.add_argument("--taesd", default=None, help="TAESD weights (default: checkpoints/taesd)")
        q.add_argument("--checkpoints", default="checkpoints", help="folder searched by --model auto")

    b = sub.add_parser("build", help="export and build the engines now (skips those already cached)",
                       description="Export the UNet and the TAESD decoder to ONNX and build TensorRT engines for a "
                                   "fixed batch and frame size. With tensorrt_rtx this works without a GPU "
                                   "(portable engines for compute capability 8.0/8.6/8.9/12.x).")
    model_args(b, "auto")
    b.add_argument("--size", type=int, default=512, help="frame size in pixels (default: 512)")
    b.add_argument("--batch", type=int, default=10,
                   help="frames per engine call; the keyframe interval (default: 10)")
    b.add_argument("--component", choices=["all", *COMPONENTS], default="all", help="which engine (default: all)")
    b.add_argument("--precision", choices=["fp16", "fp32"], default="fp16", help="engine precision (default: fp16)")
    b.add_argument("--device", default="auto",
                   help="where the models are loaded and exported, and whose GPU the engine targets: "
                        "cpu, cuda, cuda:N or auto (default)")
    b.add_argument("--flavour", choices=["auto", *FLAVOURS], default="auto",
                   help="TensorRT library: auto prefers tensorrt, then tensorrt_rtx")
    b.add_argument("--compute-capability", default="auto",
                   help="target GPU, e.g. 8.9; 'portable' (tensorrt_rtx default targets); auto: this machine's GPU, "
                        "or portable without one (default: auto)")
    b.add_argument("--force", action="store_true", help="rebuild even when a cached engine exists")
    b.add_argument("--keep-onnx", action="store_true", help="keep the ONNX files in ENGINE_DIR/onnx/")
    common(b)
    b.set_defaults(func=cmd_engines_build)

    ls = sub.add_parser("list", help="show the cached engines and whether each is usable",
                        description="List the engine cache: key fields, size, and status (ok, corrupt, orphan, "
                                    "temp, or stale when built by another version of the installed TensorRT).")
    common(ls)
    model_args(ls, None)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=cmd_engines_list)

    c = sub.add_parser("clean", help="remove unusable engines (or more)",
                       description="Without options: remove unusable entries (corrupt, orphan, temporary files) and "
                                   "engines of another version of the installed TensorRT. With --model/--size/--batch:"
                                   " also the engines that match all of them. With --all: everything.")
    common(c)
    model_args(c, None)
    c.add_argument("--size", type=int, default=None, help="also remove engines of this frame size")
    c.add_argument("--batch", type=int, default=None, help="also remove engines of this batch")
    c.add_argument("--all", action="store_true", help="remove every engine")
    c.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    c.set_defaults(func=cmd_engines_clean)
    return p


def _models_for_cli(args, device: torch.device):
    from ..models import full_size_random_models, load_models

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.model == "random":
        return full_size_random_models(device, dtype)
    return load_models(args.model, device=device, dtype=dtype, taesd=args.taesd, vae=False,
                       checkpoints_dir=args.checkpoints)


def cmd_engines_build(args) -> int:
    from . import resolve_device

    device = resolve_device(args.device)
    found = find_tensorrt(args.flavour)
    models = _models_for_cli(args, device)
    components = list(COMPONENTS) if args.component == "all" else [args.component]
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    for component in components:
        t0 = time.perf_counter()
        path = get_or_build(models, component, batch=args.batch, size=args.size, dtype=dtype,
                            engine_dir=args.engine_dir, flavour=found, compute_capability=args.compute_capability,
                            device=device, force=args.force,
                            keep_onnx=args.keep_onnx)
        print(f"{component}: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0


def _installed_versions() -> dict[str, str]:
    out = {}
    for name in FLAVOURS:
        with contextlib.suppress(TensorRTError):
            found = find_tensorrt(name)
            out[found.name] = found.version
    return out


def _digest_filter(args) -> str | None:
    if not getattr(args, "model", None):
        return None
    return _models_for_cli(args, torch.device("cpu")).identity().hexdigest


def cmd_engines_list(args) -> int:
    installed = _installed_versions()
    digest = _digest_filter(args)
    rows = []
    for e in list_engines(args.engine_dir):
        if digest and (e.key is None or e.key.model_digest != digest):
            continue
        status = e.status
        stale = e.key is not None and installed.get(e.key.flavour, e.key.trt_version) != e.key.trt_version
        if status == "ok" and stale:  # built by another version of the installed flavour: it cannot load
            status = "stale"
        rows.append({"file": e.path.name, "status": status, "reason": e.reason, "mb": round(e.nbytes / 1e6, 1),
                     **(e.key.as_dict() if e.key else {}), "model_name": e.sidecar.get("model_name"),
                     "build_seconds": e.sidecar.get("build_seconds")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no engines in {args.engine_dir}")
        return 0
    header = ("component", "batch", "size", "prec", "flavour", "target", "model", "MB", "status")
    table = [header] + [
        (r.get("component") or r["file"], str(r.get("batch", "")), str(r.get("size", "")), r.get("precision", ""),
         f"{r.get('flavour', '')} {r.get('trt_version', '')}".strip(), r.get("compute_capability", ""),
         f"{r.get('model_name') or ''} {str(r.get('model_digest', ''))[:12]}".strip(), f"{r['mb']:.1f}",
         r["status"] + (f": {r['reason']}" if r["reason"] else ""))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    print(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'} in {args.engine_dir}")
    return 0


def cmd_engines_clean(args) -> int:
    digest = _digest_filter(args)
    filters = [f for f in (
        (lambda k: k.model_digest == digest) if digest else None,
        (lambda k: k.size == args.size) if args.size is not None else None,
        (lambda k: k.batch == args.batch) if args.batch is not None else None,
    ) if f is not None]
    match = (lambda k: all(f(k) for f in filters)) if filters else None
    removed = clean_engines(args.engine_dir, everything=args.all, match=match,
                            installed=_installed_versions().items(), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for p in removed:
        print(f"{verb} {p}")
    print(f"{verb} {len(removed)} file{'s' if len(removed) != 1 else ''} from {args.engine_dir}")
    return 0


__all__ = [
    "Engine", "EngineBuildError", "EngineLoadError", "INSTALL_HELP", "PORTABLE", "TensorInfo", "TensorRTBackend",
    "TensorRTError", "TensorRTFlavour", "TensorRTNotInstalledError", "add_engines_parser", "build_engine",
    "engine_key", "find_tensorrt", "get_or_build", "resolve_compute_capability", "tensorrt_status",
]
