"""Settings: the one place where the codec's and the trainer's defaults live.

A :class:`CodecConfig` is everything the decoder needs besides the prompts and the
model weights. It round-trips through the bitstream header and through JSON.
:class:`TrainConfig` holds the inversion trainer's settings, and
:class:`ModelIdentity` names the model weights the prompts were optimised for.
Commands, the sweep and the backends read their defaults from here; the option
choices (init-latent sources, precisions) are the tuples the configs validate with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import PromptusError

#: Name of the only noise generator the codec knows (docs/design.md, "The method").
NOISE_NUMPY_RANDN = "numpy.random.RandomState.randn"


@dataclass(frozen=True)
class CodecConfig:
    """Settings shared by encoder and decoder.

    Attributes:
        width, height: output frame size in pixels (multiples of 8).
        fps: frames per second of the clip.
        rank: rank r of the keyframe prompt factors U (tokens×r) and V (r×dim).
        interval: keyframe interval T; keyframes sit at frames 0, T, 2T, ...
        seed: seed of the shared latent noise.
        noise_generator: name of the generator that draws the noise.
        mix: temporal mix m in ``z = m·z_prev + (1 − m)·ε``.
        quant_bits: bits per quantized factor value.
        tokens, embed_dim: shape of the text embedding (77×1024 for SD-Turbo).
        timestep: the single denoising timestep.
        latent_channels, latent_factor: latent is channels × H/factor × W/factor.
    """

    width: int = 512
    height: int = 512
    fps: float = 30.0
    rank: int = 8
    interval: int = 10
    seed: int = 88
    noise_generator: str = NOISE_NUMPY_RANDN
    mix: float = 0.05
    quant_bits: int = 8
    tokens: int = 77
    embed_dim: int = 1024
    timestep: int = 999
    latent_channels: int = 4
    latent_factor: int = 8

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`PromptusError` if any setting is out of range."""
        f = self.latent_factor
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % f:
                raise PromptusError(
                    f"{name}={v!r}: frame {name} must be a positive multiple of {f} "
                    f"(the latent is {f}× smaller); try {max(f, (int(v) // f) * f) if isinstance(v, (int, float)) and v > 0 else 512}"
                )
        if not (self.fps > 0):
            raise PromptusError(f"fps={self.fps!r}: frames per second must be positive")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise PromptusError(f"rank={self.rank!r}: the prompt rank must be an integer ≥ 1 (8 is the published default)")
        if not isinstance(self.interval, int) or self.interval < 1:
            raise PromptusError(f"interval={self.interval!r}: the keyframe interval must be an integer ≥ 1 (10 is the published default)")
        if not 0.0 <= self.mix <= 1.0:
            raise PromptusError(f"mix={self.mix!r}: the temporal mix must lie in [0, 1] (0.05 is the published value)")
        if self.quant_bits != 8:
            raise PromptusError(f"quant_bits={self.quant_bits!r}: only 8-bit quantization is supported")
        if self.noise_generator != NOISE_NUMPY_RANDN:
            raise PromptusError(
                f"noise generator {self.noise_generator!r} is unknown; this version knows {NOISE_NUMPY_RANDN!r}"
            )
        if not 0 <= self.seed < 2**32:
            raise PromptusError(f"seed={self.seed!r}: the noise seed must lie in [0, 2**32)")
        if not 0 <= self.timestep < 1000:
            raise PromptusError(f"timestep={self.timestep!r} must lie in [0, 1000)")
        for name in ("tokens", "embed_dim", "latent_channels"):
            if getattr(self, name) < 1:
                raise PromptusError(f"{name}={getattr(self, name)!r} must be ≥ 1")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Shape of one latent, ``(1, C, H/8, W/8)``."""
        f = self.latent_factor
        return (1, self.latent_channels, self.height // f, self.width // f)

    def keyframe_count(self, frame_count: int) -> int:
        """Keyframes needed to cover ``frame_count`` frames: 0, T, ..., up to the last frame."""
        if frame_count < 1:
            raise PromptusError(f"a clip needs at least one frame, got {frame_count}")
        return -(-(frame_count - 1) // self.interval) + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CodecConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PromptusError(f"unknown codec settings: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "CodecConfig":
        return dataclasses.replace(self, **changes)


INIT_LATENT_SOURCES = ("vae", "taesd")
INIT_PRECISIONS = ("fp32", "fp16", "int8")

#: Decoder numerics. "ours": fp16 networks at the segment batch, uint8 by rounding (the
#: default: faster, and the closer approximation of the float image). "release": the public
#: release's generation script (fp32 weights under CUDA autocast, one frame per UNet call,
#: uint8 by truncation in fp16), to reproduce its published frames.
PARITY_OURS = "ours"
PARITY_RELEASE = "release"
PARITIES = (PARITY_OURS, PARITY_RELEASE)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the inversion trainer (docs/design.md, "The method"); the published defaults.

    Attributes:
        iters_first, iters: Adam iterations for keyframe 0 and for each later keyframe.
        lr, lr_floor: initial learning rate, halved on plateau down to ``lr_floor``.
        patience_first, patience: iterations without a new best loss before halving.
        mse_weight, perceptual_weight, reg_weight: loss = 0.8·MSE + 0.2·VGG + 0.1·mean|c|.
        worst_weight: weight of the segment's worst frame in the next iteration (the
            published loop trains it three times per iteration).
        perceptual: use the VGG-19 perceptual term (off: lower quality, no VGG weights needed).
        init_latent: "vae" (SD VAE encoder, published) or "taesd" (cheaper substitute).
        init_precision: how the init latent is stored: fp32, fp16 or int8.
        seed: seed of the factors' uniform initialisation (keyframe k uses seed + k).
    """

    iters_first: int = 10_000
    iters: int = 1_500
    lr: float = 0.1
    lr_floor: float = 0.001
    patience_first: int = 300
    patience: int = 20
    mse_weight: float = 0.8
    perceptual_weight: float = 0.2
    reg_weight: float = 0.1
    worst_weight: float = 3.0
    perceptual: bool = True
    init_latent: str = "vae"
    init_precision: str = "fp16"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iters_first", "iters", "patience_first", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PromptusError(f"{name}={v!r} must be an integer ≥ 1")
        if not (0 < self.lr_floor <= self.lr):
            raise PromptusError(f"learning rates must satisfy 0 < lr_floor ≤ lr, got lr={self.lr}, lr_floor={self.lr_floor}")
        if self.init_latent not in INIT_LATENT_SOURCES:
            raise PromptusError(f"init_latent={self.init_latent!r}: choose {' or '.join(INIT_LATENT_SOURCES)}")
        if self.init_precision not in INIT_PRECISIONS:
            raise PromptusError(f"init_precision={self.init_precision!r}: choose one of {', '.join(INIT_PRECISIONS)}")
        if self.worst_weight < 1:
            raise PromptusError(f"worst_weight={self.worst_weight!r} must be ≥ 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


#: Bytes of a model digest (:class:`ModelIdentity`; the bitstream header stores it as is).
MODEL_DIGEST_SIZE = 16
#: Longest model name, in UTF-8 bytes (the header stores its length as a u16).
MODEL_NAME_MAX_BYTES = 0xFFFF


@dataclass(frozen=True)
class ModelIdentity:
    """Which model weights the prompts were optimised for: a name and a 16-byte digest."""

    name: str
    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise PromptusError(f"model name must be a string, got {type(self.name).__name__}")
        try:
            n = len(self.name.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise PromptusError(f"model name {self.name!r} is not valid text: {e}") from None
        if n > MODEL_NAME_MAX_BYTES:
            raise PromptusError(f"model name is {n} bytes long; the format stores at most {MODEL_NAME_MAX_BYTES}")
        if not isinstance(self.digest, bytes) or len(self.digest) != MODEL_DIGEST_SIZE:
            raise PromptusError(f"model digest must be {MODEL_DIGEST_SIZE} bytes, got {self.digest!r:.60}")

    @classmethod
    def unknown(cls) -> "ModelIdentity":
        """Name "unknown" and an all-zero digest: decoders will not check the model."""
        return cls("unknown", bytes(MODEL_DIGEST_SIZE))

    @property
    def hexdigest(self) -> str:
        return self.digest.hex()
