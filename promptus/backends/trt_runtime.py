"""Running a TensorRT engine: load, create its execution context and buffers, infer on a stream.

:class:`Engine` is NVIDIA demo/Diffusion's engine object without the builder: it
deserializes one engine file, binds a torch tensor to every input and output by name,
runs ``execute_async_v3`` on a CUDA stream and optionally replays a CUDA graph.
Building is :mod:`promptus.backends.trt_build`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import torch

from ..errors import PromptusError
from .trt_build import EngineLoadError, TensorRTError, TensorRTFlavour, find_tensorrt, make_logger

log = logging.getLogger(__name__)

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
        self._logger = make_logger(trt)
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


__all__ = ["Engine", "TensorInfo", "torch_dtype"]
