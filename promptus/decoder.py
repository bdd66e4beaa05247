"""Bitstream → frames (docs/design.md, "The method"), independent of the backend that runs the networks.

Frame 0 is generated alone from the init latent and keyframe 0. Every later
segment k → k+1 is one batch of T frames that share one ``z``, built from the
clean latent of the last frame of the previous batch; frame s of the segment uses
factors interpolated between keyframes k and k+1.

``parity`` chooses the numerics (:data:`promptus.config.PARITIES`): "ours" (the
default: fp16 at the segment batch, rounding to uint8) or "release" (the public
release's generation script: fp32 weights under CUDA autocast, one frame per UNet
call, truncating to uint8), which needs the release-parity backend
(``make_backend(..., parity="release")``).

Before anything is sized, the header is checked against the model (prompt width,
tokens, latent channels and factor). A segment longer than the decoder's batch
(:meth:`CodecConfig.segment_batch`) is generated in several batches that all start
from the same ``z``, and each batch's interpolated prompts are made only when it runs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .backends.base import Backend
from .bitstream import Bitstream, Header, InitLatent, Keyframe
from .config import PARITIES, PARITY_OURS, PARITY_RELEASE, ModelIdentity
from .errors import BitstreamError, PromptusError
from .prompts import embedding, interpolate_factors, release_frame_embedding
from .schedule import OneStep, make_noise, mix_latent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """Frames ``start .. start+len(frames)-1`` of the clip, uint8 N×H×W×3 on the backend's device."""

    start: int
    frames: torch.Tensor

    @property
    def stop(self) -> int:
        return self.start + self.frames.shape[0]


def check_model(header: Header, model: ModelIdentity | None) -> None:
    """Warn loudly when the decoding model is not the one the file was encoded with."""
    if model is None:
        return
    if not any(header.model.digest):
        log.info("the bitstream records no model digest (model %r); decoding with %r", header.model.name, model.name)
        return
    if header.model.digest != model.digest:
        msg = (
            f"MODEL MISMATCH: this file was encoded with model {header.model.name!r} "
            f"(digest {header.model.digest.hex()}) but is being decoded with {model.name!r} "
            f"(digest {model.digest.hex()}). The frames will not be what the encoder saw; "
            "decode with the same weights (--model) to reproduce them."
        )
        log.warning(msg)
        warnings.warn(msg, stacklevel=3)


class ClipState:
    """The decoder's running state for one clip: the noise, z_prev and the last keyframe.

    ``push(keyframe)`` generates the frames that keyframe closes (frame 0 for the
    first, then the segment k → k+1) and advances z_prev. The encoder uses the same
    object for its closed loop, so both sides compute z_prev identically.
    """

    def __init__(self, backend: Backend, header: Header, init: InitLatent, *, max_batch: int | None = None):
        cfg = header.config
        geometry = getattr(backend, "geometry", None)
        if geometry is not None:  # before the noise or anything else is sized from the header
            geometry.check(cfg)
        self.backend, self.header = backend, header
        #: Most frames per backend call (None: a whole segment, as the encoder trains it).
        self.max_batch = max_batch
        self.parity = backend.parity  # the backend runs the networks; this side, the prompt arithmetic
        device = backend.device
        self.noise = make_noise(cfg).to(device)
        self.onestep = OneStep.at(cfg.timestep)
        self.z_prev = init.to_torch().to(device=device, dtype=torch.float32)
        if tuple(self.z_prev.shape) != cfg.latent_shape:
            raise BitstreamError(
                f"init latent has shape {tuple(self.z_prev.shape)}, the header implies {cfg.latent_shape}",
                record="init latent",
            )
        self.prev: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def z(self) -> torch.Tensor:
        """The UNet input (1×4×h×w, float32) shared by every frame of the next batch."""
        return mix_latent(self.z_prev, self.noise, self.header.config.mix)

    def segment_frames(self, keyframe: Keyframe) -> range:
        """Indices of the frames ``keyframe`` closes: frame 0 for the first, then k0+1 .. k0+T."""
        if self.prev is None:
            return range(0, 1)
        k0 = self.prev[2]
        n = min(self.header.config.interval, self.header.frame_count - 1 - k0)
        if n <= 0:
            raise BitstreamError(f"keyframe {keyframe.index} lies past the clip's last frame "
                                 f"{self.header.frame_count - 1}", record=f"keyframe {keyframe.index}")
        return range(k0 + 1, k0 + 1 + n)

    def segment_inputs(self, keyframe: Keyframe, factors: tuple[torch.Tensor, torch.Tensor] | None = None,
                       frames: range | None = None) -> tuple[int, torch.Tensor]:
        """(first frame index, prompts B×77×1024) of the frames ``keyframe`` closes.

        ``factors`` are the keyframe's dequantized (U, V) already on the device, when
        the caller prepared them (the pipelined decoder does, on another thread).
        ``frames``: only these frames of the segment (default: all of them)."""
        cfg, device = self.header.config, self.backend.device
        U1, V1 = factors or (keyframe.U.to(device), keyframe.V.to(device))
        span = self.segment_frames(keyframe) if frames is None else frames
        with self.backend.precision():  # the release computes U·V under CUDA autocast (float16)
            if self.prev is None:
                return 0, embedding(U1, V1).unsqueeze(0)
            U0, V0, k0 = self.prev
            if self.parity == PARITY_RELEASE:
                return span.start, torch.stack([release_frame_embedding(U0, V0, U1, V1, i - k0, cfg.interval)
                                                for i in span])
            # The interpolation weights s/T of just these frames: never the whole interval at once.
            u, v = interpolate_factors(U0, V0, U1, V1, cfg.interval, span.start - k0, len(span))
            return span.start, embedding(u, v)

    def push_batches(self, keyframe: Keyframe, factors: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> Iterator[Segment]:
        """Generate the frames ``keyframe`` closes, at most ``max_batch`` per backend call,
        and advance the state once the last batch is done. Every batch of a segment
        starts from the same ``z``, so the frames do not depend on the batch size."""
        factors = factors or (keyframe.U.to(self.backend.device), keyframe.V.to(self.backend.device))
        span = self.segment_frames(keyframe)
        step = self.max_batch or len(span)
        z_last = None
        for first in range(span.start, span.stop, step):
            start, c = self.segment_inputs(keyframe, factors, range(first, min(first + step, span.stop)))
            z_last, frames = self.backend.segment(self.z_prev, self.noise, self.header.config.mix, c, self.onestep)
            yield Segment(start, frames)
        self.z_prev = z_last
        self.prev = (*factors, keyframe.index)

    def push(self, keyframe: Keyframe, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> Segment:
        """Generate the frames ``keyframe`` closes and advance the state (one Segment)."""
        parts = list(self.push_batches(keyframe, factors))
        if len(parts) == 1:
            return parts[0]
        return Segment(parts[0].start, torch.cat([p.frames for p in parts]))


class Decoder:
    """Regenerates frames from prompts with a backend (see :mod:`promptus.backends`).

    ``stream`` consumes bitstream items as they arrive (header, init latent,
    keyframes) and yields each segment as soon as the keyframe that closes it is
    there; ``decode`` runs a whole :class:`Bitstream`.
    """

    def __init__(self, backend: Backend, model: ModelIdentity | None = None, *, parity: str | None = None,
                 max_batch: int | None = None):
        parity = parity or backend.parity
        if parity not in PARITIES:
            raise PromptusError(f"unknown parity {parity!r}; choose one of {', '.join(PARITIES)}")
        if parity != backend.parity:
            raise PromptusError(
                f"parity {parity!r} needs a backend made for it, but {backend.describe()} decodes with parity "
                f"{backend.parity!r}; build it with make_backend(..., parity={parity!r})")
        self.backend = backend
        self.model = model
        self.parity = parity
        #: Most frames per backend call; None: the clip's :meth:`CodecConfig.segment_batch`.
        self.max_batch = max_batch
        if parity == PARITY_RELEASE:
            log.info("parity release: the public release's numerics (%s)", backend.describe())

    def start(self, header: Header, init: InitLatent) -> ClipState:
        """A fresh clip state (checks the model identity and geometry first)."""
        check_model(header, self.model)
        batch = self.max_batch or header.config.segment_batch(header.frame_count)
        return ClipState(self.backend, header, init, max_batch=batch)

    def session(self) -> "DecodeSession":
        """A fresh :class:`DecodeSession`: feed it the items of one clip in order."""
        return DecodeSession(self)

    def stream(self, items: Iterable[Header | InitLatent | Keyframe]) -> Iterator[Segment]:
        """Segments as the items arrive: each as soon as the keyframe that closes it is there."""
        session = self.session()
        for item in items:
            yield from session.accept(item)

    def decode(self, bitstream: Bitstream) -> Iterator[Segment]:
        """Segments of a whole bitstream, in order."""
        return self.stream([bitstream.header, bitstream.init, *bitstream.keyframes])

    def decode_all(self, bitstream: Bitstream) -> torch.Tensor:
        """Every frame of ``bitstream`` as a CPU uint8 tensor N×H×W×3."""
        return torch.cat([s.frames.cpu() for s in self.decode(bitstream)])


class DecodeSession:
    """The record dispatch of one clip, shared by :class:`Decoder` and the pipelined decoder.

    ``accept(item)`` takes the bitstream's items in order — header, init latent,
    keyframes — and returns an iterator over the :class:`Segment` objects a keyframe closes,
    one per backend batch (empty for the header and init latent); consume it before
    the next item, since the last batch advances the clip state. Items out of order
    raise :class:`BitstreamError`.
    """

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.header: Header | None = None
        self.state: ClipState | None = None

    def accept(self, item: Header | InitLatent | Keyframe,
               factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[Segment]:
        """Take the next item; ``factors``: a keyframe's dequantized (U, V) already on the device."""
        if isinstance(item, Header):
            self.header = item
        elif isinstance(item, InitLatent):
            if self.header is None:
                raise BitstreamError("the init latent came before the header", record="init latent")
            self.state = self.decoder.start(self.header, item)
        elif isinstance(item, Keyframe):
            if self.state is None:
                raise BitstreamError("a keyframe came before the header and init latent",
                                     record=f"keyframe {item.index}")
            return self.state.push_batches(item, factors)  # batches are generated as they are consumed
        else:
            raise PromptusError(f"unexpected bitstream item {type(item).__name__}")
        return iter(())


def decode(source, model: str = "auto", *, device: str | torch.device | None = None,
           backend: str = "auto", taesd: str | None = None, parity: str = PARITY_OURS) -> torch.Tensor:
    """Decode a .promptus file (path, bytes or :class:`Bitstream`) to a CPU uint8 tensor N×H×W×3.

    ``model`` is anything :func:`promptus.models.load_models` accepts ("tiny",
    a checkpoint file, a diffusers folder, a hub id). The backend is prepared for
    the clip: its batch (the interval) and frame size come from the header.
    ``parity="release"`` reproduces the public release's generation script (fp32
    weights; slower: one frame per UNet call).
    """
    from .backends import backend_for_clip, clip_batch, default_dtype, resolve_device
    from .bitstream import from_bytes, read
    from .models import load_models

    if isinstance(source, (bytes, bytearray)):
        bs = from_bytes(bytes(source))
    elif isinstance(source, Bitstream):
        bs = source
    else:
        bs = read(source)
    dev = resolve_device(device)
    dtype = torch.float32 if parity == PARITY_RELEASE else default_dtype(dev)
    models = load_models(model, device=dev, dtype=dtype, taesd=taesd, vae=False)
    identity = models.identity()  # before the backend may move the networks off the GPU
    backend = backend_for_clip(bs.header, models, name=backend, device=dev, offload_models=True, parity=parity)
    return Decoder(backend, identity, parity=parity, max_batch=clip_batch(bs.header)).decode_all(bs)
