"""The objects of a .promptus file and their records: Header, InitLatent, Keyframe,
Bitstream, each record's payload packed and unpacked, and :func:`to_bytes`.

The byte layout is specified in docs/format.md; its constants live in
:mod:`promptus.bitstream.spec`.
"""

from __future__ import annotations

import hashlib
import math
import operator
import zlib
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from ..config import MAX_FRAME_COUNT, CodecConfig, ModelIdentity
from ..errors import PromptusError
from ..prompts import QuantizedTensor, check_quant_params, quant_params, quantize
from .entropy import CODERS, EntropyContext, decompress_codes, entropy_code, new_context
from .spec import (
    CHANNEL_QUANT, CRC, DIGEST_SIZE, END, FRAME, HEAD, HEAD_A, HEAD_B, INIT, KEYF, KEYF_FIXED, KIND, MAGIC,
    MAX_KEYFRAME_CODE_BYTES, PRECISIONS, STR_LEN, U8, U16, U32, VERSION, VERSION_FIELD, FormatError,
)


def _as_int(value, name: str, maximum: int, minimum: int = 0) -> int:
    """``value`` as an int in [minimum, maximum], or a PromptusError saying the format's limit."""
    try:
        v = operator.index(value)
    except TypeError:
        raise PromptusError(f"{name}={value!r} must be an integer") from None
    if not minimum <= v <= maximum:
        raise PromptusError(f"{name}={v} is outside what the .promptus format stores ({minimum}..{maximum})")
    return v


def _check_format_limits(config: CodecConfig, frame_count) -> None:
    """Raise PromptusError if ``config`` cannot be stored in (or safely read from) a header."""
    for name, maximum in (("width", U16), ("height", U16), ("rank", U16), ("interval", U16), ("seed", U32),
                          ("quant_bits", U8), ("tokens", U16), ("embed_dim", U16), ("timestep", U16),
                          ("latent_channels", U8), ("latent_factor", U8)):
        _as_int(getattr(config, name), name, maximum)
    _as_int(frame_count, "frame_count", MAX_FRAME_COUNT, minimum=1)
    for name in ("fps", "mix"):
        if not math.isfinite(getattr(config, name)):
            raise PromptusError(f"{name}={getattr(config, name)!r} must be a finite number")
    if len(config.noise_generator.encode("utf-8")) > U16:
        raise PromptusError("the noise generator name is too long for the format")
    codes = code_bytes(config)
    if codes > MAX_KEYFRAME_CODE_BYTES:
        raise PromptusError(
            f"a keyframe of rank {config.rank} with {config.tokens}×{config.embed_dim} embeddings holds {codes} code "
            f"bytes; the .promptus format allows at most {MAX_KEYFRAME_CODE_BYTES} — lower the rank")
    if 1 + init_size(config.latent_shape, "fp32") > U32:
        raise PromptusError(f"a {config.width}×{config.height} frame's init latent is too large for one record")


def code_bytes(config: CodecConfig) -> int:
    """Bytes of quantized codes in one keyframe: U (tokens×r) plus V (r×dim)."""
    return config.rank * (config.tokens + config.embed_dim)


@dataclass(frozen=True)
class Header:
    """Everything a decoder needs besides the init latent and the keyframes."""

    config: CodecConfig
    frame_count: int
    model: ModelIdentity = field(default_factory=ModelIdentity.unknown)

    def __post_init__(self) -> None:
        if not isinstance(self.config, CodecConfig):
            raise PromptusError(f"Header.config must be a CodecConfig, got {type(self.config).__name__}")
        if not isinstance(self.model, ModelIdentity):
            raise PromptusError(f"Header.model must be a ModelIdentity, got {type(self.model).__name__}")
        _check_format_limits(self.config, self.frame_count)
        object.__setattr__(self, "frame_count", operator.index(self.frame_count))

    width = property(lambda self: self.config.width)
    height = property(lambda self: self.config.height)
    fps = property(lambda self: self.config.fps)
    rank = property(lambda self: self.config.rank)
    interval = property(lambda self: self.config.interval)
    seed = property(lambda self: self.config.seed)
    mix = property(lambda self: self.config.mix)

    @property
    def keyframe_count(self) -> int:
        """Keyframes of a complete file: ``ceil((frame_count − 1)/T) + 1``."""
        return self.config.keyframe_count(self.frame_count)

    @property
    def duration_s(self) -> float:
        """Clip duration ``frame_count / fps`` in seconds."""
        return self.frame_count / self.config.fps


def init_size(shape: tuple[int, ...], precision: str) -> int:
    """Bytes of an encoded init latent of ``shape`` (same as prompts.init_latent_bytes)."""
    n = math.prod(shape)
    return {"fp32": 4 * n, "fp16": 2 * n, "int8": n + CHANNEL_QUANT.itemsize * shape[1]}[precision]


@dataclass(frozen=True)
class InitLatent:
    """The init latent (1, C, h, w) as stored: its precision and its encoded bytes.

    Build one with :meth:`from_array`; ``latent`` / ``to_torch()`` decode it. Every
    InitLatent holds finite values (checked on construction).
    """

    precision: str
    shape: tuple[int, int, int, int]
    data: bytes

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PromptusError(f"unknown init-latent precision {self.precision!r}; choose fp32, fp16 or int8")
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
            raise PromptusError(f"an init latent has shape (1, C, h, w), got {shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "data", bytes(self.data))
        if len(self.data) != init_size(shape, self.precision):
            raise PromptusError(f"a {self.precision} init latent of shape {shape} takes "
                                f"{init_size(shape, self.precision)} bytes, got {len(self.data)}")
        if self.precision == "int8":
            side = np.frombuffer(self.data, CHANNEL_QUANT, count=shape[1])
            s = side["scale"]
            if not (np.isfinite(s).all() and (s > 0).all()):
                raise PromptusError("the int8 init latent has a non-finite or non-positive channel scale")
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, in words
            finite = np.isfinite(self.latent).all()
        if not finite:
            raise PromptusError("the init latent holds NaN or inf values")

    @classmethod
    def from_array(cls, arr, precision: str) -> "InitLatent":
        """Encode a float (1, C, h, w) latent at ``precision`` (fp32 exact; fp16, int8 lossy).

        int8 quantizes each channel asymmetrically over its own min/max (the error
        is at most half that channel's scale).
        """
        if precision not in PRECISIONS:
            raise PromptusError(f"unknown init-latent precision {precision!r}; choose fp32, fp16 or int8")
        x = np.asarray(arr, dtype=np.float32)
        if x.ndim != 4 or x.shape[0] != 1:
            raise PromptusError(f"an init latent has shape (1, C, h, w), got {x.shape}")
        if not np.isfinite(x).all():
            raise PromptusError("cannot store an init latent holding NaN or inf")
        if precision == "fp32":
            data = x.astype("<f4").tobytes()
        elif precision == "fp16":
            with np.errstate(over="ignore"):  # overflow is reported below, in words
                h = x.astype("<f2")
            if not np.isfinite(h).all():
                raise PromptusError("init latent values exceed the float16 range (±65504); store it as fp32")
            data = h.tobytes()
        else:
            channels = x.shape[1]
            side = np.zeros(channels, CHANNEL_QUANT)
            codes = np.empty(x.shape[1:], np.uint8)
            for c in range(channels):
                scale, zp = quant_params(float(x[0, c].min()), float(x[0, c].max()))
                side[c] = (scale, zp)
                codes[c] = quantize(torch.from_numpy(np.ascontiguousarray(x[0, c])), scale, zp).numpy()
            data = side.tobytes() + codes.tobytes()
        return cls(precision, x.shape, data)

    @property
    def latent(self) -> np.ndarray:
        """The decoded latent, float32 (1, C, h, w), a fresh array."""
        if self.precision == "fp32":
            return np.frombuffer(self.data, "<f4").astype(np.float32).reshape(self.shape)
        if self.precision == "fp16":
            return np.frombuffer(self.data, "<f2").astype(np.float32).reshape(self.shape)
        channels = self.shape[1]
        side = np.frombuffer(self.data, CHANNEL_QUANT, count=channels)
        q = np.frombuffer(self.data, np.uint8, offset=channels * CHANNEL_QUANT.itemsize).reshape(self.shape)
        scale = side["scale"].astype(np.float32).reshape(1, -1, 1, 1)
        zp = side["zero_point"].astype(np.float32).reshape(1, -1, 1, 1)
        return scale * (q.astype(np.float32) - zp)  # float32 arithmetic, as QuantizedTensor.dequantize

    def to_torch(self) -> torch.Tensor:
        """The decoded latent as a float32 CPU tensor."""
        return torch.from_numpy(self.latent)

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded latent (the INIT payload minus its 1-byte precision tag)."""
        return len(self.data)


def _quantized_equal(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return (a.q.shape == b.q.shape and np.array_equal(a.q, b.q)
            and np.float32(a.scale) == np.float32(b.scale) and int(a.zero_point) == int(b.zero_point))


@dataclass(frozen=True, eq=False)
class Keyframe:
    """The quantized prompt factors of keyframe ``index``: U (tokens×r) and V (r×dim).

    Two keyframes are equal when index, codes, float32 scales and zero points are.
    """

    index: int
    U_q: QuantizedTensor
    V_q: QuantizedTensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", _as_int(self.index, "keyframe index", U32))
        for name in ("U_q", "V_q"):
            qt = getattr(self, name)
            if not isinstance(qt, QuantizedTensor) or qt.q.ndim != 2:
                raise PromptusError(f"Keyframe.{name} must be a 2-D QuantizedTensor")
        if self.U_q.shape[1] != self.V_q.shape[0]:
            raise PromptusError(f"keyframe {self.index}: U has {self.U_q.shape[1]} columns but V has "
                                f"{self.V_q.shape[0]} rows; both are the rank")

    @property
    def U(self) -> torch.Tensor:
        """Dequantized U, float32 (tokens×r)."""
        return self.U_q.to_torch()

    @property
    def V(self) -> torch.Tensor:
        """Dequantized V, float32 (r×dim)."""
        return self.V_q.to_torch()

    @property
    def rank(self) -> int:
        return self.U_q.shape[1]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Keyframe):
            return NotImplemented
        return (self.index == other.index and _quantized_equal(self.U_q, other.U_q)
                and _quantized_equal(self.V_q, other.V_q))

    __hash__ = None  # holds arrays


@dataclass
class Bitstream:
    """A whole clip: header, init latent and keyframes 0, T, 2T, ... (maybe not all of them yet)."""

    header: Header
    init: InitLatent
    keyframes: list[Keyframe] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every keyframe the header asks for is present."""
        return len(self.keyframes) == self.header.keyframe_count

    def validate(self) -> None:
        """Raise PromptusError unless the init latent and keyframes fit the header.

        Checks the init-latent shape, each keyframe's U/V shapes, that keyframe i
        sits at frame i·T, and that there are no more keyframes than the header needs.
        A bitstream with fewer keyframes (not ``complete``) passes.
        """
        if not isinstance(self.header, Header):
            raise PromptusError(f"Bitstream.header must be a Header, got {type(self.header).__name__}")
        if not isinstance(self.init, InitLatent):
            raise PromptusError(f"Bitstream.init must be an InitLatent, got {type(self.init).__name__}")
        cfg = self.header.config
        if self.init.shape != cfg.latent_shape:
            raise PromptusError(f"the init latent has shape {self.init.shape} but a {cfg.width}×{cfg.height} frame "
                                f"needs {cfg.latent_shape}")
        want = self.header.keyframe_count
        if len(self.keyframes) > want:
            raise PromptusError(f"{len(self.keyframes)} keyframes, but {self.header.frame_count} frames at interval "
                                f"{cfg.interval} need only {want}")
        for i, kf in enumerate(self.keyframes):
            if not isinstance(kf, Keyframe):
                raise PromptusError(f"keyframe {i} is a {type(kf).__name__}, not a Keyframe")
            if kf.index != i * cfg.interval:
                raise PromptusError(f"keyframe {i} has index {kf.index}; keyframes sit at 0, T, 2T, ... so it must be "
                                    f"{i * cfg.interval} (interval {cfg.interval})")
            if kf.U_q.shape != (cfg.tokens, cfg.rank) or kf.V_q.shape != (cfg.rank, cfg.embed_dim):
                raise PromptusError(f"keyframe {i}: U is {kf.U_q.shape} and V is {kf.V_q.shape}; the header needs "
                                    f"{(cfg.tokens, cfg.rank)} and {(cfg.rank, cfg.embed_dim)}")


#: What a parser yields, in stream order: one Header, one InitLatent, then Keyframes.
Item = Union[Header, InitLatent, Keyframe]


# ------------------------------------------------------- record payloads


class _Reader:
    """Sequential reads from one payload; short reads are format errors, not struct.error."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FormatError(f"the {self.what} payload is too short ({len(self.data)} bytes)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def text(self, name: str) -> str:
        (n,) = self.unpack(STR_LEN)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"the {name} is not valid UTF-8") from None

    def rest(self) -> bytes:
        out, self.pos = self.data[self.pos:], len(self.data)
        return out

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise FormatError(f"{len(self.data) - self.pos} unexpected bytes at the end of the {self.what} payload")


def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return STR_LEN.pack(len(b)) + b


def pack_header(h: Header) -> bytes:
    c = h.config
    return b"".join([
        HEAD_A.pack(c.width, c.height, c.fps, c.rank, c.interval, c.seed),
        _pack_str(c.noise_generator),
        HEAD_B.pack(c.mix, c.quant_bits, c.tokens, c.embed_dim, c.timestep, c.latent_channels, c.latent_factor,
                     h.frame_count),
        _pack_str(h.model.name),
        h.model.digest,
    ])


def unpack_header(payload: bytes) -> Header:
    r = _Reader(payload, "header")
    width, height, fps, rank, interval, seed = r.unpack(HEAD_A)
    generator = r.text("noise generator name")
    mix, quant_bits, tokens, embed_dim, timestep, channels, factor, frame_count = r.unpack(HEAD_B)
    model_name = r.text("model name")
    digest = r.take(DIGEST_SIZE)
    r.finish()
    if factor == 0:  # CodecConfig would divide by it
        raise FormatError("latent factor 0 is impossible")
    try:
        config = CodecConfig(width=width, height=height, fps=fps, rank=rank, interval=interval, seed=seed,
                             noise_generator=generator, mix=mix, quant_bits=quant_bits, tokens=tokens,
                             embed_dim=embed_dim, timestep=timestep, latent_channels=channels, latent_factor=factor)
        return Header(config, frame_count, ModelIdentity(model_name, digest))
    except PromptusError as e:
        raise FormatError(f"invalid header value: {e}") from None


def pack_init(init: InitLatent) -> bytes:
    return bytes([PRECISIONS.index(init.precision)]) + init.data


def init_payload_sizes(header: Header) -> dict[int, str]:
    """INIT payload length → precision, for the latent shape the header implies."""
    shape = header.config.latent_shape
    return {1 + init_size(shape, p): p for p in PRECISIONS}


def unpack_init(payload: bytes, header: Header) -> InitLatent:
    if not payload or payload[0] >= len(PRECISIONS):
        raise FormatError(f"unknown init-latent precision id {payload[:1].hex() or 'none'} "
                           f"(this promptus knows 0 fp32, 1 fp16, 2 int8)")
    precision = PRECISIONS[payload[0]]
    shape = header.config.latent_shape
    if len(payload) != 1 + init_size(shape, precision):
        raise FormatError(f"a {precision} init latent of shape {shape} takes {1 + init_size(shape, precision)} "
                           f"payload bytes, the record has {len(payload)}")
    try:
        return InitLatent(precision, shape, payload[1:])
    except PromptusError as e:
        raise FormatError(str(e)) from None


def keyframe_codes(kf: Keyframe) -> bytes:
    """The raw codes of a keyframe: U then V, each row-major."""
    return kf.U_q.q.tobytes() + kf.V_q.q.tobytes()  # tobytes() is C (row-major) order whatever the strides


def pack_keyframe(kf: Keyframe, entropy: str, context: EntropyContext) -> bytes:
    """The KEYF payload of ``kf``; advances ``context`` past it."""
    codes = keyframe_codes(kf)
    codec, block = entropy_code(codes, entropy, context)
    context.advance(codes)
    return KEYF_FIXED.pack(kf.index, CODERS.by_name(codec).id, kf.U_q.scale, int(kf.U_q.zero_point),
                           kf.V_q.scale, int(kf.V_q.zero_point)) + block


def unpack_keyframe(payload: bytes, header: Header, position: int,
                    context: EntropyContext | None) -> tuple[Keyframe, str]:
    """The keyframe at ``position`` and the name of its coder; advances ``context`` past it.

    ``context`` None: the keyframes before it are unknown (only stateless coders decode).
    """
    cfg = header.config
    r = _Reader(payload, "keyframe")
    index, codec_id, u_scale, u_zp, v_scale, v_zp = r.unpack(KEYF_FIXED)
    if index != position * cfg.interval:
        raise FormatError(f"it holds keyframe index {index}, but keyframe {position} must sit at frame "
                           f"{position * cfg.interval} (interval {cfg.interval})")
    coder = CODERS.by_id(codec_id)
    for name, scale, zp in (("U", u_scale, u_zp), ("V", v_scale, v_zp)):
        try:
            check_quant_params(scale, zp)
        except PromptusError as e:
            raise FormatError(f"the {name} quantizer: {e}") from None
    n_u, n_v = cfg.tokens * cfg.rank, cfg.rank * cfg.embed_dim
    codes = decompress_codes(r.rest(), coder, n_u + n_v, context)
    q = np.frombuffer(codes, np.uint8)
    try:
        U_q = QuantizedTensor(q[:n_u].reshape(cfg.tokens, cfg.rank).copy(), u_scale, u_zp)
        V_q = QuantizedTensor(q[n_u:].reshape(cfg.rank, cfg.embed_dim).copy(), v_scale, v_zp)
        kf = Keyframe(index, U_q, V_q)
    except PromptusError as e:
        raise FormatError(str(e)) from None
    if context is not None:
        context.advance(codes)
    return kf, coder.name


def frame_record(rtype: bytes, payload: bytes) -> bytes:
    """One record: type, u32 payload length, payload, u32 CRC-32 over type and payload."""
    if len(payload) > U32:
        raise PromptusError(f"a {KIND[rtype]} record of {len(payload)} bytes is too large for the format")
    return FRAME.pack(rtype, len(payload)) + payload + CRC.pack(zlib.crc32(payload, zlib.crc32(rtype)))


def to_bytes(bs: Bitstream, *, entropy: str = "auto") -> bytes:
    """Serialise a complete bitstream to .promptus bytes.

    ``entropy`` chooses how keyframe codes are stored (one of ``ENTROPY_CHOICES``):
    "auto" keeps the smallest block of the registry's coders (zlib, lzma, bz2) per
    keyframe, or raw when none is smaller; "none" stores raw; a coder's name tries
    only that coder (still raw when it does not win). The output is deterministic.
    Raises PromptusError for an invalid or incomplete bitstream.
    """
    if not isinstance(bs, Bitstream):
        raise PromptusError(f"to_bytes needs a Bitstream, got {type(bs).__name__}")
    CODERS.check_choice(entropy)
    bs.validate()
    if not bs.complete:
        raise PromptusError(f"the bitstream has {len(bs.keyframes)} of its {bs.header.keyframe_count} keyframes; "
                            "only complete bitstreams can be written")
    parts = [MAGIC, VERSION_FIELD.pack(VERSION), frame_record(HEAD, pack_header(bs.header)),
             frame_record(INIT, pack_init(bs.init))]
    context = new_context()
    parts += [frame_record(KEYF, pack_keyframe(kf, entropy, context)) for kf in bs.keyframes]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    parts.append(frame_record(END, digest.digest()))
    return b"".join(parts)
