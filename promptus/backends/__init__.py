"""Backends that run the denoiser and the TAESD decoder.

``backend_for_clip(header, models, name=...)`` builds one for a clip: its batch is the
clip's :meth:`~promptus.config.CodecConfig.segment_batch` (the interval, capped by the
clip's length and by MAX_BATCH_PIXELS at its frame size) and its size the clip's; the
lower-level ``make_backend(name, models, device, batch=..., size=...)`` takes them as
given (the benchmarks time a chosen batch). The backends are entries of the registry
(:mod:`promptus.backends.registry`), registered at the end of this module:

* ``tensorrt``: TensorRT engines built for this GPU and cached under engines/.
* ``aoti``: the same segment step compiled ahead of time by AOTInductor into a package stored
  under ``engine_dir/aoti/``; a later decode of a weights file starts from the package and the
  weights files alone (no diffusers, no Dynamo): the first frame ~3.5 s after the command starts
  on an H100, against ~18 s for ``compile``.
* ``compile``: ``torch.compile`` of the whole segment step, CUDA-graph replayed on CUDA,
  stored under ``engine_dir/compiled/`` so that later processes load it in seconds.
* ``torch``: PyTorch, fp16 + channels-last + CUDA-graph replay of the segment step on
  CUDA; plain fp32 on the CPU.
* ``eager``: PyTorch without channels-last or graphs (the benchmark's baseline).
* with ``parity="release"`` (name auto or eager): the public release's numerics, see
  :class:`ReleaseParityBackend`.
* ``auto``: the first that works here in the registry's auto order — tensorrt if every
  stage of its setup works (TensorRT and the export packages installed, a driver new
  enough, export, build, load, first inference), else aoti (CUDA, a C++ compiler that makes
  packages that load), else compile (CUDA with Triton), else torch — logging why it passed
  over each.
"""

from __future__ import annotations

import logging

import torch

from ..config import DEFAULT_ENGINE_DIR, PARITIES, PARITY_OURS, PARITY_RELEASE, CodecConfig
from ..errors import PromptusError
from . import engine_cache  # noqa: F401 - registers the TensorRT engines' artifact kind (listed first)
from . import compile_cache  # noqa: F401 - registers the compiled steps' artifact kinds
from .base import Backend
from .registry import (
    AUTO, BASELINE, BackendEntry, auto_order, auto_status, backend_entries, backend_entry, backend_names,
    bench_defaults, quick_backends, register_backend,
)
from .torch_backend import CompileBackend, ReleaseParityBackend, TorchBackend
from . import aoti_backend  # noqa: E402,F401 - registers its artifact kind (promptus engines list/clean see it)

log = logging.getLogger(__name__)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" → CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PromptusError("--device cuda was asked for but this PyTorch sees no CUDA GPU; use --device cpu")
    return dev


def resolve_devices(spec: str | None) -> list[torch.device]:
    """A ``--devices`` value as devices: ``None`` → ``[resolve_device(None)]`` (one, as before);
    ``"all"`` → every CUDA GPU; a comma list such as ``"cuda:0,cuda:1"`` → those, in order.
    A device may repeat (``"cpu,cpu"``: two workers sharing one device, as the tests do)."""
    if spec is None:
        return [resolve_device(None)]
    spec = spec.strip()
    if spec == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise PromptusError("--devices all: this PyTorch sees no CUDA GPU; name devices instead "
                                "(--devices cpu) or leave --devices out")
        return [torch.device("cuda", i) for i in range(n)]
    names = [n.strip() for n in spec.split(",")]
    if not all(names):
        raise PromptusError(f"--devices {spec!r}: an empty name in the list; write e.g. cuda:0,cuda:1 or all")
    out = []
    for name in names:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise PromptusError(f"--devices: {name!r} is no device; write e.g. cpu, cuda:0 or all") from None
        if dev.type not in ("cpu", "cuda"):
            raise PromptusError(f"--devices: {name!r}: only cpu and cuda devices decode here")
        dev = resolve_device(dev)
        if dev.type == "cuda" and dev.index is None:  # "cuda": the current GPU, named so that repeats compare equal
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
            raise PromptusError(f"--devices: {name} does not exist; this machine has "
                                f"{torch.cuda.device_count()} CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        out.append(dev)
    return out


def tensorrt_status(device: torch.device) -> tuple[bool, str]:
    """Whether the TensorRT backend can run on ``device`` here, and why not."""
    try:
        from .tensorrt import tensorrt_status as status
    except ImportError as e:  # the module itself needs nothing optional at import; be safe anyway
        return False, f"the TensorRT backend cannot be imported: {e}"
    return status(device)


def compile_status(device: torch.device) -> tuple[bool, str]:
    """Whether the compile backend is worth choosing automatically on ``device``."""
    if device.type != "cuda":
        return False, "torch.compile is only chosen automatically on CUDA (on the CPU it compiles for minutes)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "Triton is not installed, so inductor cannot compile GPU kernels"
    return True, "CUDA and Triton are available"


def clip_config(clip) -> tuple[CodecConfig, int | None]:
    """(codec settings, frame count or None) of a bitstream Header, a Bitstream or a CodecConfig."""
    header = getattr(clip, "header", clip)  # a Bitstream's header
    if isinstance(header, CodecConfig):
        return header, None
    config = getattr(header, "config", None)
    if not isinstance(config, CodecConfig):
        raise PromptusError(f"backend_for_clip needs a clip's header (or its codec settings), got {type(clip).__name__}")
    return config, header.frame_count


def clip_batch(clip) -> int:
    """The batch a backend is prepared for, for a Header, Bitstream or CodecConfig: one formula,
    :meth:`CodecConfig.segment_batch` (the decoder's batches use the same)."""
    config, frame_count = clip_config(clip)
    return config.segment_batch(frame_count)


def backend_for_clip(clip, models, *, name: str = AUTO, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, engine_dir: str = DEFAULT_ENGINE_DIR,
                     offload_models: bool = False, parity: str = PARITY_OURS) -> Backend:
    """Backend ``name`` over ``models`` prepared for ``clip`` (a bitstream Header or Bitstream, or the
    encoder's CodecConfig): batch :func:`clip_batch`, size the clip's width.

    What every caller that decodes or closes the loop uses, so that the backend's batch and the
    decoder's batches come from the one formula and MAX_BATCH_PIXELS holds. ``device``: None/"auto"
    is resolved (CUDA when available). The models' geometry is checked against the clip before
    anything is sized. See :func:`make_backend` for the other arguments.
    """
    config, _ = clip_config(clip)
    models.geometry().check(config)
    return make_backend(name, models, resolve_device(device), dtype, batch=clip_batch(clip), size=config.width,
                        engine_dir=engine_dir, offload_models=offload_models, parity=parity)


def make_backend(name: str, models, device: torch.device | str, dtype: torch.dtype | None = None, *,
                 batch: int, size: int, engine_dir: str = DEFAULT_ENGINE_DIR,
                 offload_models: bool = False, parity: str = PARITY_OURS) -> Backend:
    """Backend ``name`` over ``models`` (a :class:`promptus.models.Models`) on ``device``, prepared for one clip.

    ``batch`` is the segment batch that CUDA graphs, compiled kernels and engines are
    specialised for, and ``size`` the clip's frame size; :func:`backend_for_clip` takes
    both from the clip's header (use it unless timing a chosen batch).
    ``dtype`` defaults to fp16 on CUDA, fp32 elsewhere. ``auto`` tries the registry's
    auto order (tensorrt, aoti and compile on CUDA, torch), logging why it passes over each; a backend
    chosen by name fails loudly instead. ``offload_models`` (tensorrt only): move the
    PyTorch networks to the CPU once the engines run — for callers that only decode.
    ``parity="release"`` gives the release-parity backend (eager, fp32 weights, one frame
    per call; ``name`` must be auto or eager); load the models in float32 for it.
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    entry = None if name == AUTO else backend_entry(name)
    for what, value in (("batch", batch), ("size", size)):
        if not isinstance(value, int) or value < 1:
            raise PromptusError(f"make_backend needs the clip's {what} (a positive integer from its header), "
                                f"got {value!r}")
    if parity not in PARITIES:
        raise PromptusError(f"unknown parity {parity!r}; choose one of {', '.join(PARITIES)}")
    if parity == PARITY_RELEASE:
        return _release_backend(name, models, device)
    prepared = dict(batch=batch, size=size, engine_dir=engine_dir, offload_models=offload_models)
    if entry is None:
        backend = _auto_backend(models, device, dtype, **prepared)
    else:
        ok, why = entry.available(device)
        if not ok:
            others = [e.name for e in backend_entries() if e.name != name and e.available(device)[0]]
            raise PromptusError(f"the {name} backend cannot run here: {why}; use --backend {' or '.join(others)}")
        backend = entry.factory(models, device, dtype, auto=False, **prepared)
    backend.geometry = models.geometry()
    log.info("backend: %s", backend.describe())
    return backend


def _auto_backend(models, device: torch.device, dtype: torch.dtype, **prepared) -> Backend:
    """The first entry of the auto order that is available and starts; each pass-over is logged."""
    order = auto_order()
    for entry in order:
        ok, why = auto_status(entry, device)
        if not ok:
            log.info("backend auto: not %s (%s)", entry.name, why)
            continue
        if entry is order[-1]:  # auto promises a working backend: the last resort is not caught
            return entry.factory(models, device, dtype, auto=True, **prepared)
        try:
            backend = entry.factory(models, device, dtype, auto=True, **prepared)
        except Exception as e:  # noqa: BLE001 - the next backend may work
            log.warning("backend auto: %s failed, trying the next backend (%s: %s)", entry.name, type(e).__name__, e)
            continue
        if backend is not None:
            return backend
    raise PromptusError("backend auto: no registered backend can run here")


def _release_backend(name: str, models, device: torch.device) -> Backend:
    if name not in (AUTO, BASELINE):
        raise PromptusError(f"parity release runs the release's own frame-by-frame loop in PyTorch; it cannot use "
                            f"the {name} backend: leave the backend on auto (or eager)")
    if models.dtype != torch.float32:
        log.warning("parity release: the models were loaded as %s, not float32; their weights are rounded, so the "
                    "frames will not match the release's (load them with dtype=torch.float32)", models.dtype)
    backend = ReleaseParityBackend(models.unet, models.taesd.decoder, device)
    log.info("backend: %s", backend.describe())
    return backend


# ----------------------------------------------------------------- the built-in backends
# Each factory looks its class up in this module at call time (tests substitute them).


def _tensorrt(models, device, dtype, *, batch, size, engine_dir, offload_models, auto):
    from .tensorrt import TensorRTBackend, try_tensorrt_backend

    make = try_tensorrt_backend if auto else TensorRTBackend  # auto: None (logged) when a stage fails
    return make(models, device, dtype, batch=batch, size=size, engine_dir=engine_dir, offload_models=offload_models)


def _compile(models, device, dtype, *, batch, size, engine_dir, offload_models, auto):
    # The compiled step is stored under engine_dir: a later process on this GPU loads it in
    # seconds (promptus.backends.compile_cache). auto: a failure at the first segment falls
    # back to the uncompiled step.
    return CompileBackend(models.unet, models.taesd.decoder, device, dtype, cuda_graph=device.type == "cuda",
                          batch=batch, engine_dir=engine_dir, fallback=auto)


def _torch(models, device, dtype, *, batch, size, engine_dir, offload_models, auto):
    # Padding short segments to the batch only serves graph replay: on the CPU the
    # frames stay those of the eager backend (the encoder's closed loop).
    cuda = device.type == "cuda"
    return TorchBackend(models.unet, models.taesd.decoder, device, dtype, channels_last=cuda, cuda_graph=cuda,
                        batch=batch if cuda else None)


def _aoti(models, device, dtype, *, batch, size, engine_dir, offload_models, auto):
    from .aoti_backend import AotiBackend

    backend = AotiBackend(models.unet, models.taesd.decoder, device, dtype, batch=batch, engine_dir=engine_dir)
    if auto:
        # auto: the package (for the codec's default timestep, which nearly every clip has) is loaded or built
        # now, so that one which cannot be made passes auto on to the compile backend; a package for another
        # timestep, made at the first segment, falls back to the uncompiled step instead of failing the decode.
        backend.prepare(size)
        backend.fallback = True
    return backend


def _aoti_available(device):
    from .aoti_backend import aoti_problem

    why = aoti_problem(device)
    return why is None, why or "AOTInductor can build and load packages here"


def _aoti_auto(device):
    if torch.device(device).type != "cuda":
        return False, "auto uses AOTInductor on CUDA GPUs (on the CPU its gain does not pay for the build)"
    return _aoti_available(device)


def _eager(models, device, dtype, *, batch, size, engine_dir, offload_models, auto):
    backend = TorchBackend(models.unet, models.taesd.decoder, device, dtype)
    backend.name = BASELINE
    return backend


register_backend(BackendEntry(
    "tensorrt", _tensorrt, available=lambda device: tensorrt_status(device), auto_priority=0, keeps_artifacts=True,
    slow_first_start=True, summary="TensorRT engines built for this GPU and cached under the engine folder"))
register_backend(BackendEntry(
    "aoti", _aoti, available=_aoti_available, auto_priority=1, auto_available=_aoti_auto, keeps_artifacts=True,
    slow_first_start=True,
    summary="the segment step compiled ahead of time by AOTInductor into a stored package; later decodes start "
            "from it and the weights files in seconds, without Dynamo or diffusers"))
register_backend(BackendEntry(
    "compile", _compile, auto_priority=2, auto_available=lambda device: compile_status(device), keeps_artifacts=True,
    summary="torch.compile of the whole segment step, stored under the engine folder"))
register_backend(BackendEntry(
    "torch", _torch, auto_priority=3, bench_cpu=True,
    summary="PyTorch with channels-last and CUDA-graph replay on CUDA"))
register_backend(BackendEntry(
    BASELINE, _eager, bench_cpu=True, summary="plain PyTorch, the baseline every speed is measured against"))

#: The names of the built-in backends with "auto" first, for command-line choices (the registry
#: at import; :func:`backend_names` sees later registrations too).
BACKENDS = backend_names(auto=True)

__all__ = ["AUTO", "BACKENDS", "BASELINE", "Backend", "BackendEntry", "CompileBackend", "ReleaseParityBackend",
           "TorchBackend", "auto_order", "auto_status", "backend_entries", "backend_entry", "backend_for_clip",
           "backend_names", "bench_defaults", "clip_batch", "compile_status", "default_dtype", "make_backend",
           "quick_backends", "register_backend", "resolve_device", "resolve_devices", "tensorrt_status"]
