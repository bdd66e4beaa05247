"""Running a TensorRT engine: load, create its execution context and buffers, infer on a stream.

:class:`Engine` is NVIDIA demo/Diffusion's engine object without the builder: it
deserializes one engine file, binds a torch tensor to every input and output by name,
runs ``execute_async_v3`` on a CUDA stream and optionally replays a CUDA graph.
Building is :mod:`promptus.backends.trt_build`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import torch

from ..errors import PromptusError
from ..files import atomic_write
from . import trt_cuda
from .artifact_cache import NotARegularFile, read_regular_file
from .trt_build import EngineLoadError, TensorRTError, TensorRTFlavour, find_tensorrt, make_logger

log = logging.getLogger(__name__)

#: A runtime cache holds the compiled kernels of one engine: tens of MB; a bigger file is not one.
MAX_RUNTIME_CACHE_BYTES = 1 << 30

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


#: TensorRT-RTX load-time diagnostics a rebuild fixes: another version, another GPU, a damaged plan.
#: The others (old driver or CUDA runtime, too little memory, a CUDA error) would fail again.
REBUILDABLE_DIAGNOSTICS = frozenset({"VERSION_MISMATCH", "UNSUPPORTED_CC", "MALFORMED_ENGINE"})
#: Standard TensorRT says why deserialization failed only in its log: these messages mean
#: "this plan is not for this TensorRT or GPU, or not a plan" (a rebuild helps) ...
_REBUILD_MESSAGES = re.compile(
    r"not compatible with this version|version.*(mismatch|expect)|incompatible device|please rebuild|"
    r"magic ?tag|serialization assertion|corrupt|malformed", re.IGNORECASE)
#: ... and these "the machine cannot do it now" (a rebuild does not), whatever else they say.
_HARDWARE_MESSAGES = re.compile(
    r"out of memory|\boom\b|cuda (runtime|driver|initialization)|cuda error|illegal memory|driver|insufficient",
    re.IGNORECASE)


def rebuild_helps(messages: list[str]) -> bool:
    """Whether TensorRT's deserialization errors ``messages`` describe a stale or damaged engine."""
    text = " ".join(messages)
    return bool(_REBUILD_MESSAGES.search(text)) and not _HARDWARE_MESSAGES.search(text)


class Engine:
    """A deserialized engine with its execution context, I/O buffers and CUDA stream.

    Every I/O tensor gets a torch tensor on ``device`` whose address is bound once with
    ``set_tensor_address``; :meth:`infer` copies the feeds into the input buffers on the
    caller's stream, runs ``execute_async_v3`` on the engine's stream (TensorRT syncs the
    whole device on the legacy default stream) ordered by stream waits — no host round
    trip — and returns the output buffers, overwritten by the next call. Every call into
    TensorRT runs with the engine's GPU current, whichever device the caller has current.

    :meth:`activate` can be given a ``stream`` and a ``scratch`` block (a uint8 tensor)
    shared with other engines that run one after another on that stream, as NVIDIA's
    demo shares one block sized to its largest engine: the context is then created
    without memory of its own (``USER_MANAGED``) and bound to the block.

    ``cuda_graph=True``: TensorRT-RTX captures and replays the engine itself
    (``CudaGraphStrategy.WHOLE_GRAPH_CAPTURE``); with standard TensorRT the second
    :meth:`infer` captures ``execute_async_v3`` into a CUDA graph (after one plain
    warm-up run) and later calls replay it. If capture fails, it logs and runs plainly.

    ``runtime_cache`` (TensorRT-RTX): a file for the kernels it compiles just in time at
    context creation; loaded by :meth:`activate`, written by :meth:`save_runtime_cache`
    and :meth:`close`, so the next process skips the compilation.
    """

    def __init__(self, path: str | os.PathLike, *, flavour: TensorRTFlavour | str = "auto",
                 device: torch.device | str = "cuda", cuda_graph: bool = False,
                 runtime_cache: str | os.PathLike | None = None):
        self.path = Path(path)
        self.flavour = flavour if isinstance(flavour, TensorRTFlavour) else find_tensorrt(flavour)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise TensorRTError(f"TensorRT engines run on CUDA devices, not {self.device}")
        if not trt_cuda.CUDA.available():
            raise TensorRTError("no CUDA: PyTorch sees no CUDA GPU here, and TensorRT engines run only on one")
        if self.device.index is None:
            self.device = torch.device("cuda", trt_cuda.CUDA.current_device())
        self.cuda_graph = cuda_graph
        self.runtime_cache_path = Path(runtime_cache) if runtime_cache is not None and self.flavour.is_rtx else None
        self.engine = None
        self.context = None
        self.stream = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.io: list[TensorInfo] = []
        self._graph = None
        self._runs = 0
        self._logger = None
        self._runtime = None
        self._runtime_config = None
        self._runtime_cache = None
        self._scratch = None

    # -- loading

    def load(self, data: Any = None) -> "Engine":
        """Deserialize the engine (``data``: its bytes, already read; else the file is read).

        Raises :class:`EngineLoadError` with TensorRT's reason; its ``rebuildable`` says
        whether building the engine again can help.
        """
        trt = self.flavour.module
        self._logger = make_logger(trt)
        if data is None:
            data = _read_engine_file(self.path)
        cuda = trt_cuda.CUDA
        with cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            if self.flavour.is_rtx and hasattr(self._runtime, "get_engine_validity"):
                validity, diagnostics = self._runtime.get_engine_validity(data)
                if validity == trt.EngineValidity.INVALID:
                    reasons = _validity_names(trt, diagnostics)
                    rebuildable = bool(reasons) and set(reasons) <= REBUILDABLE_DIAGNOSTICS
                    raise EngineLoadError(
                        f"{self.path.name}: {self.flavour.describe()} says the engine cannot run on this GPU "
                        f"({_validity_reasons(trt, diagnostics)})"
                        + ("; it will be rebuilt" if rebuildable else "; a rebuild would not help"),
                        rebuildable=rebuildable,
                    )
            self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            errors = self._logger.errors[-3:]
            raise EngineLoadError(
                f"{self.path.name}: {self.flavour.describe()} could not deserialize it: "
                + ("; ".join(errors) or "no reason given"),
                rebuildable=rebuild_helps(errors),
            )
        self.io = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineLoadError(f"{self.path.name}: tensor {name} has a dynamic shape {shape}; "
                                      "promptus engines are static — rebuild it", rebuildable=True)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            self.io.append(TensorInfo(name, shape, torch_dtype(self.engine.get_tensor_dtype(name)), is_input))
        return self

    @property
    def scratch_bytes(self) -> int:
        """Device memory the engine's context needs besides its I/O buffers (its activations)."""
        if self.engine is None:
            self.load()
        return int(self.engine.device_memory_size_v2)

    def activate(self, *, stream=None, scratch: torch.Tensor | None = None) -> "Engine":
        """Create the execution context and the I/O buffers, and bind them.

        ``stream``: the CUDA stream to run on (default: a new one). ``scratch``: a uint8
        device tensor of at least :attr:`scratch_bytes` to use as the context's memory
        (default: the context allocates its own).
        """
        if self.engine is None:
            self.load()
        trt = self.flavour.module
        cuda = trt_cuda.CUDA
        strategy = trt.ExecutionContextAllocationStrategy
        with cuda.device(self.device):
            self.stream = stream if stream is not None else cuda.new_stream(self.device)
            if self.flavour.is_rtx and hasattr(self.engine, "create_runtime_config"):
                config = self.engine.create_runtime_config()
                if self.cuda_graph:
                    config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                if scratch is not None:
                    config.set_execution_context_allocation_strategy(strategy.USER_MANAGED)
                if self.runtime_cache_path is not None:
                    self._runtime_cache = self._load_runtime_cache(config)
                self._runtime_config = config  # kept alive with the context
                self.context = self.engine.create_execution_context(config)
            elif scratch is not None:
                self.context = self.engine.create_execution_context(strategy.USER_MANAGED)
            else:
                self.context = self.engine.create_execution_context()
            if self.context is None:
                raise TensorRTError(f"{self.path.name}: could not create an execution context: "
                                    + ("; ".join(self._logger.errors[-3:]) or "no reason given"))
            if scratch is not None:
                nbytes = scratch.numel() * scratch.element_size()
                if nbytes < self.scratch_bytes:
                    raise TensorRTError(f"{self.path.name}: scratch block of {nbytes} bytes, needs {self.scratch_bytes}")
                self.context.set_device_memory(scratch.data_ptr(), nbytes)
                self._scratch = scratch  # the context only holds its address
            for t in self.io:
                buf = cuda.empty(t.shape, dtype=t.dtype, device=self.device)
                if t.is_input:
                    self.context.set_input_shape(t.name, t.shape)
                if not self.context.set_tensor_address(t.name, buf.data_ptr()):
                    raise TensorRTError(f"{self.path.name}: could not bind tensor {t.name}")
                self.buffers[t.name] = buf
        return self

    def _load_runtime_cache(self, config):
        cache = config.create_runtime_cache()
        path = self.runtime_cache_path
        if os.path.lexists(path):
            try:
                if not cache.deserialize(read_regular_file(path, MAX_RUNTIME_CACHE_BYTES)):
                    log.info("%s: runtime cache %s is for another GPU, driver or version; compiling afresh",
                             self.path.name, path.name)
            except (OSError, PromptusError) as e:
                log.warning("%s: ignoring runtime cache %s: %s", self.path.name, path, e)
        if not config.set_runtime_cache(cache):
            log.warning("%s: TensorRT-RTX refused the runtime cache; kernels are compiled on every start", self.path.name)
            return None
        return cache

    def save_runtime_cache(self) -> Path | None:
        """Write TensorRT-RTX's runtime cache (the kernels compiled so far) beside the engine."""
        if self._runtime_cache is None or self.runtime_cache_path is None:
            return None
        try:
            with trt_cuda.CUDA.device(self.device):
                data = self._runtime_cache.serialize()
            atomic_write(self.runtime_cache_path, memoryview(data))
        except (OSError, RuntimeError) as e:  # a cache only saves time
            log.warning("%s: could not save the runtime cache: %s", self.path.name, e)
            return None
        return self.runtime_cache_path

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
        # the engine's GPU current: enqueue on another device's stream and memory is undefined behaviour
        with trt_cuda.CUDA.device(self.device), torch.inference_mode():
            return self._infer(feeds)

    def _infer(self, feeds: Mapping[str, torch.Tensor | int | float]) -> dict[str, torch.Tensor]:
        cuda = trt_cuda.CUDA
        caller = cuda.current_stream(self.device)
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
            with cuda.use_stream(self.stream):
                self._graph.replay()
        else:
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise TensorRTError(f"{self.path.name}: execute_async_v3 failed: "
                                    + ("; ".join(self._logger.errors[-3:]) or "no reason given"))
            self._runs += 1
            if self.cuda_graph and not self.flavour.is_rtx and self._runs == 1:
                self._capture()
        caller.wait_stream(self.stream)
        return {t.name: self.buffers[t.name] for t in self.outputs}

    def _capture(self) -> None:
        """Capture ``execute_async_v3`` into a CUDA graph (standard TensorRT, after one warm-up run)."""
        cuda = trt_cuda.CUDA
        graph = cuda.new_graph()
        try:
            with cuda.capture(graph, self.stream):
                ok = self.context.execute_async_v3(self.stream.cuda_stream)
            if not ok:
                raise TensorRTError("execute_async_v3 returned False during capture")
        except Exception as e:  # capture is an optimisation: fall back to plain enqueues
            log.warning("%s: CUDA graph capture failed (%s); running without it", self.path.name, e)
            self.cuda_graph = False
            return
        self._graph = graph

    def close(self) -> None:
        """Save the runtime cache, then release the graph, context, buffers and engine (in that order)."""
        self.save_runtime_cache()
        self._graph = None
        self.context = None
        self._runtime_cache = None
        self._runtime_config = None
        self._scratch = None
        self.buffers.clear()
        self.engine = None
        self._runtime = None


def _read_engine_file(path: Path) -> bytes:
    """The bytes of an engine file that is not in the cache (a regular file, however large)."""
    try:
        size = os.stat(path).st_size
        return read_regular_file(path, size)
    except FileNotFoundError:
        raise TensorRTError(f"{path}: no such engine file") from None
    except NotARegularFile as e:
        raise TensorRTError(f"{path}: not a regular file ({e})") from None
    except OSError as e:
        raise TensorRTError(f"{path}: cannot read the engine ({e})") from None


def _validity_names(trt: ModuleType, diagnostics: int) -> list[str]:
    enum = getattr(trt, "EngineInvalidityDiagnostics", None)
    return [n for n, v in getattr(enum, "__members__", {}).items() if int(diagnostics) & int(v)]


def _validity_reasons(trt: ModuleType, diagnostics: int) -> str:
    return ", ".join(_validity_names(trt, diagnostics)) or f"diagnostics {int(diagnostics):#x}"


__all__ = ["Engine", "REBUILDABLE_DIAGNOSTICS", "TensorInfo", "rebuild_helps", "torch_dtype"]
