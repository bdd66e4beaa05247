"""The ``tensorrt`` backend: the UNet and the TAESD decoder as TensorRT engines.

The pieces, in the manner of NVIDIA's demo/Diffusion: :mod:`promptus.backends.onnx_export`
describes and exports each component, :mod:`promptus.backends.trt_build` finds TensorRT
and builds engines into :mod:`promptus.backends.engine_cache`, and
:mod:`promptus.backends.trt_runtime` runs them. This module joins them into a
:class:`~promptus.backends.base.Backend` and re-exports the names callers use.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..errors import PromptusError
from .base import Backend
from .engine_cache import DEFAULT_ENGINE_DIR
from .onnx_export import COMPONENTS, precision_name, validate_shape
from .trt_build import (
    FLAVOURS, INSTALL_HELP, PORTABLE, EngineBuildError, EngineLoadError, TensorRTError, TensorRTFlavour,
    TensorRTNotInstalledError, build_engine, engine_key, find_tensorrt, get_or_build, resolve_compute_capability,
    tensorrt_status,
)
from .trt_runtime import Engine, TensorInfo

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..models import Models

log = logging.getLogger(__name__)


class TensorRTBackend(Backend):
    """Runs the UNet and the TAESD decoder as TensorRT engines of a fixed batch and size.

    Engines come from :func:`get_or_build` (built on first use, then cached in
    ``engine_dir``). :meth:`denoise` and :meth:`decode` take any number of frames: fewer
    than the engine's batch are padded (the spare rows hold stale data, and rows never
    mix), more are run in engine-sized chunks. Inputs are cast to the engine's precision
    at the boundary; results come back as fresh float32 tensors on the device.
    ``engines`` (``{"unet": ..., "taesd_decoder": ...}``, objects with ``infer``) skips
    building, for callers that manage engines themselves. ``batch`` (the clip's keyframe
    interval) and ``size`` (its frame size) come from the caller: the clip's header.
    """

    name = "tensorrt"

    def __init__(self, models: "Models", device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16, *,
                 batch: int, size: int, engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR,
                 flavour: str = "auto", compute_capability: str = "auto", cuda_graph: bool = True,
                 engines: Mapping[str, Any] | None = None):
        super().__init__(torch.device(device), dtype)
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


__all__ = [
    "Engine", "EngineBuildError", "EngineLoadError", "FLAVOURS", "INSTALL_HELP", "PORTABLE", "TensorInfo",
    "TensorRTBackend", "TensorRTError", "TensorRTFlavour", "TensorRTNotInstalledError", "build_engine", "engine_key",
    "find_tensorrt", "get_or_build", "resolve_compute_capability", "tensorrt_status",
]
