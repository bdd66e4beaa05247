"""Backends that run the denoiser and the TAESD decoder.

``make_backend(name, models, device)`` builds one; ``auto`` takes the fastest that
works here and logs which.
"""

from __future__ import annotations

import logging

import torch

from ..errors import PromptusError
from .base import Backend
from .torch_backend import TorchBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch")


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


def make_backend(name: str, models, device: torch.device | str, dtype: torch.dtype | None = None) -> Backend:
    """Backend ``name`` over ``models`` (a :class:`promptus.models.Models`) on ``device``."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if name not in BACKENDS:
        raise PromptusError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    backend = TorchBackend(models.unet, models.taesd.decoder, device, dtype)
    if name == "auto":
        log.info("backend auto: using %s", backend.describe())
    return backend


__all__ = ["Backend", "TorchBackend", "BACKENDS", "make_backend", "default_dtype", "resolve_device"]
