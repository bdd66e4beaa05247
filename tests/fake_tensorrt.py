"""A fake ``tensorrt`` module and a fake CUDA, for tests of our engine code on machines without a GPU.

They check our code's use of the TensorRT API — which calls it makes, in which order, on
which device and stream, with which memory, what it caches and how it reacts to each
failure — not TensorRT itself: nothing here builds or runs a network. Every call lands
in one :class:`Events` list shared by the fake TensorRT and the fake CUDA, so a test
can check the order of, say, "PyTorch's cached memory released" and "builder started".

The fake exposes only names of the documented Python API of its flavour
(:data:`STANDARD_API` for ``tensorrt``, :data:`RTX_API` for ``tensorrt_rtx``); a test
checks that, so a misspelt or made-up call in our code fails here as it would on a GPU.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

#: Names our code may use from standard TensorRT (10.x / 11.x), per class, as documented in
#: NVIDIA's TensorRT Python API reference (Builder, OnnxParser, IBuilderConfig, ITimingCache,
#: Runtime, ICudaEngine, IExecutionContext, ILogger and the enums).
STANDARD_API: dict[str, set[str]] = {
    "module": {"Builder", "OnnxParser", "Runtime", "ILogger", "IBuilderConfig", "ITimingCache", "ICudaEngine",
               "IExecutionContext", "NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "TensorIOMode",
               "DataType", "ExecutionContextAllocationStrategy", "__version__"},
    "ILogger": {"log", "Severity"},
    "ILogger.Severity": {"INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"},
    "Builder": {"create_network", "create_builder_config", "build_serialized_network"},
    "OnnxParser": {"parse_from_file", "num_errors", "get_error"},
    "IBuilderConfig": {"set_flag", "builder_optimization_level", "set_memory_pool_limit", "create_timing_cache",
                       "set_timing_cache", "get_timing_cache"},
    "ITimingCache": {"serialize"},
    "Runtime": {"deserialize_cuda_engine"},
    "ICudaEngine": {"num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "get_tensor_shape",
                    "create_execution_context", "device_memory_size_v2"},
    "IExecutionContext": {"set_input_shape", "set_tensor_address", "execute_async_v3", "set_device_memory"},
    "NetworkDefinitionCreationFlag": {"STRONGLY_TYPED"},
    "BuilderFlag": {"FP16"},
    "MemoryPoolType": {"WORKSPACE"},
    "TensorIOMode": {"INPUT", "OUTPUT"},
    "DataType": {"FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8"},
    "ExecutionContextAllocationStrategy": {"STATIC", "USER_MANAGED"},
}

#: TensorRT for RTX: the standard names without the timing cache (a no-op there) and
#: BuilderFlag.FP16 (removed), plus its runtime configuration, runtime cache, engine
#: validity check and compute-capability targets (TensorRT-RTX Python API reference).
RTX_API: dict[str, set[str]] = {
    **{k: set(v) for k, v in STANDARD_API.items()},
    "module": (STANDARD_API["module"] | {"IRuntimeConfig", "IRuntimeCache", "CudaGraphStrategy", "EngineValidity",
                                         "EngineInvalidityDiagnostics", "ComputeCapability"}),
    "IBuilderConfig": {"set_flag", "builder_optimization_level", "set_memory_pool_limit",
                       "num_compute_capabilities", "set_compute_capability"},
    "ITimingCache": set(),
    "BuilderFlag": set(),
    "Runtime": {"deserialize_cuda_engine", "get_engine_validity"},
    "ICudaEngine": STANDARD_API["ICudaEngine"] | {"create_runtime_config"},
    "IRuntimeConfig": {"cuda_graph_strategy", "set_execution_context_allocation_strategy", "create_runtime_cache",
                       "set_runtime_cache"},
    "IRuntimeCache": {"serialize", "deserialize"},
    "CudaGraphStrategy": {"DISABLED", "WHOLE_GRAPH_CAPTURE"},
    "EngineValidity": {"VALID", "SUBOPTIMAL", "INVALID"},
    "EngineInvalidityDiagnostics": {"VERSION_MISMATCH", "UNSUPPORTED_CC", "OLD_CUDA_DRIVER", "OLD_CUDA_RUNTIME",
                                    "INSUFFICIENT_GPU_MEMORY", "MALFORMED_ENGINE", "CUDA_ERROR"},
    "ComputeCapability": {"NONE", "CURRENT", "SM75", "SM80", "SM86", "SM89", "SM120", "SM121"},
}


class Events(list):
    """Everything the fakes saw, in order: tuples whose first item names the call."""

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self if e[0] == kind]

    def index_of(self, kind: str, *, last: bool = False) -> int:
        found = [i for i, e in enumerate(self) if e[0] == kind]
        assert found, f"no {kind!r} event in {[e[0] for e in self]}"
        return found[-1] if last else found[0]


class _Member(int):
    """An enum value: an int with a name (TensorRT's enums are int-like)."""

    def __new__(cls, enum: str, name: str, value: int):
        obj = super().__new__(cls, value)
        obj.name, obj.enum = name, enum
        return obj

    def __repr__(self) -> str:
        return f"<{self.enum}.{self.name}: {int(self)}>"

    __str__ = __repr__


def _enum(name: str, names, *, flags: bool = False) -> SimpleNamespace:
    members = {n: _Member(name, n, (1 << i) if flags else i) for i, n in enumerate(sorted(names))}
    return SimpleNamespace(__members__=members, **members)


# ---------------------------------------------------------------------------------
# Fake CUDA (replaces promptus.backends.trt_cuda.CUDA)
# ---------------------------------------------------------------------------------


class FakeStream:
    _next = 100

    def __init__(self, cuda: "FakeCuda", device: int, handle: int | None = None):
        if handle is None:
            FakeStream._next += 1
            handle = FakeStream._next
        self.cuda, self.device, self.cuda_stream = cuda, device, handle

    def wait_stream(self, other: "FakeStream") -> None:
        self.cuda.events.append(("wait_stream", self.cuda_stream, other.cuda_stream))


class FakeGraph:
    def __init__(self, cuda: "FakeCuda"):
        self.cuda, self.captured = cuda, []

    def replay(self) -> None:
        self.cuda.events.append(("replay", self.cuda._device, self.cuda._stream.cuda_stream if self.cuda._stream
                                 else None, tuple(self.captured)))


class FakeCuda:
    """CUDA as our engine code sees it, on the CPU: ``device_count`` GPUs, streams as numbers."""

    def __init__(self, events: Events, *, device_count: int = 2, free: int = 6 << 30, total: int = 8 << 30,
                 driver: tuple[int, int] | None = (13, 0)):
        self.events, self.device_count, self.free, self.total, self.driver = events, device_count, free, total, driver
        self._device = 0
        self._stream: FakeStream | None = None
        self._capturing: FakeGraph | None = None
        self._default = {i: FakeStream(self, i, handle=i) for i in range(device_count)}

    def _index(self, device) -> int:
        d = torch.device(device)
        return self._device if d.index is None else d.index

    def available(self) -> bool:
        return True

    def current_device(self) -> int:
        return self._device

    @contextlib.contextmanager
    def device(self, device):
        old, self._device = self._device, self._index(device)
        try:
            yield
        finally:
            self._device = old

    def new_stream(self, device) -> FakeStream:
        s = FakeStream(self, self._index(device))
        self.events.append(("new_stream", s.device, s.cuda_stream))
        return s

    def current_stream(self, device) -> FakeStream:
        return self._stream if self._stream is not None else self._default[self._index(device)]

    @contextlib.contextmanager
    def use_stream(self, stream):
        old, self._stream = self._stream, stream
        try:
            yield
        finally:
            self._stream = old

    def empty(self, shape, dtype, device) -> torch.Tensor:
        t = torch.zeros(shape, dtype=dtype)  # zeros: deterministic for the tests
        self.events.append(("alloc", self._index(device), t.numel() * t.element_size(), t.data_ptr()))
        return t

    def mem_get_info(self, device) -> tuple[int, int]:
        return self.free, self.total

    def release_cached_memory(self) -> None:
        self.events.append(("release_cached_memory",))

    def new_graph(self) -> FakeGraph:
        return FakeGraph(self)

    @contextlib.contextmanager
    def capture(self, graph: FakeGraph, stream):
        self._capturing, old = graph, self._stream
        self._stream = stream
        try:
            yield
        finally:
            self._capturing, self._stream = None, old
        self.events.append(("captured", stream.cuda_stream, tuple(graph.captured)))

    def driver_version(self):
        return self.driver


# ---------------------------------------------------------------------------------
# Fake TensorRT
# ---------------------------------------------------------------------------------


def fake_export(models, component, path, *, batch, size, dtype, exporter="auto", **_):
    """Stands in for ``export_component``: writes the component's I/O as JSON (read by the fake parser)."""
    from promptus.backends.onnx_export import component_spec

    spec = component_spec(component)
    shapes, dtypes = spec.shapes(batch, size), spec.dtypes(dtype)
    io = [[n, list(shapes[n]), str(dtypes[n]).removeprefix("torch."), n in spec.inputs] for n in shapes]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"component": component, "io": io}))
    return path


_DTYPE_NAMES = {"float16": "HALF", "float32": "FLOAT", "int64": "INT64"}
#: Scratch memory each fake engine asks for (bytes): the shared block must be the largest.
SCRATCH = {"unet": 3000, "taesd_decoder": 1000}


def _fault(failures: dict, name: str):
    """The fault injected for ``name``: a list is consumed one item per call (then no fault)."""
    value = failures.get(name)
    if isinstance(value, list):
        return value.pop(0) if value else None
    return value


def make_fake_tensorrt(cuda: FakeCuda, *, flavour: str = "tensorrt", version: str = "10.13.0.35",
                       strongly_typed: bool = True, fp16_flag: bool | None = None,
                       failures: dict | None = None) -> ModuleType:
    """A module object standing in for ``tensorrt`` (or, with ``flavour="tensorrt_rtx"``, ``tensorrt_rtx``).

    ``failures`` injects faults: ``"parse"``, ``"build"`` (True), ``"deserialize"`` (the
    logger message TensorRT would give), ``"validity"`` (names of
    ``EngineInvalidityDiagnostics``, RTX), ``"context"`` (a logger message),
    ``"execute"`` (True: ``execute_async_v3`` returns False), ``"warnings"`` (logged by
    the builder). A list instead of a value is one fault per call, in order, then none. ``fp16_flag=None`` means: standard TensorRT has ``BuilderFlag.FP16``,
    RTX has not.
    """
    rtx = flavour == "tensorrt_rtx"
    api = RTX_API if rtx else STANDARD_API
    failures = dict(failures or {})
    events = cuda.events
    m = ModuleType(f"fake_{flavour}")
    m.__version__ = version
    m.failures = failures  # tests change faults between calls
    m.api = api

    severity = _enum("Severity", api["ILogger.Severity"])
    m.TensorIOMode = _enum("TensorIOMode", api["TensorIOMode"])
    m.DataType = _enum("DataType", api["DataType"])
    m.ExecutionContextAllocationStrategy = _enum("ExecutionContextAllocationStrategy",
                                                 api["ExecutionContextAllocationStrategy"])
    m.MemoryPoolType = _enum("MemoryPoolType", api["MemoryPoolType"])
    m.NetworkDefinitionCreationFlag = _enum(
        "NetworkDefinitionCreationFlag", api["NetworkDefinitionCreationFlag"] if strongly_typed else set())
    has_fp16 = (not rtx) if fp16_flag is None else fp16_flag
    m.BuilderFlag = _enum("BuilderFlag", {"FP16"} if has_fp16 else set())
    if rtx:
        m.CudaGraphStrategy = _enum("CudaGraphStrategy", api["CudaGraphStrategy"])
        m.EngineValidity = _enum("EngineValidity", api["EngineValidity"])
        m.EngineInvalidityDiagnostics = _enum("EngineInvalidityDiagnostics", api["EngineInvalidityDiagnostics"],
                                              flags=True)
        m.ComputeCapability = _enum("ComputeCapability", api["ComputeCapability"])

    class ILogger:
        Severity = severity

        def __init__(self):
            pass

        def log(self, severity, msg):  # overridden by our logger
            raise NotImplementedError

    m.ILogger = ILogger

    # -- building

    class INetworkDefinition:
        def __init__(self, flags):
            self.flags, self.spec = flags, None

    class OnnxParser:
        def __init__(self, network, logger):
            self._network, self._logger, self._errors = network, logger, []

        def parse_from_file(self, path):
            if failures.get("parse"):
                self._errors.append("fake parse error")
                return False
            self._network.spec = json.loads(Path(path).read_text())
            return True

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, i):
            return self._errors[i]

    class ITimingCache:
        def __init__(self, data: bytes):
            self.data = bytes(data)

        def serialize(self):
            return self.data

    class IBuilderConfig:
        def __init__(self):
            self.flags, self.pools, self.timing_cache = [], {}, None
            self.builder_optimization_level = 3
            if rtx:
                self.num_compute_capabilities = 0
                self.targets = {}

        def set_flag(self, flag):
            self.flags.append(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size
            events.append(("memory_pool_limit", pool.name, size))

        if not rtx:
            def create_timing_cache(self, data):
                return ITimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.timing_cache = cache
                events.append(("set_timing_cache", cache.data, ignore_mismatch))
                return True

            def get_timing_cache(self):
                return self.timing_cache
        else:
            def set_compute_capability(self, cc, index):
                self.targets[index] = cc
                return True

    class Builder:
        def __init__(self, logger):
            self._logger = logger

        def create_network(self, flags):
            events.append(("create_network", flags))
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def build_serialized_network(self, network, config):
            spec = network.spec
            for w in failures.get("warnings", ()):
                self._logger.log(severity.WARNING, w)
            events.append(("build", spec["component"], cuda._device, list(config.flags),
                           config.timing_cache.data if config.timing_cache else None))
            if _fault(failures, "build"):
                self._logger.log(severity.ERROR, "fake builder error: out of tactics")
                return None
            if config.timing_cache is not None:  # the build adds its measurements
                config.timing_cache.data += f"[{spec['component']}]".encode()
            engine = {"component": spec["component"], "io": spec["io"], "version": version,
                      "scratch": SCRATCH[spec["component"]]}
            return json.dumps(engine).encode()

    m.Builder, m.OnnxParser, m.IBuilderConfig = Builder, OnnxParser, IBuilderConfig
    if not rtx:
        m.ITimingCache = ITimingCache

    # -- running

    class IRuntimeCache:
        def __init__(self):
            self.kernels: set[str] = set()

        def serialize(self):
            return json.dumps(sorted(self.kernels)).encode()

        def deserialize(self, blob):
            events.append(("runtime_cache_deserialize", bytes(blob)))
            self.kernels |= set(json.loads(bytes(blob)))
            return True

    class IRuntimeConfig:
        def __init__(self):
            self.cuda_graph_strategy = m.CudaGraphStrategy.DISABLED
            self.strategy = m.ExecutionContextAllocationStrategy.STATIC
            self.cache = None

        def set_execution_context_allocation_strategy(self, strategy):
            self.strategy = strategy

        def create_runtime_cache(self):
            return IRuntimeCache()

        def set_runtime_cache(self, cache):
            self.cache = cache
            return True

    class IExecutionContext:
        def __init__(self, engine, strategy, config):
            self.engine, self.strategy, self.config = engine, strategy, config
            self.addresses, self.shapes, self.memory = {}, {}, None

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return True

        def set_device_memory(self, memory, size):
            self.memory = (memory, size)
            events.append(("set_device_memory", self.engine.component, memory, size))

        def execute_async_v3(self, stream_handle):
            call = ("execute", self.engine.component, cuda._device, stream_handle,
                    self.memory[0] if self.memory else None)
            if cuda._capturing is not None:
                cuda._capturing.captured.append(call)
                return True
            events.append(call)
            if _fault(failures, "execute"):
                self.engine._logger.log(severity.ERROR, "fake: an illegal memory access was encountered")
                return False
            return True

    class ICudaEngine:
        def __init__(self, meta, logger):
            self.component, self._io, self._logger = meta["component"], meta["io"], logger
            self.device_memory_size_v2 = meta["scratch"]

        @property
        def num_io_tensors(self):
            return len(self._io)

        def get_tensor_name(self, i):
            return self._io[i][0]

        def _find(self, name):
            return next(t for t in self._io if t[0] == name)

        def get_tensor_shape(self, name):
            return tuple(self._find(name)[1])

        def get_tensor_dtype(self, name):
            return getattr(m.DataType, _DTYPE_NAMES[self._find(name)[2]])

        def get_tensor_mode(self, name):
            return m.TensorIOMode.INPUT if self._find(name)[3] else m.TensorIOMode.OUTPUT

        def create_execution_context(self, arg=None):
            config = arg if isinstance(arg, IRuntimeConfig) else None
            strategy = config.strategy if config is not None else arg
            events.append(("create_context", self.component, cuda._device,
                           strategy.name if strategy is not None else "STATIC"))
            fault = _fault(failures, "context")
            if fault:
                self._logger.log(severity.ERROR, fault)
                return None
            if config is not None and config.cache is not None and self.component not in config.cache.kernels:
                events.append(("jit", self.component))  # TensorRT-RTX compiles kernels at context creation
                config.cache.kernels.add(self.component)
            return IExecutionContext(self, strategy, config)

        if rtx:
            def create_runtime_config(self):
                return IRuntimeConfig()

    class Runtime:
        def __init__(self, logger):
            self._logger = logger

        def deserialize_cuda_engine(self, data):
            events.append(("deserialize", cuda._device, len(bytes(data))))
            fault = _fault(failures, "deserialize")
            if fault:
                self._logger.log(severity.ERROR, fault)
                return None
            return ICudaEngine(json.loads(bytes(data)), self._logger)

        if rtx:
            def get_engine_validity(self, data):
                bad = _fault(failures, "validity")
                if not bad:
                    return m.EngineValidity.VALID, 0
                diag = 0
                for name in bad:
                    diag |= int(getattr(m.EngineInvalidityDiagnostics, name))
                return m.EngineValidity.INVALID, diag

    m.Runtime, m.ICudaEngine, m.IExecutionContext = Runtime, ICudaEngine, IExecutionContext
    if rtx:
        m.IRuntimeConfig, m.IRuntimeCache = IRuntimeConfig, IRuntimeCache
    return m


def public_names(obj) -> set[str]:
    """The attributes a fake class or enum offers (what our code could call on it)."""
    if isinstance(obj, SimpleNamespace):
        return set(obj.__members__)
    names = set()
    for klass in getattr(obj, "__mro__", [type(obj)]):
        if klass is object:
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
    return names
