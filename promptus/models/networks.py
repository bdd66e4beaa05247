"""The networks the codec runs, as one bundle: :class:`Models`, its geometry and its digest.

The codec needs three frozen networks (docs/design.md, "The method"):

* the SD-Turbo UNet, which predicts the noise ε̂ from ``z``, timestep 999 and a prompt;
* the TAESD decoder, which turns the clean latent into an image in [-1, 1];
* an encoder for the *init latent* of frame 0: the SD VAE encoder (exact) or the
  TAESD encoder (cheaper, same latent space).

Where they come from is :mod:`promptus.models.loading` (real weights) and
:mod:`promptus.models.random_weights` (random weights built in code, for tests and timing).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import ModelIdentity
from ..errors import PromptusError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel


_DIFFUSERS_LOCK = threading.Lock()
#: The diffusers classes the codec uses; :func:`diffusers_classes` resolves them all under one lock.
DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderTiny", "UNet2DConditionModel")


def diffusers_classes(*names: str) -> tuple:
    """diffusers' model classes by name, safe to call from any thread.

    diffusers exports its classes through a lazy module that is not thread-safe: two
    threads asking for a class for the first time at once can make one of them fail with
    ``ImportError: cannot import name 'AutoencoderTiny' from 'diffusers'`` (seen on a GPU
    host whose fresh diffusers had no bytecode yet, when the decoder's preload thread and the
    weights loader imported together). Every class of :data:`DIFFUSERS_CLASSES` is resolved
    here once, under a lock; later lookups are plain attribute reads.
    """
    with _DIFFUSERS_LOCK:
        import diffusers

        for name in DIFFUSERS_CLASSES + tuple(n for n in names if n not in DIFFUSERS_CLASSES):
            getattr(diffusers, name)
    return tuple(getattr(diffusers, n) for n in names)


# ---------------------------------------------------------------------------------
# Shipped configurations
# ---------------------------------------------------------------------------------


def _shipped_config(filename: str) -> dict[str, Any]:
    """Read a JSON config shipped in ``promptus/configs``, without private ``_`` keys."""
    text = resources.files("promptus").joinpath("configs").joinpath(filename).read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def sd_turbo_unet_config() -> dict[str, Any]:
    """The SD-Turbo UNet config (SD 2.1-base architecture, ~866M parameters), as a fresh dict."""
    return _shipped_config("sd_turbo_unet.json")


def taesd_config() -> dict[str, Any]:
    """The TAESD (``madebyollin/taesd``) AutoencoderTiny config, as a fresh dict."""
    return _shipped_config("taesd.json")


def sd_vae_config() -> dict[str, Any]:
    """The SD 2.x VAE (AutoencoderKL) config, as a fresh dict."""
    return _shipped_config("sd_vae.json")


# ---------------------------------------------------------------------------------
# The bundle of models
# ---------------------------------------------------------------------------------


@dataclass
class Models:
    """The frozen networks the codec runs, plus a name saying where they came from.

    Attributes:
        unet: the SD-Turbo UNet (ε-prediction), called as ``unet(z, t, encoder_hidden_states=c)``.
        taesd: TAESD; the codec decodes with ``taesd.decoder`` (latent → image in [-1, 1]).
        vae: the SD VAE, needed only for its encoder (init latent); may be ``None``.
        name: ``"sd-turbo"`` (the standard file, folder or hub id), ``"tiny"``,
            ``"sd-turbo-random"``, or else the file/folder name or hub id loaded. Informative
            only: the bitstream identifies weights by :func:`model_digest`.

    All components are in eval mode with ``requires_grad=False``; gradients still
    flow through them to their inputs (the prompts).
    """

    unet: "UNet2DConditionModel"
    taesd: "AutoencoderTiny"
    vae: "AutoencoderKL | None"
    name: str
    _digest: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        """Device of the UNet's weights."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the UNet's weights."""
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Models":
        """Move every component (UNet, TAESD, VAE) to ``device`` and/or ``dtype``; returns ``self``."""
        for module in self._components():
            # plain nn.Module.to: diffusers' override warns about fp32-kept modules on every dtype cast
            torch.nn.Module.to(module, device=device, dtype=dtype)
        self._digest = None
        return self

    def identity(self) -> ModelIdentity:
        """This model's identity for the bitstream header: ``ModelIdentity(name, digest)``.

        The digest (see :func:`model_digest`) is computed once and cached until :meth:`to`.
        """
        if self._digest is None:
            self._digest = model_digest(self)
        return ModelIdentity(name=self.name, digest=self._digest)

    @torch.no_grad()
    def encode_init_latent(self, frame: torch.Tensor, which: str = "vae") -> torch.Tensor:
        """Encode frame(s) ``B×3×H×W`` in [-1, 1] into the init latent ``B×4×H/8×W/8``.

        ``which="vae"``: the SD VAE encoder's posterior mean times its scaling factor
        (0.18215) — the exact init latent of the method (docs/design.md). ``which="taesd"``:
        the TAESD encoder, which produces the same (already scaled) latent space more cheaply. The frame is
        moved to the encoder's device and dtype; the latent is returned there.
        """
        if not isinstance(frame, torch.Tensor) or frame.ndim != 4 or frame.shape[1] != 3:
            shape = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
            raise PromptusError(f"init latent: expected a B×3×H×W frame tensor in [-1, 1], got {shape}")
        if frame.shape[2] % 8 or frame.shape[3] % 8:
            raise PromptusError(
                f"init latent: frame size {frame.shape[3]}×{frame.shape[2]} must be a multiple of 8 "
                "(the latent is 8× smaller); crop or resize the frame first"
            )
        if which == "vae":
            if self.vae is None:
                raise PromptusError(
                    "init latent: the SD VAE encoder was not loaded (models.vae is None); "
                    "load the models with vae=True from weights that include the VAE, "
                    "or use which='taesd' for the cheaper TAESD encoder"
                )
            p = next(self.vae.parameters())
            posterior = self.vae.encode(frame.to(device=p.device, dtype=p.dtype)).latent_dist
            return posterior.mean * self.vae.config.scaling_factor
        if which == "taesd":
            p = next(self.taesd.encoder.parameters())
            # diffusers' EncoderTiny maps [-1, 1] to TAESD's [0, 1] itself (skipped only
            # under gradient checkpointing with grad enabled; no_grad keeps us clear of it)
            # and TAESD latents are already scaled (scaling_factor 1.0).
            return self.taesd.encoder(frame.to(device=p.device, dtype=p.dtype))
        raise PromptusError(f"init latent: which={which!r} is unknown; use 'vae' or 'taesd'")

    def geometry(self) -> ModelGeometry:
        """The prompt and latent shapes these networks accept (read from their configs)."""
        unet, taesd = self.unet.config, self.taesd.config
        factor = int(taesd.get("upsampling_scaling_factor", 2)) ** (len(taesd["num_decoder_blocks"]) - 1)
        if unet.in_channels != taesd.latent_channels:
            raise PromptusError(f"the UNet takes {unet.in_channels}-channel latents but TAESD makes "
                                f"{taesd.latent_channels}; these weights do not belong together")
        return ModelGeometry(embed_dim=int(unet.cross_attention_dim), latent_channels=int(unet.in_channels),
                             latent_factor=factor)

    def _components(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.taesd, self.vae) if m is not None]


#: Prompts of the SD family are at most 77 tokens long (CLIP's context).
SD_MAX_TOKENS = 77


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes a model accepts: what a bitstream header must agree with before decoding.

    Attributes:
        embed_dim: width of one prompt token (the UNet's cross-attention width).
        latent_channels: channels of the latent (UNet input and TAESD decoder input).
        latent_factor: frame side / latent side (TAESD's upsampling).
        max_tokens: most prompt tokens the model was trained with.
    """

    embed_dim: int
    latent_channels: int
    latent_factor: int
    max_tokens: int = SD_MAX_TOKENS

    def check(self, config) -> None:
        """Raise PromptusError unless ``config`` (a CodecConfig) fits this model."""
        problems = []
        if config.embed_dim != self.embed_dim:
            problems.append(f"prompts of width {config.embed_dim} (the model takes {self.embed_dim})")
        if config.tokens > self.max_tokens:
            problems.append(f"{config.tokens} prompt tokens (the model takes at most {self.max_tokens})")
        if config.latent_channels != self.latent_channels:
            problems.append(f"{config.latent_channels} latent channels (the model has {self.latent_channels})")
        if config.latent_factor != self.latent_factor:
            problems.append(f"a latent {config.latent_factor}× smaller than the frame (the model's is "
                            f"{self.latent_factor}× smaller)")
        if problems:
            raise PromptusError("the clip does not fit this model: it asks for " + "; ".join(problems)
                                + ". Decode it with the model it was encoded for (--model).")


def _freeze(*modules: torch.nn.Module | None) -> None:
    for m in modules:
        if m is not None:
            m.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------
# Digest
# ---------------------------------------------------------------------------------


def model_digest(models: Models) -> bytes:
    """16-byte fingerprint of the weights that decoding depends on (UNet and TAESD decoder).

    SHA-256 over, per component (``unet``, ``taesd.decoder``) and per state-dict entry in
    sorted-name order: the name, the shape, and the raw bytes of the tensor in a
    canonical precision (floating point → float16, contiguous, CPU, little-endian),
    truncated to 16 bytes. Float16 is the canonical form so that the same weights held
    in float32 (encoder) or float16 (GPU decoder) give the same digest: fp32→fp16
    rounding is the same on every device, and a float16 copy rounds to itself. (bfloat16
    copies differ.) Tensors are streamed one at a time; ~2 s for SD-Turbo on a CPU.
    """
    h = hashlib.sha256(b"promptus-model-digest-v1\n")
    for component, module in (("unet", models.unet), ("taesd.decoder", models.taesd.decoder)):
        _hash_module(h, component, module)
    return h.digest()[:16]


def _hash_module(h: "hashlib._Hash", component: str, module: torch.nn.Module) -> None:
    state = module.state_dict()
    h.update(f"component {component} {len(state)}\n".encode())
    for name in sorted(state):
        t = state[name].detach()
        if t.is_meta:
            raise PromptusError(f"cannot fingerprint {component}.{name}: its weights are not loaded (meta tensor)")
        if t.is_floating_point():
            t = t.to(torch.float16)
        t = t.contiguous().cpu().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(state[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy().astype(np.uint8))
