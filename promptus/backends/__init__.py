"""Backends that run the denoiser and the TAESD decoder.

``make_backend(name, models, device, batch=..., size=...)`` builds one for a clip
(batch = the clip's keyframe interval, size = its frame size, from the header):

* ``torch``: PyTorch, fp16 + channels-last + CUDA-graph replay of the segment step on
  CUDA; plain fp32 on the CPU.
* ``eager``: PyTorch without channels-last or graphs (the benchmark's baseline).
* ``compile``: ``torch.compile`` of the whole segment step, CUDA-graph replayed on CUDA,
  stored under ``engine_dir/compiled/`` so that later processes load it in seconds.
* ``tensorrt``: TensorRT engines built for this GPU and cached under engines/.
* with ``parity="release"`` (name auto or eager): the public release's numerics, see
  :class:`ReleaseParityBackend`.
* ``auto``: the first that works here — tensorrt if every stage of its setup works
  (TensorRT and the export packages installed, a driver new enough, export, build,
  load, first inference), else compile (CUDA with Triton), else torch — logging why it
  passed over each.
"""

from __future__ import annotations

import logging

import torch

from ..config import PARITIES, PARITY_OURS, PARITY_RELEASE
from ..errors import PromptusError
from .base import Backend
from .engine_cache import DEFAULT_ENGINE_DIR
from .torch_backend import CompileBackend, ReleaseParityBackend, TorchBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "compile", "torch", "eager")


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


def make_backend(name: str, models, device: torch.device | str, dtype: torch.dtype | None = None, *,
                 batch: int, size: int, engine_dir: str = DEFAULT_ENGINE_DIR,
                 offload_models: bool = False, parity: str = PARITY_OURS) -> Backend:
    """Backend ``name`` over ``models`` (a :class:`promptus.models.Models`) on ``device``, prepared for one clip.

    ``batch`` is the segment batch — the clip's keyframe interval — that CUDA graphs,
    compiled kernels and engines are specialised for, and ``size`` the clip's frame
    size; both come from the bitstream header (or the encoder's codec settings).
    ``dtype`` defaults to fp16 on CUDA, fp32 elsewhere. ``auto`` tries tensorrt, then
    compile, then torch, logging why it passes over each; ``tensorrt`` chosen by name
    fails loudly instead. ``offload_models`` (tensorrt only): move the PyTorch networks
    to the CPU once the engines run — for callers that only decode.
    ``parity="release"`` gives the release-parity backend (eager, fp32 weights, one frame
    per call; ``name`` must be auto or eager); load the models in float32 for it.
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if name not in BACKENDS:
        raise PromptusError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    for what, value in (("batch", batch), ("size", size)):
        if not isinstance(value, int) or value < 1:
            raise PromptusError(f"make_backend needs the clip's {what} (a positive integer from its header), "
                                f"got {value!r}")
    if parity not in PARITIES:
        raise PromptusError(f"unknown parity {parity!r}; choose one of {', '.join(PARITIES)}")
    if parity == PARITY_RELEASE:
        return _release_backend(name, models, device)
    cuda = device.type == "cuda"
    if name == "auto":
        backend = _auto_backend(models, device, dtype, batch=batch, size=size, engine_dir=engine_dir,
                                offload_models=offload_models)
    elif name == "tensorrt":
        ok, why = tensorrt_status(device)
        if not ok:
            raise PromptusError(f"the tensorrt backend cannot run here: {why}; use --backend compile or torch")
        from .tensorrt import TensorRTBackend

        backend = TensorRTBackend(models, device, dtype, batch=batch, size=size, engine_dir=engine_dir,
                                  offload_models=offload_models)
    elif name == "compile":
        # The compiled step is stored under engine_dir: a later process on this GPU loads it in
        # seconds (promptus.backends.compile_cache).
        backend = CompileBackend(models.unet, models.taesd.decoder, device, dtype, cuda_graph=cuda, batch=batch,
                                 engine_dir=engine_dir)
    elif name == "torch":
        # Padding short segments to the batch only serves graph replay: on the CPU the
        # frames stay those of the eager backend (the encoder's closed loop).
        backend = TorchBackend(models.unet, models.taesd.decoder, device, dtype, channels_last=cuda,
                               cuda_graph=cuda, batch=batch if cuda else None)
    else:  # eager
        backend = TorchBackend(models.unet, models.taesd.decoder, device, dtype)
        backend.name = "eager"
    backend.geometry = models.geometry()
    log.info("backend: %s", backend.describe())
    return backend


def _auto_backend(models, device: torch.device, dtype: torch.dtype, *, batch, size, engine_dir,
                  offload_models: bool) -> Backend:
    """tensorrt if every stage of its setup works, else compile, else torch; each pass-over is logged."""
    from .tensorrt import try_tensorrt_backend

    backend = try_tensorrt_backend(models, device, dtype, batch=batch, size=size, engine_dir=engine_dir,
                                   offload_models=offload_models)
    if backend is not None:
        return backend
    cuda = device.type == "cuda"
    ok, why = compile_status(device)
    if ok:
        try:
            # compiling happens at the first segment; a failure there falls back to the uncompiled step
            return CompileBackend(models.unet, models.taesd.decoder, device, dtype, cuda_graph=cuda, batch=batch,
                                  engine_dir=engine_dir, fallback=True)
        except Exception as e:  # auto promises a working backend: torch is the last resort
            log.warning("backend auto: compile failed, using torch (%s: %s)", type(e).__name__, e)
    else:
        log.info("backend auto: not compile (%s)", why)
    return TorchBackend(models.unet, models.taesd.decoder, device, dtype, channels_last=cuda, cuda_graph=cuda,
                        batch=batch if cuda else None)  # as make_backend("torch"): eager frames on the CPU


def _release_backend(name: str, models, device: torch.device) -> Backend:
    if name not in ("auto", "eager"):
        raise PromptusError(f"parity release runs the release's own frame-by-frame loop in PyTorch; it cannot use "
                            f"the {name} backend: leave the backend on auto (or eager)")
    if models.dtype != torch.float32:
        log.warning("parity release: the models were loaded as %s, not float32; their weights are rounded, so the "
                    "frames will not match the release's (load them with dtype=torch.float32)", models.dtype)
    backend = ReleaseParityBackend(models.unet, models.taesd.decoder, device)
    log.info("backend: %s", backend.describe())
    return backend


__all__ = ["Backend", "TorchBackend", "CompileBackend", "ReleaseParityBackend", "BACKENDS", "make_backend",
           "default_dtype", "resolve_device", "resolve_devices", "tensorrt_status", "compile_status"]
