"""Low-rank keyframe prompts, their 8-bit quantizer, interpolation and rate.

A keyframe prompt is a pair U (tokens×r), V (r×dim); its embedding is
``c = U·V / sqrt(r)``. Factors travel quantized per tensor, asymmetric, 8 bits
(docs/design.md, "The method"). Frames between keyframes use linearly interpolated *factors*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import CodecConfig
from .errors import PromptusError

QMAX = 255  # 8-bit codes 0..255
#: Largest usable scale: scale·(q − zero point) must stay a finite float32 for every code.
MAX_SCALE = float(np.finfo(np.float32).max) / QMAX


# ---------------------------------------------------------------- quantizer


@dataclass(frozen=True)
class QuantizedTensor:
    """An 8-bit code tensor with its float32 scale and integer zero point.

    ``dequantize()`` is ``scale · (q − zero_point)`` in float32, the same
    arithmetic as the public release, so imported legacy prompts stay bit-exact.
    """

    q: np.ndarray  # uint8
    scale: float  # a float32 value
    zero_point: int  # 0..255

    def __post_init__(self) -> None:
        if not isinstance(self.q, np.ndarray) or self.q.dtype != np.uint8:
            raise PromptusError(f"quantized codes must be a uint8 array, got {getattr(self.q, 'dtype', type(self.q))}")
        check_quant_params(self.scale, self.zero_point)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self) -> np.ndarray:
        """float32 values ``scale · (q − zero_point)``."""
        return np.float32(self.scale) * (self.q.astype(np.float32) - np.float32(self.zero_point))

    def to_torch(self) -> torch.Tensor:
        return torch.from_numpy(self.dequantize())


def check_quant_params(scale, zero_point) -> None:
    """Raise PromptusError unless ``scale`` (as float32) lies in (0, MAX_SCALE] and
    ``zero_point`` is an integer in 0..255: then every code dequantizes to a finite float32."""
    try:
        zp_ok = float(zero_point).is_integer() and 0 <= float(zero_point) <= QMAX
    except (TypeError, ValueError, OverflowError):
        zp_ok = False
    if not zp_ok:
        raise PromptusError(f"zero point {zero_point!r} must be an integer in 0..{QMAX}")
    try:
        with np.errstate(over="ignore"):
            s = float(np.float32(scale))
    except (TypeError, ValueError, OverflowError):
        s = math.nan
    if not 0 < s <= MAX_SCALE:
        raise PromptusError(f"quantizer scale {scale!r} must be positive and at most {MAX_SCALE:.4g}, so that "
                            "scale·(q − zero point) stays a finite float32")


def quant_params(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point for a tensor whose values lie in [lo, hi].

    The range always includes 0 (``lo = min(0, lo)``, ``hi = max(0, hi)``);
    ``scale = (hi − lo)/255`` in float32 and
    ``zero_point = round(clamp(255 − hi/scale, 0, 255))``. An all-zero range gets
    scale 1 so that zeros stay exact zeros.
    """
    lo32, hi32 = np.float32(min(0.0, float(lo))), np.float32(max(0.0, float(hi)))
    if not (np.isfinite(lo32) and np.isfinite(hi32)):
        raise PromptusError(f"cannot quantize a tensor with non-finite range [{lo}, {hi}] (did training diverge?)")
    scale = np.float32((hi32 - lo32) / np.float32(QMAX))
    if scale == 0 or not np.isfinite(scale):
        return 1.0, 0
    zp = np.round(np.clip(np.float32(QMAX) - hi32 / scale, 0, QMAX))
    return float(scale), int(zp)


def quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Codes ``clamp(round(x/scale + zero_point), 0, 255)`` as uint8 (float32 arithmetic)."""
    q = torch.round(x.float() / torch.tensor(scale, dtype=torch.float32) + float(zero_point))
    return q.clamp(0, QMAX).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """float32 ``scale · (q − zero_point)``."""
    s = torch.tensor(scale, dtype=torch.float32, device=q.device)
    return s * (q.float() - float(zero_point))


def quantize_tensor(x: torch.Tensor, lo: float | None = None, hi: float | None = None) -> QuantizedTensor:
    """Quantize ``x`` with the range [lo, hi] (default: its own extremes)."""
    xf = x.detach().float().cpu()
    if not torch.isfinite(xf).all():
        raise PromptusError("cannot quantize a tensor holding NaN or inf (did training diverge?)")
    lo = float(xf.min()) if lo is None else lo
    hi = float(xf.max()) if hi is None else hi
    scale, zp = quant_params(lo, hi)
    return QuantizedTensor(quantize(xf, scale, zp).numpy(), scale, zp)


class RunningRange:
    """Running extremes of a tensor over an optimisation, always containing 0."""

    def __init__(self) -> None:
        self.lo = 0.0
        self.hi = 0.0

    def update(self, x: torch.Tensor) -> None:
        xd = x.detach()
        self.include(float(xd.min()), float(xd.max()))

    def include(self, lo: float, hi: float) -> None:
        """Widen the range to cover ``lo`` and ``hi`` (a tensor's extremes, already on the host)."""
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)

    def params(self) -> tuple[float, int]:
        return quant_params(self.lo, self.hi)

    def state_dict(self) -> dict[str, float]:
        return {"lo": self.lo, "hi": self.hi}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.lo, self.hi = float(d["lo"]), float(d["hi"])


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Quantize-dequantize in the forward pass, identity gradient (straight-through)."""
    xq = dequantize(quantize(x.detach(), scale, zero_point), scale, zero_point).to(x.dtype)
    return x + (xq - x).detach()


# ----------------------------------------------------------- prompt algebra


def embedding(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``c = U·V / sqrt(r)``; works on single (tokens×r) or batched (B×tokens×r) factors."""
    r = U.shape[-1]
    if V.shape[-2] != r:
        raise PromptusError(f"prompt factors disagree on rank: U has {r} columns, V has {V.shape[-2]} rows")
    return (U @ V) / math.sqrt(r)


def interpolation_weights(interval: int, device=None, dtype=torch.float32, first: int = 1,
                          count: int | None = None) -> torch.Tensor:
    """Weights s/T of keyframe k+1 for the frames s = first .. first+count−1 of a segment
    (default: s = 1..T)."""
    count = interval - first + 1 if count is None else count
    if not (1 <= first and count >= 0 and first + count - 1 <= interval):
        raise PromptusError(f"frames {first}..{first + count - 1} are not within a segment of {interval} frames")
    return torch.arange(first, first + count, device=device, dtype=torch.float64).div(interval).to(dtype)


def interpolate_factors(U0: torch.Tensor, V0: torch.Tensor, U1: torch.Tensor, V1: torch.Tensor,
                        interval: int, first: int = 1, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of frames s = first .. first+count−1 (default: all T) of segment k → k+1,
    stacked: (count×tokens×r, count×r×dim).

    Frame s uses ``u = (1 − s/T)·U_k + (s/T)·U_{k+1}`` and likewise v; s = T gives
    keyframe k+1 exactly. Only the asked frames are computed.
    """
    w = interpolation_weights(interval, U0.device, U0.dtype, first, count).view(-1, 1, 1)
    u = (1 - w) * U0 + w * U1
    v = (1 - w) * V0 + w * V1
    return u, v


def release_frame_embedding(U0: torch.Tensor, V0: torch.Tensor, U1: torch.Tensor, V1: torch.Tensor,
                            step: int, interval: int) -> torch.Tensor:
    """Embedding (tokens×dim) of frame ``step`` (1..T) of a segment, as the public release computes it.

    The weights are Python floats ``1 − step·(1/T)`` and ``step·(1/T)``, rounded to
    float32 only when they multiply the factors; :func:`interpolate_factors` rounds s/T
    first and subtracts in float32, so ``1 − w`` can differ in the last bit (T = 10:
    frames 6, 8, 9). Called under CUDA autocast, ``U·V`` runs in float16 as in the release.
    """
    factor = 1 / interval
    u = (1 - step * factor) * U0 + (step * factor) * U1
    v = (1 - step * factor) * V0 + (step * factor) * V1
    return embedding(u, v)


# -------------------------------------------------------------------- rate

#: Bytes of side information per quantized tensor: float32 scale + uint8 zero point.
QUANT_SIDE_BYTES = 5


def kbps(nbytes: int | float, seconds: float) -> float:
    """The one definition of a bitrate in promptus: ``8 · nbytes / seconds / 1000`` kbit/s (1 kbit = 1000 bit).

    ``seconds`` is the clip's duration, frame count / fps. Every rate that info, encode,
    sweep and the baselines print goes through here.
    """
    return 8 * nbytes / seconds / 1000


def keyframe_factor_bits(config: CodecConfig) -> int:
    """Bits of quantized factor codes in one keyframe: ``bits · r · (tokens + dim)``."""
    return config.quant_bits * config.rank * (config.tokens + config.embed_dim)


def keyframes_per_second(config: CodecConfig) -> float:
    return config.fps / config.interval


def factor_kbps(config: CodecConfig) -> float:
    """Bitrate of the factor codes alone, in kbit/s (1 kbit = 1000 bits)."""
    return keyframe_factor_bits(config) * keyframes_per_second(config) / 1000.0


def init_latent_bytes(config: CodecConfig, precision: str) -> int:
    """Payload bytes of the init latent at ``precision`` (fp32, fp16 or int8)."""
    n = math.prod(config.latent_shape)
    if precision == "fp32":
        return 4 * n
    if precision == "fp16":
        return 2 * n
    if precision == "int8":
        return n + QUANT_SIDE_BYTES * config.latent_channels  # per-channel scale and zero point
    raise PromptusError(f"unknown init-latent precision {precision!r}; choose fp32, fp16 or int8")


@dataclass(frozen=True)
class RateEstimate:
    """Predicted bitrate of a clip before any entropy coding."""

    frame_count: int
    keyframes: int
    factor_bytes: int
    side_bytes: int
    init_bytes: int
    duration_s: float

    @property
    def factor_kbps(self) -> float:
        return kbps(self.factor_bytes, self.duration_s)

    @property
    def total_kbps(self) -> float:
        return kbps(self.factor_bytes + self.side_bytes + self.init_bytes, self.duration_s)


def estimate_rate(config: CodecConfig, frame_count: int, init_precision: str = "fp16") -> RateEstimate:
    """Bytes and kbps of a clip's factors, quantizer side info and init latent.

    Container framing (headers, record lengths, checksums) is not included; the
    bitstream's own ``info`` counts every byte of a real file.
    """
    k = config.keyframe_count(frame_count)
    return RateEstimate(
        frame_count=frame_count,
        keyframes=k,
        factor_bytes=k * keyframe_factor_bits(config) // 8,
        side_bytes=k * 2 * QUANT_SIDE_BYTES,
        init_bytes=init_latent_bytes(config, init_precision),
        duration_s=frame_count / config.fps,
    )
