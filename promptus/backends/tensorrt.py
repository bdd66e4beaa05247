"""The ``tensorrt`` backend: the UNet and the TAESD decoder as TensorRT engines.

The pieces, in the manner of NVIDIA's demo/Diffusion: :mod:`promptus.backends.onnx_export`
describes and exports each component, :mod:`promptus.backends.trt_build` finds TensorRT
and builds engines into :mod:`promptus.backends.engine_cache`, and
:mod:`promptus.backends.trt_runtime` runs them. This module joins them into a
:class:`~promptus.backends.base.Backend` and re-exports the names callers use.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..config import DEFAULT_ENGINE_DIR
from ..errors import PromptusError
from .base import Backend
from . import trt_build, trt_cuda
from .engine_cache import runtime_cache_path
from .onnx_export import COMPONENTS, precision_name, validate_shape
from .trt_build import (
    FLAVOURS, INSTALL_HELP, PORTABLE, EngineBuildError, EngineLoadError, TensorRTError, TensorRTFlavour,
    TensorRTNotInstalledError, build_engine, engine_key, find_tensorrt, get_or_build, load_or_build,
    resolve_compute_capability, tensorrt_status,
)
from .trt_runtime import Engine, TensorInfo

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..models import Models

log = logging.getLogger(__name__)


class TensorRTBackend(Backend):
    """Runs the UNet and the TAESD decoder as TensorRT engines of a fixed batch and size.

    ``batch`` (the clip's keyframe interval) and ``size`` (its frame size) come from the
    caller: the clip's header. Setting up goes through these stages, each of which raises
    a :class:`~promptus.errors.PromptusError` naming it when it fails: check that TensorRT
    can run here (:func:`tensorrt_status`: CUDA, a TensorRT flavour, the export packages,
    the driver), export and build each engine on first use (cached in ``engine_dir``),
    load them, create their contexts — one CUDA stream and one scratch block for both,
    as they run one after the other — and run each once (the first inference, which also
    fills TensorRT-RTX's runtime cache, saved beside the engine). An engine that does not
    load is rebuilt only when its load error says a rebuild can help.

    ``offload_models=True`` moves the PyTorch UNet and TAESD decoder of ``models`` to the
    CPU once the engines run (they are not needed after the export): for callers that
    only decode. :meth:`denoise` and :meth:`decode` take any number of frames: fewer than
    the engine's batch are padded (the spare rows hold stale data, and rows never mix),
    more are run in engine-sized chunks. Inputs are cast to the engine's precision at the
    boundary; results come back as fresh float32 tensors on the device. ``engines``
    (``{"unet": ..., "taesd_decoder": ...}``, objects with ``infer``) skips all of this,
    for callers that manage engines themselves.
    """

    name = "tensorrt"

    def __init__(self, models: "Models", device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16, *,
                 batch: int, size: int, engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR,
                 flavour: str = "auto", compute_capability: str = "auto", cuda_graph: bool = True,
                 engines: Mapping[str, Any] | None = None, offload_models: bool = False):
        super().__init__(torch.device(device), dtype)
        precision_name(dtype)
        validate_shape(models, batch, size)
        self.batch, self.size, self.latent = batch, size, size // 8
        self.flavour_name = "injected"
        self._scratch = None
        if engines is None:
            engines = self._prepare(models, engine_dir, flavour, compute_capability, cuda_graph)
            if offload_models:
                _offload(models)
        missing = set(COMPONENTS) - set(engines)
        if missing:
            raise PromptusError(f"TensorRTBackend: engines missing for {sorted(missing)}")
        self.engines = dict(engines)

    def _prepare(self, models, engine_dir, flavour, compute_capability, cuda_graph) -> dict[str, Engine]:
        ok, why = trt_build.tensorrt_status(self.device, flavour)
        if not ok:
            raise TensorRTError(f"the tensorrt backend cannot run here: {why}")
        found = trt_build.find_tensorrt(flavour)
        self.flavour_name = found.describe()
        build = dict(batch=self.batch, size=self.size, dtype=self.dtype, engine_dir=engine_dir, flavour=found,
                     compute_capability=compute_capability, device=self.device)
        engines = {}
        for component in COMPONENTS:
            with _stage(f"export and build of {component}"):
                path, data = trt_build.load_or_build(models, component, **build)
            make = lambda p: Engine(p, flavour=found, device=self.device, cuda_graph=cuda_graph,  # noqa: E731
                                    runtime_cache=runtime_cache_path(p))
            try:
                with _stage(f"load of {component}"):
                    engines[component] = make(path).load(data)
            except EngineLoadError as e:
                if not e.rebuildable:
                    raise
                # a stale or damaged engine that passed the cache's checks: build it once more
                log.warning("%s", e)
                with _stage(f"export and build of {component}"):
                    path, data = trt_build.load_or_build(models, component, force=True, **build)
                with _stage(f"load of {component}"):
                    engines[component] = make(path).load(data)
            del data
        with _stage("execution context creation"):
            cuda = trt_cuda.CUDA
            cuda.release_cached_memory()  # what the export left cached is the contexts' to use
            stream = cuda.new_stream(self.device)
            # one block for both: they run one after the other on one stream
            self._scratch = cuda.empty((max(e.scratch_bytes for e in engines.values()),), torch.uint8, self.device)
            for e in engines.values():
                e.activate(stream=stream, scratch=self._scratch)
        with _stage("first inference"):
            for e in engines.values():
                e.infer({t.name: 999 if t.name == "timestep" else 0 for t in e.inputs})
                e.save_runtime_cache()
        return engines

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

    def close(self) -> None:
        """Save the runtime caches and release the engines."""
        for e in self.engines.values():
            if isinstance(e, Engine):
                e.close()
        self._scratch = None

    def describe(self) -> str:
        return f"{super().describe()} [{self.flavour_name}, batch {self.batch}, {self.size} px]"


@contextlib.contextmanager
def _stage(name: str):
    """Name the setup stage in any failure: a PromptusError gets it prefixed, anything else becomes a TensorRTError."""
    try:
        yield
    except PromptusError as e:
        if not str(e).startswith("tensorrt backend"):
            e.args = (f"tensorrt backend, {name}: {e}", *e.args[1:])
        raise
    except Exception as e:  # CUDA out of memory, a driver error, a full disk ...: the backend cannot run
        raise TensorRTError(f"tensorrt backend, {name}: {type(e).__name__}: {e}") from e


def _offload(models: "Models") -> None:
    """Move the networks the engines replace to the CPU and give their GPU memory back."""
    models.unet.to("cpu")
    models.taesd.decoder.to("cpu")
    trt_cuda.CUDA.release_cached_memory()
    log.info("moved the PyTorch UNet and TAESD decoder to the CPU: the TensorRT engines replace them")


def try_tensorrt_backend(models: "Models", device: torch.device | str, dtype: torch.dtype, *, batch: int, size: int,
                         engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR,
                         offload_models: bool = False) -> TensorRTBackend | None:
    """The tensorrt backend if every stage of its setup works here, else ``None`` with the reason logged.

    What ``make_backend("auto", ...)`` tries first: TensorRT missing or unusable here is
    logged at INFO (expected on many machines), a stage that fails once TensorRT looked
    usable (export, build, load, context, first inference) at WARNING.
    """
    ok, why = trt_build.tensorrt_status(torch.device(device))
    if not ok:
        log.info("backend auto: not tensorrt (%s)", why)
        return None
    try:
        return TensorRTBackend(models, device, dtype, batch=batch, size=size, engine_dir=engine_dir,
                               offload_models=offload_models)
    except PromptusError as e:
        log.warning("backend auto: tensorrt failed, trying the next backend (%s)", e)
        return None


__all__ = [
    "Engine", "EngineBuildError", "EngineLoadError", "FLAVOURS", "INSTALL_HELP", "PORTABLE", "TensorInfo",
    "TensorRTBackend", "TensorRTError", "TensorRTFlavour", "TensorRTNotInstalledError", "build_engine", "engine_key",
    "find_tensorrt", "get_or_build", "load_or_build", "resolve_compute_capability", "tensorrt_status",
    "try_tensorrt_backend",
]
