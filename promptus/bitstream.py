"""The .promptus container: write, read and stream-parse compressed prompts.

A .promptus file is readable without executing anything (no pickle). It is built
like PNG: a signature, then length-prefixed, checksummed records, so that a stream
can be parsed incrementally and damage is reported at the first bad record while
everything before it still decodes. All integers are little-endian.

Byte layout::

    offset  size  field
    0       8     MAGIC = 89 50 52 4D 0D 0A 1A 0A  ("\\x89PRM\\r\\n\\x1a\\n")
    8       2     u16 format version (VERSION = 2; version 1 files are still read)
    10      ...   records, each:
                    4   type, ASCII: b"HEAD", b"INIT", b"KEYF" or b"END "
                    4   u32 payload length n
                    n   payload
                    4   u32 CRC-32 (zlib.crc32) over type + payload

Records come in this order: one HEAD, one INIT, ``keyframe_count(frame_count)``
KEYF (indices 0, T, 2T, ...), one END (marks a complete file). Nothing may follow END.

END payload: version 2 — the 32-byte SHA-256 of every byte before the END record
(signature, version and all records), so that a record spliced in from another file
of the same geometry is caught even though its own CRC is right; version 1 — empty.

HEAD payload (61 bytes + the two strings)::

    u16 width, u16 height, f64 fps, u16 rank, u16 interval, u32 seed,
    u16 len + utf-8 noise generator name,
    f64 mix, u8 quant_bits, u16 tokens, u16 embed_dim, u16 timestep,
    u8 latent_channels, u8 latent_factor, u32 frame_count,
    u16 len + utf-8 model name, 16 bytes model digest

INIT payload: u8 precision (0 fp32, 1 fp16, 2 int8), then the latent
(1, C, H/f, W/f) in C order: fp32 → float32 values; fp16 → float16 values;
int8 → C × (f32 scale, u8 zero point), then C·h·w uint8 codes (per-channel
asymmetric 8-bit, :func:`promptus.prompts.quant_params` over each channel).

KEYF payload::

    u32 keyframe index, u8 entropy codec (0 raw, 1 zlib, 2 lzma, 3 bz2),
    f32 U scale, u8 U zero point, f32 V scale, u8 V zero point,
    codes: U (tokens×rank uint8, row-major) then V (rank×embed_dim uint8),
           raw or losslessly compressed as one block

Limits (a reader refuses more; see :mod:`promptus.config`): frame sides ≤ 4096,
rank ≤ 512, interval ≤ 256, tokens ≤ 1024, embedding width ≤ 4096, frame count
≤ 2^24, code bytes per keyframe ≤ 1 MiB, and all keyframes of a file together
decompress to at most 16 MiB + 32 × the bytes read so far (a decompression bomb is
refused before it is inflated).

Codecs: 1 is a raw DEFLATE stream (zlib level 9, no zlib header/Adler-32 — the
record CRC already guards it); 2 is a raw LZMA2 stream (preset 9|EXTREME, dictionary
sized to the codes: max(4096, code bytes)); 3 is a bzip2 stream (level 9). A
compressed block is stored only when it is smaller than the raw codes.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import math
import operator
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn, Union

import numpy as np
import torch

from .config import MAX_FRAME_COUNT, MODEL_DIGEST_SIZE, CodecConfig, ModelIdentity
from .errors import BitstreamError, PromptusError
from .files import atomic_write, read_regular
from .prompts import QuantizedTensor, check_quant_params, kbps, quant_params, quantize

__all__ = [
    "MAGIC", "VERSION", "PRECISIONS", "CODECS", "ENTROPY_CHOICES", "ModelIdentity", "Header", "InitLatent", "Keyframe",
    "Bitstream", "RecordInfo", "StreamParser", "to_bytes", "from_bytes", "write", "read", "iter_records", "layout",
    "describe", "file_rate", "FileRate", "compress_codes", "entropy_code", "split_records", "parse_record",
]

#: File signature. Like PNG's: a high-bit byte (catches 7-bit transfers), a name,
#: CR LF (catches newline conversion), ^Z (stops DOS ``type``), LF.
MAGIC = b"\x89PRM\r\n\x1a\n"
#: Format version this module writes; it reads every version up to this one.
#: Version 2 added the whole-file digest in the END record.
VERSION = 2

#: Init-latent precisions, by their id in the INIT record.
PRECISIONS = ("fp32", "fp16", "int8")
#: Entropy codecs of the keyframe codes, by their id in the KEYF record.
CODECS = ("raw", "zlib", "lzma", "bz2")
#: Values of ``entropy=``: try every codec ("auto"), store raw ("none"), or try one codec.
ENTROPY_CHOICES = ("auto", "none", "zlib", "lzma", "bz2")

#: Format limit on the quantized codes of one keyframe (rank 8 needs 8808 bytes).
#: It bounds what a decompressor may produce, whatever a damaged header claims.
MAX_KEYFRAME_CODE_BYTES = 1 << 20
#: Whole-file decompression budget: the keyframes read so far may hold at most
#: ``DECOMPRESSION_BASE + DECOMPRESSION_RATIO × bytes read`` code bytes. Real factor
#: codes compress by a few percent; a file over this ratio is a decompression bomb.
DECOMPRESSION_BASE = 16 << 20
DECOMPRESSION_RATIO = 32
DIGEST_SIZE = MODEL_DIGEST_SIZE  # of the model identity
FILE_DIGEST_SIZE = 32  # SHA-256 of the file, in the END record (version ≥ 2)

_HEAD, _INIT, _KEYF, _END = b"HEAD", b"INIT", b"KEYF", b"END "
_RECORD_TYPES = (_HEAD, _INIT, _KEYF, _END)
_KIND = {_HEAD: "header", _INIT: "init latent", _KEYF: "keyframe", _END: "end"}

_VERSION = struct.Struct("<H")
_FRAME = struct.Struct("<4sI")  # record type, payload length
_CRC = struct.Struct("<I")
_FRAMING = _FRAME.size + _CRC.size  # bytes of framing around each payload
_PREFIX = len(MAGIC) + _VERSION.size
_STR_LEN = struct.Struct("<H")
_HEAD_A = struct.Struct("<HHdHHI")  # width, height, fps, rank, interval, seed
_HEAD_B = struct.Struct("<dBHHHBBI")  # mix, quant_bits, tokens, embed_dim, timestep, channels, factor, frame_count
_HEAD_MIN = _HEAD_A.size + _STR_LEN.size + _HEAD_B.size + _STR_LEN.size + DIGEST_SIZE
_HEAD_MAX = _HEAD_MIN + 2 * 0xFFFF
_KEYF_FIXED = struct.Struct("<IBfBfB")  # index, codec, U scale, U zero point, V scale, V zero point
_CHANNEL_QUANT = np.dtype([("scale", "<f4"), ("zero_point", "u1")])  # int8 init latent side info

_U8, _U16, _U32 = 0xFF, 0xFFFF, 0xFFFFFFFF


class _FormatError(Exception):
    """A payload is malformed; the parser turns it into a BitstreamError naming the record."""


# ----------------------------------------------------------------- objects


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
    for name, maximum in (("width", _U16), ("height", _U16), ("rank", _U16), ("interval", _U16), ("seed", _U32),
                          ("quant_bits", _U8), ("tokens", _U16), ("embed_dim", _U16), ("timestep", _U16),
                          ("latent_channels", _U8), ("latent_factor", _U8)):
        _as_int(getattr(config, name), name, maximum)
    _as_int(frame_count, "frame_count", MAX_FRAME_COUNT, minimum=1)
    for name in ("fps", "mix"):
        if not math.isfinite(getattr(config, name)):
            raise PromptusError(f"{name}={getattr(config, name)!r} must be a finite number")
    if len(config.noise_generator.encode("utf-8")) > _U16:
        raise PromptusError("the noise generator name is too long for the format")
    codes = _code_bytes(config)
    if codes > MAX_KEYFRAME_CODE_BYTES:
        raise PromptusError(
            f"a keyframe of rank {config.rank} with {config.tokens}×{config.embed_dim} embeddings holds {codes} code "
            f"bytes; the .promptus format allows at most {MAX_KEYFRAME_CODE_BYTES} — lower the rank")
    if 1 + _init_size(config.latent_shape, "fp32") > _U32:
        raise PromptusError(f"a {config.width}×{config.height} frame's init latent is too large for one record")


def _code_bytes(config: CodecConfig) -> int:
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


def _init_size(shape: tuple[int, ...], precision: str) -> int:
    """Bytes of an encoded init latent of ``shape`` (same as prompts.init_latent_bytes)."""
    n = math.prod(shape)
    return {"fp32": 4 * n, "fp16": 2 * n, "int8": n + _CHANNEL_QUANT.itemsize * shape[1]}[precision]


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
        if len(self.data) != _init_size(shape, self.precision):
            raise PromptusError(f"a {self.precision} init latent of shape {shape} takes "
                                f"{_init_size(shape, self.precision)} bytes, got {len(self.data)}")
        if self.precision == "int8":
            side = np.frombuffer(self.data, _CHANNEL_QUANT, count=shape[1])
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
            side = np.zeros(channels, _CHANNEL_QUANT)
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
        side = np.frombuffer(self.data, _CHANNEL_QUANT, count=channels)
        q = np.frombuffer(self.data, np.uint8, offset=channels * _CHANNEL_QUANT.itemsize).reshape(self.shape)
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
        object.__setattr__(self, "index", _as_int(self.index, "keyframe index", _U32))
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


# ------------------------------------------------------- entropy coding


def _lzma_filters(size: int, preset: int | None = None) -> list[dict]:
    # A dictionary as large as the codes compresses as well as a 64 MiB one and
    # keeps encoder and decoder memory proportional to the keyframe.
    f = {"id": lzma.FILTER_LZMA2, "dict_size": max(4096, size)}
    if preset is not None:
        f["preset"] = preset
    return [f]


def compress_codes(codes: bytes, codec: str) -> bytes:
    """The block ``codec`` stores for ``codes`` (no fallback to raw; see the module docstring)."""
    if codec == "raw":
        return bytes(codes)
    if codec == "zlib":
        c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
        return c.compress(codes) + c.flush()
    if codec == "lzma":
        return lzma.compress(codes, format=lzma.FORMAT_RAW,
                             filters=_lzma_filters(len(codes), 9 | lzma.PRESET_EXTREME))
    if codec == "bz2":
        return bz2.compress(codes, 9)
    raise PromptusError(f"unknown entropy codec {codec!r}; choose one of {', '.join(CODECS)}")


def entropy_code(codes: bytes, entropy: str = "auto") -> tuple[str, bytes]:
    """(codec, block) as :func:`to_bytes` stores ``codes``: the smallest block of the codecs
    ``entropy`` allows, raw unless one is strictly smaller."""
    if entropy not in ENTROPY_CHOICES:
        raise PromptusError(f"entropy={entropy!r}; choose one of {', '.join(ENTROPY_CHOICES)}")
    best = ("raw", bytes(codes))
    if entropy == "none":
        return best
    for codec in (CODECS[1:] if entropy == "auto" else (entropy,)):
        block = compress_codes(codes, codec)
        if len(block) < len(best[1]):
            best = (codec, block)
    return best


def _decompress_codes(block: bytes, codec: str, size: int) -> bytes:
    """Exactly ``size`` bytes from ``block``; never produces more (a bomb cannot blow memory)."""
    if codec == "raw":
        if len(block) != size:
            raise _FormatError(f"raw codes are {len(block)} bytes, the header implies {size}")
        return block
    try:
        if codec == "zlib":
            d = zlib.decompressobj(-15)
            out = d.decompress(block, size)
            if not d.eof and len(out) == size:  # the end-of-stream marker may still be pending
                if d.decompress(d.unconsumed_tail, 1):
                    raise _FormatError(f"{codec} codes decompress to more than the {size} bytes the header implies")
            leftover = d.unconsumed_tail or d.unused_data
        else:
            if codec == "lzma":
                d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma_filters(size))
            else:
                d = bz2.BZ2Decompressor()
            out = d.decompress(block, size)
            if not d.eof and len(out) == size:
                if d.decompress(b"", 1):
                    raise _FormatError(f"{codec} codes decompress to more than the {size} bytes the header implies")
            leftover = d.unused_data
    except _FormatError:
        raise
    except Exception as e:  # zlib.error, LZMAError, OSError, EOFError...: all mean a damaged block
        raise _FormatError(f"{codec} codes cannot be decompressed ({e})") from None
    if len(out) != size:
        raise _FormatError(f"{codec} codes decompress to {len(out)} bytes, the header implies {size}")
    if not d.eof:
        raise _FormatError(f"the {codec} stream of codes is not terminated")
    if leftover:
        raise _FormatError(f"{len(leftover)} stray bytes after the {codec} stream of codes")
    return out


# ------------------------------------------------------- record payloads


class _Reader:
    """Sequential reads from one payload; short reads are format errors, not struct.error."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _FormatError(f"the {self.what} payload is too short ({len(self.data)} bytes)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def text(self, name: str) -> str:
        (n,) = self.unpack(_STR_LEN)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _FormatError(f"the {name} is not valid UTF-8") from None

    def rest(self) -> bytes:
        out, self.pos = self.data[self.pos:], len(self.data)
        return out

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise _FormatError(f"{len(self.data) - self.pos} unexpected bytes at the end of the {self.what} payload")


def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return _STR_LEN.pack(len(b)) + b


def _pack_header(h: Header) -> bytes:
    c = h.config
    return b"".join([
        _HEAD_A.pack(c.width, c.height, c.fps, c.rank, c.interval, c.seed),
        _pack_str(c.noise_generator),
        _HEAD_B.pack(c.mix, c.quant_bits, c.tokens, c.embed_dim, c.timestep, c.latent_channels, c.latent_factor,
                     h.frame_count),
        _pack_str(h.model.name),
        h.model.digest,
    ])


def _unpack_header(payload: bytes) -> Header:
    r = _Reader(payload, "header")
    width, height, fps, rank, interval, seed = r.unpack(_HEAD_A)
    generator = r.text("noise generator name")
    mix, quant_bits, tokens, embed_dim, timestep, channels, factor, frame_count = r.unpack(_HEAD_B)
    model_name = r.text("model name")
    digest = r.take(DIGEST_SIZE)
    r.finish()
    if factor == 0:  # CodecConfig would divide by it
        raise _FormatError("latent factor 0 is impossible")
    try:
        config = CodecConfig(width=width, height=height, fps=fps, rank=rank, interval=interval, seed=seed,
                             noise_generator=generator, mix=mix, quant_bits=quant_bits, tokens=tokens,
                             embed_dim=embed_dim, timestep=timestep, latent_channels=channels, latent_factor=factor)
        return Header(config, frame_count, ModelIdentity(model_name, digest))
    except PromptusError as e:
        raise _FormatError(f"invalid header value: {e}") from None


def _pack_init(init: InitLatent) -> bytes:
    return bytes([PRECISIONS.index(init.precision)]) + init.data


def _init_payload_sizes(header: Header) -> dict[int, str]:
    """INIT payload length → precision, for the latent shape the header implies."""
    shape = header.config.latent_shape
    return {1 + _init_size(shape, p): p for p in PRECISIONS}


def _unpack_init(payload: bytes, header: Header) -> InitLatent:
    if not payload or payload[0] >= len(PRECISIONS):
        raise _FormatError(f"unknown init-latent precision id {payload[:1].hex() or 'none'} "
                           f"(this promptus knows 0 fp32, 1 fp16, 2 int8)")
    precision = PRECISIONS[payload[0]]
    shape = header.config.latent_shape
    if len(payload) != 1 + _init_size(shape, precision):
        raise _FormatError(f"a {precision} init latent of shape {shape} takes {1 + _init_size(shape, precision)} "
                           f"payload bytes, the record has {len(payload)}")
    try:
        return InitLatent(precision, shape, payload[1:])
    except PromptusError as e:
        raise _FormatError(str(e)) from None


def _pack_keyframe(kf: Keyframe, entropy: str) -> bytes:
    codes = kf.U_q.q.tobytes() + kf.V_q.q.tobytes()  # tobytes() is C (row-major) order whatever the strides
    codec, block = entropy_code(codes, entropy)
    return _KEYF_FIXED.pack(kf.index, CODECS.index(codec), kf.U_q.scale, int(kf.U_q.zero_point),
                            kf.V_q.scale, int(kf.V_q.zero_point)) + block


def _unpack_keyframe(payload: bytes, header: Header, position: int) -> tuple[Keyframe, str]:
    cfg = header.config
    r = _Reader(payload, "keyframe")
    index, codec_id, u_scale, u_zp, v_scale, v_zp = r.unpack(_KEYF_FIXED)
    if index != position * cfg.interval:
        raise _FormatError(f"it holds keyframe index {index}, but keyframe {position} must sit at frame "
                           f"{position * cfg.interval} (interval {cfg.interval})")
    if codec_id >= len(CODECS):
        raise _FormatError(f"unknown entropy codec id {codec_id} (this promptus knows 0 raw, 1 zlib, 2 lzma, 3 bz2)")
    codec = CODECS[codec_id]
    for name, scale, zp in (("U", u_scale, u_zp), ("V", v_scale, v_zp)):
        try:
            check_quant_params(scale, zp)
        except PromptusError as e:
            raise _FormatError(f"the {name} quantizer: {e}") from None
    n_u, n_v = cfg.tokens * cfg.rank, cfg.rank * cfg.embed_dim
    codes = _decompress_codes(r.rest(), codec, n_u + n_v)
    q = np.frombuffer(codes, np.uint8)
    try:
        U_q = QuantizedTensor(q[:n_u].reshape(cfg.tokens, cfg.rank).copy(), u_scale, u_zp)
        V_q = QuantizedTensor(q[n_u:].reshape(cfg.rank, cfg.embed_dim).copy(), v_scale, v_zp)
        return Keyframe(index, U_q, V_q), codec
    except PromptusError as e:
        raise _FormatError(str(e)) from None


def _record(rtype: bytes, payload: bytes) -> bytes:
    if len(payload) > _U32:
        raise PromptusError(f"a {_KIND[rtype]} record of {len(payload)} bytes is too large for the format")
    return _FRAME.pack(rtype, len(payload)) + payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(rtype)))


def to_bytes(bs: Bitstream, *, entropy: str = "auto") -> bytes:
    """Serialise a complete bitstream to .promptus bytes.

    ``entropy`` chooses how keyframe codes are stored: "auto" keeps the smallest of
    zlib, lzma and bz2 per keyframe, or raw when none is smaller; "none" stores raw;
    "zlib", "lzma" or "bz2" tries only that codec (still raw when it does not win).
    The output is deterministic. Raises PromptusError for an invalid or incomplete
    bitstream.
    """
    if not isinstance(bs, Bitstream):
        raise PromptusError(f"to_bytes needs a Bitstream, got {type(bs).__name__}")
    if entropy not in ENTROPY_CHOICES:
        raise PromptusError(f"entropy={entropy!r}; choose one of {', '.join(ENTROPY_CHOICES)}")
    bs.validate()
    if not bs.complete:
        raise PromptusError(f"the bitstream has {len(bs.keyframes)} of its {bs.header.keyframe_count} keyframes; "
                            "only complete bitstreams can be written")
    parts = [MAGIC, _VERSION.pack(VERSION), _record(_HEAD, _pack_header(bs.header)), _record(_INIT, _pack_init(bs.init))]
    parts += [_record(_KEYF, _pack_keyframe(kf, entropy)) for kf in bs.keyframes]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    parts.append(_record(_END, digest.digest()))
    return b"".join(parts)


# ------------------------------------------------------------------ parser


@dataclass(frozen=True)
class RecordInfo:
    """Where one part of a file lies: ``size`` counts its framing, ``payload`` only its content."""

    name: str
    offset: int
    size: int
    payload: int
    codec: str | None = None
    raw_codes: int | None = None  # uncompressed code bytes of a keyframe


Item = Union[Header, InitLatent, Keyframe]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class StreamParser:
    """Incremental .promptus parser for data that arrives in pieces.

    ``feed`` returns the items completed by each piece (Header, InitLatent, then
    Keyframes; nothing for the end record); ``close`` says whether the stream
    ended complete. ``header``, ``init`` and ``keyframes`` hold what is parsed so
    far, ``records`` the layout, ``done`` is True after the end record. The first
    problem raises a BitstreamError (and every later call raises it again); its
    ``partial`` holds the intact header, init latent and keyframes before it.
    """

    def __init__(self) -> None:
        self.header: Header | None = None
        self.init: InitLatent | None = None
        self.keyframes: list[Keyframe] = []
        self.records: list[RecordInfo] = []
        self.done = False
        self._buf = bytearray()
        self._pos = 0  # parse position in _buf
        self._base = 0  # file offset of _buf[0]
        self._started = False  # magic and version read
        self._error: BitstreamError | None = None
        self.version: int | None = None  # format version of the stream, once read
        self._digest = hashlib.sha256()  # of every byte before the END record

    @property
    def offset(self) -> int:
        """Bytes consumed so far: the file offset of the next record."""
        return self._base + self._pos

    def feed(self, data: bytes) -> list[Item]:
        """Parse ``data`` appended to what came before; return the newly completed items in order."""
        if self._error is not None:
            raise self._error
        if isinstance(data, str):
            raise PromptusError("a .promptus stream is bytes, not text; open the file in binary mode ('rb')")
        try:
            self._buf += data
        except TypeError:
            raise PromptusError(f"StreamParser.feed needs bytes, got {type(data).__name__}") from None
        items: list[Item] = []
        try:
            self._parse(items)
        finally:
            if self._pos:  # drop consumed bytes once per feed, not per record (feeding stays linear)
                del self._buf[:self._pos]
                self._base += self._pos
                self._pos = 0
        return items

    def close(self) -> Bitstream:
        """The whole bitstream; raises BitstreamError if the stream ended early or was bad."""
        if self._error is not None:
            raise self._error
        if self.done:
            return self._partial()
        avail = len(self._buf) - self._pos
        if not self._started:
            self._fail("magic", 0, f"truncated: the data is only {_plural(avail, 'byte')} long, too short for the "
                                   f"{_PREFIX}-byte .promptus signature and version",
                       "the file is empty or was cut short; fetch it again")
        rtype, name = self._expected()
        if avail == 0:
            where = "the data ends here, before this record"
        elif avail < _FRAME.size:
            where = f"the data ends inside this record's framing ({avail} of {_FRAME.size} bytes)"
        else:
            _, length = _FRAME.unpack_from(self._buf, self._pos)
            where = f"the data ends inside this record ({avail} of {length + _FRAMING} bytes present)"
        if rtype == _KEYF:
            what = f"; the file should hold {_plural(self.header.keyframe_count, 'keyframe')}"
        elif rtype == _END:
            what = "; all keyframes are there, only the end record is missing"
        else:
            what = ""
        self._fail(name, self.offset, f"truncated: {where}{what}",
                   "the file was cut short (an interrupted transfer or write?); fetch it again")

    # -- internals

    def _expected(self) -> tuple[bytes, str]:
        """Type and name of the record that must come next."""
        if self.header is None:
            return _HEAD, "header record"
        if self.init is None:
            return _INIT, "init latent record"
        if len(self.keyframes) < self.header.keyframe_count:
            return _KEYF, f"keyframe record {len(self.keyframes)}"
        return _END, "end record"

    def _partial(self) -> Bitstream | None:
        if self.header is None or self.init is None:
            return None
        return Bitstream(self.header, self.init, list(self.keyframes))

    def _fail(self, record: str, offset: int, problem: str, advice: str) -> NoReturn:
        if self.header is None:
            intact = ""
        elif self.init is None:
            intact = " Only the header before it is intact, not enough to decode a frame."
        elif self.done:
            intact = " The complete bitstream before it is intact (BitstreamError.partial holds it)."
        else:
            intact = (f" The header, init latent and {_plural(len(self.keyframes), 'keyframe')} before it are intact "
                      "(BitstreamError.partial holds them).")
        self._error = BitstreamError(f"{record} (byte offset {offset}): {problem} — {advice}.{intact}",
                                     record=record, partial=self._partial())
        raise self._error

    def _corrupt(self, record: str, offset: int, problem: str) -> NoReturn:
        self._fail(record, offset, problem, "the file is corrupted; fetch or copy it again")

    def _parse(self, items: list[Item]) -> None:
        while True:
            avail = len(self._buf) - self._pos
            if not self._started:
                if not self._read_prefix(avail):
                    return
                continue
            if self.done:
                if avail:
                    self._fail("trailing data", self.offset,
                               f"{_plural(avail, 'byte')} of unexpected data after the end record",
                               "the file is damaged, or two files were concatenated")
                return
            if avail < _FRAME.size:
                return
            offset = self.offset
            rtype, length = _FRAME.unpack_from(self._buf, self._pos)
            expected, name = self._expected()
            self._check_framing(rtype, length, expected, name, offset)
            if avail < length + _FRAMING:
                return
            start = self._pos + _FRAME.size
            payload = bytes(self._buf[start:start + length])
            (crc,) = _CRC.unpack_from(self._buf, start + length)
            if crc != zlib.crc32(payload, zlib.crc32(rtype)):
                self._corrupt(name, offset, "checksum mismatch")
            if rtype != _END:
                self._digest.update(bytes(self._buf[self._pos:start]))
                self._digest.update(payload)
                self._digest.update(self._buf[start + length:start + length + _CRC.size])
            try:
                item = self._accept(rtype, payload, offset, length)
            except _FormatError as e:
                self._corrupt(name, offset, str(e))
            except Exception as e:  # a safety net: malformed input must only ever raise BitstreamError
                self._corrupt(name, offset, f"unreadable payload ({type(e).__name__}: {e})")
            self._pos += length + _FRAMING
            if item is not None:
                items.append(item)

    def _read_prefix(self, avail: int) -> bool:
        n = min(avail, len(MAGIC))
        head = bytes(self._buf[self._pos:self._pos + n])
        if head != MAGIC[:n]:
            if head.startswith(b"PK"):
                hint = ("this looks like a zip/torch.save file (a legacy Promptus prompt?); "
                        "import release folders with `promptus import-legacy`")
            elif head[:4] == MAGIC[:4]:  # only the CR/LF/^Z bytes differ
                hint = "the line endings were converted by a text-mode transfer; copy the file in binary mode"
            else:
                hint = "this is not a .promptus file"
            self._fail("magic", 0, f"wrong signature {head!r}", hint)
        if avail < _PREFIX:
            return False
        (version,) = _VERSION.unpack_from(self._buf, self._pos + len(MAGIC))
        if version > VERSION:
            self._fail("version", len(MAGIC), f"format version {version}: written by a newer promptus "
                                              f"(this one reads up to version {VERSION})",
                       "upgrade promptus to read it")
        if version < 1:
            self._fail("version", len(MAGIC), f"format version {version} does not exist",
                       "the file is corrupted; fetch or copy it again")
        self.records.append(RecordInfo("magic+version", 0, _PREFIX, _PREFIX))
        self.version = version
        self._digest.update(self._buf[self._pos:self._pos + _PREFIX])
        self._pos += _PREFIX
        self._started = True
        return True

    def _check_framing(self, rtype: bytes, length: int, expected: bytes, name: str, offset: int) -> None:
        """Reject a wrong record type or an impossible length before waiting for (or allocating) the payload."""
        if rtype not in _RECORD_TYPES:
            self._corrupt(name, offset, f"unknown record type {rtype!r} (records are HEAD, INIT, KEYF, END)")
        if rtype != expected:
            if expected == _KEYF and rtype == _END:
                self._fail(name, offset,
                           f"truncated: the end record comes after only {len(self.keyframes)} of the "
                           f"{self.header.keyframe_count} keyframes the header asks for",
                           "the encoder stopped early; encode the clip again")
            if expected == _END and rtype == _KEYF:
                self._corrupt(name, offset, f"found another keyframe record, but {self.header.frame_count} frames "
                                            f"at interval {self.header.interval} need only "
                                            f"{self.header.keyframe_count} keyframes")
            if rtype == _HEAD:
                self._corrupt(name, offset, "found a second header record")
            self._corrupt(name, offset, f"found a {_KIND[rtype]} record ({rtype!r}) where the {name} must be; "
                                        "the records are out of order")
        if rtype == _HEAD:
            ok, want = _HEAD_MIN <= length <= _HEAD_MAX, f"{_HEAD_MIN}..{_HEAD_MAX}"
        elif rtype == _INIT:
            sizes = _init_payload_sizes(self.header)
            ok, want = length in sizes, " or ".join(f"{n} ({p})" for n, p in sizes.items())
        elif rtype == _KEYF:
            most = _KEYF_FIXED.size + _code_bytes(self.header.config)
            ok, want = _KEYF_FIXED.size < length <= most, f"{_KEYF_FIXED.size + 1}..{most}"
        else:
            n = FILE_DIGEST_SIZE if self.version >= 2 else 0
            ok, want = length == n, str(n)
        if not ok:
            self._corrupt(name, offset, f"payload length {length} is impossible (expected {want} bytes)")
        if rtype == _KEYF:  # the whole-file budget, checked before anything is inflated
            codes = (len(self.keyframes) + 1) * _code_bytes(self.header.config)
            budget = DECOMPRESSION_BASE + DECOMPRESSION_RATIO * (offset + length + _FRAMING)
            if codes > budget:
                self._fail(name, offset, f"the keyframes up to here decompress to {codes} code bytes, more than "
                                         f"the {budget} bytes promptus allows for {offset + length + _FRAMING} "
                                         f"bytes of file ({DECOMPRESSION_RATIO}× plus {DECOMPRESSION_BASE >> 20} MiB)",
                           "real prompt files compress far less; this one looks like a decompression bomb and is "
                           "refused")

    def _accept(self, rtype: bytes, payload: bytes, offset: int, length: int) -> Item | None:
        size = length + _FRAMING
        if rtype == _HEAD:
            self.header = _unpack_header(payload)
            self.records.append(RecordInfo("header", offset, size, length))
            return self.header
        if rtype == _INIT:
            self.init = _unpack_init(payload, self.header)
            self.records.append(RecordInfo(f"init latent ({self.init.precision})", offset, size, length))
            return self.init
        if rtype == _KEYF:
            i = len(self.keyframes)
            kf, codec = _unpack_keyframe(payload, self.header, i)
            self.keyframes.append(kf)
            self.records.append(RecordInfo(f"keyframe {i} (index {kf.index})", offset, size, length, codec,
                                           _code_bytes(self.header.config)))
            return kf
        if self.version >= 2 and payload != self._digest.digest():
            raise _FormatError("the file's SHA-256 digest does not match its records: a record was changed or "
                               "spliced in from another file")
        self.done = True
        self.records.append(RecordInfo("end", offset, size, length))
        return None


# ------------------------------------------------------ single records


def split_records(data: bytes) -> tuple[list[bytes], BitstreamError | None]:
    """The pieces of a file as a stream sends them: signature + version + header record,
    init latent record, each keyframe record, end record.

    Each piece is a whole framed record that :func:`parse_record` reads on its own.
    A damaged file yields its intact leading pieces and the BitstreamError that
    stopped the split (``None`` for a sound file).
    """
    data = _as_bytes(data)
    parser = StreamParser()
    error = None
    try:
        parser.feed(data)
        parser.close()
    except BitstreamError as e:
        error = e
    recs = parser.records
    pieces: list[bytes] = []
    if len(recs) >= 2:  # signature+version, header: sent together so that every stream starts self-describing
        pieces.append(data[:recs[1].offset + recs[1].size])
        pieces += [data[r.offset:r.offset + r.size] for r in recs[2:]]
    return pieces, error


def parse_record(piece: bytes, header: Header | None = None) -> Item | None:
    """One piece of :func:`split_records` on its own: the Header (the piece starts with
    the signature), an InitLatent or a Keyframe (both need ``header``), or None for the
    end record.

    Unlike :class:`StreamParser` it does not require keyframes in order: a receiver
    checks the index itself, so that it can conceal a lost record and resynchronise
    at the next good one. Any flaw raises a BitstreamError naming the record.
    """
    piece = _as_bytes(piece)
    if piece[:4] == MAGIC[:4]:  # the signature: a header piece
        parser = StreamParser()
        items = parser.feed(piece)
        if not items or parser.offset != len(piece):
            raise BitstreamError(f"header piece of {len(piece)} bytes is truncated or has trailing data "
                                 "— the stream is damaged", record="header record")
        return items[0]
    if len(piece) < _FRAMING:
        raise BitstreamError(f"a record piece of {len(piece)} bytes is shorter than a record's framing "
                             f"({_FRAMING} bytes) — it was truncated", record="record")
    rtype, length = _FRAME.unpack_from(piece, 0)
    name = _KIND.get(rtype, f"record {rtype!r}")
    if rtype not in (_INIT, _KEYF, _END):
        raise BitstreamError(f"unknown or misplaced record type {rtype!r} — the stream is damaged", record=name)
    if len(piece) != length + _FRAMING:
        raise BitstreamError(f"{name} record: {len(piece)} bytes where its framing announces {length + _FRAMING} "
                             "— it was truncated or padded", record=name)
    payload = piece[_FRAME.size:_FRAME.size + length]
    (crc,) = _CRC.unpack_from(piece, _FRAME.size + length)
    if crc != zlib.crc32(payload, zlib.crc32(rtype)):
        raise BitstreamError(f"{name} record: checksum mismatch — its bytes were damaged", record=name)
    if rtype == _END:
        # Version 1: empty; version 2: the whole-file SHA-256. A piece on its own cannot check
        # that digest (a receiver conceals records), so only its size is checked here.
        if length not in (0, FILE_DIGEST_SIZE):
            raise BitstreamError(f"end record with a {length}-byte payload — the stream is damaged", record=name)
        return None
    if header is None:
        raise BitstreamError(f"a {name} record came before the header", record=name)
    try:
        if rtype == _INIT:
            return _unpack_init(payload, header)
        if len(payload) < _KEYF_FIXED.size:
            raise _FormatError(f"payload of {len(payload)} bytes is shorter than a keyframe's fixed part")
        index = _KEYF_FIXED.unpack_from(payload)[0]
        position, rest = divmod(index, header.interval)
        if rest or position >= header.keyframe_count:
            raise _FormatError(f"keyframe index {index} is not one of 0, {header.interval}, ... up to the clip's "
                               f"{header.keyframe_count} keyframes")
        if len(payload) > _KEYF_FIXED.size + _code_bytes(header.config):
            raise _FormatError(f"payload of {len(payload)} bytes is longer than a keyframe can be")
        return _unpack_keyframe(payload, header, position)[0]
    except _FormatError as e:
        raise BitstreamError(f"{name} record: {e} — the stream is damaged", record=name) from None
    except PromptusError:
        raise
    except Exception as e:  # malformed input must only ever raise BitstreamError
        raise BitstreamError(f"{name} record: unreadable payload ({type(e).__name__}: {e})", record=name) from None


# ------------------------------------------------------------ entry points


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        raise PromptusError("a .promptus file is bytes, not text; read it in binary mode")
    try:
        return bytes(memoryview(data))
    except TypeError:
        raise PromptusError(f"expected bytes, got {type(data).__name__}") from None


def from_bytes(data: bytes) -> Bitstream:
    """Parse a complete .promptus file; any flaw raises BitstreamError naming the first bad record."""
    parser = StreamParser()
    parser.feed(_as_bytes(data))
    return parser.close()


def iter_records(fileobj: BinaryIO, chunk_size: int = 65536) -> Iterator[Item]:
    """Yield Header, InitLatent and Keyframes of a binary file object as they complete.

    Reads ``chunk_size`` bytes at a time. Raises BitstreamError on damage, and at the
    end if the stream stopped before its end record.
    """
    if chunk_size < 1:
        raise PromptusError(f"chunk_size={chunk_size} must be ≥ 1")
    parser = StreamParser()
    while True:
        try:
            chunk = fileobj.read(chunk_size)
        except OSError as e:
            raise PromptusError(f"could not read the bitstream: {e}") from e
        if not chunk:
            break
        yield from parser.feed(chunk)
    parser.close()


def write(path: str | os.PathLike, bs: Bitstream, *, entropy: str = "auto") -> int:
    """Write ``bs`` to ``path`` atomically; return the number of bytes written.

    :func:`promptus.files.atomic_write`: readers see the old file or the new one,
    never a partial one, and a failure leaves no file behind (PromptusError). The
    bytes are parsed back before they are written: this never writes a file that
    :func:`read` refuses.
    """
    data = to_bytes(bs, entropy=entropy)
    try:
        from_bytes(data)
    except BitstreamError as e:
        raise PromptusError(f"refusing to write {path}: the bitstream would not read back ({e})") from None
    path = Path(path)
    if path.is_dir():
        raise PromptusError(f"cannot write {path}: it is a folder; give a file name such as {path / 'clip.promptus'}")
    folder = path.parent
    if not folder.is_dir():
        raise PromptusError(f"cannot write {path}: the folder {folder} does not exist")
    try:
        atomic_write(path, data, make_folder=False)
    except OSError as e:
        raise PromptusError(f"could not write {path}: {e.strerror or e}") from e
    return len(data)


def read(path: str | os.PathLike) -> Bitstream:
    """Read a complete .promptus file; BitstreamError (with ``partial``) if it is damaged."""
    path = Path(path)
    if path.is_dir():
        raise PromptusError(f"{path} is a folder, not a .promptus file (legacy release folders: "
                            "`promptus import-legacy`)")
    data = read_regular(path, what=".promptus file")
    try:
        return from_bytes(data)
    except BitstreamError as e:
        raise BitstreamError(f"{path}: {e}", record=e.record, partial=e.partial) from None


# --------------------------------------------------------------- reporting


def layout(data: bytes) -> list[RecordInfo]:
    """Every part of a valid file in order, from the signature to the end record; sizes sum to ``len(data)``."""
    parser = StreamParser()
    parser.feed(_as_bytes(data))
    parser.close()
    return list(parser.records)


def _printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (\\x1b, \\u202e...):
    a header's strings must not reach a terminal as escape sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class FileRate:
    """The bitrates of a .promptus file over its clip's duration (frame count / fps).

    ``total_kbps`` counts every byte of the file; ``factors_kbps`` the keyframe
    factor codes as stored (after entropy coding), without their scales and zero
    points, the header, the init latent or the framing. ``promptus info``,
    ``promptus encode`` and the sweep print these two numbers and no others.
    """

    total_bytes: int
    factor_bytes: int
    duration_s: float

    @property
    def total_kbps(self) -> float:
        return kbps(self.total_bytes, self.duration_s)

    @property
    def factors_kbps(self) -> float:
        return kbps(self.factor_bytes, self.duration_s)

    def describe(self) -> str:
        """One line: both rates, labelled as ``info`` and ``encode`` print them."""
        return (f"{self.total_kbps:.2f} kbit/s (all bytes), {self.factors_kbps:.2f} kbit/s (factor codes only) "
                f"over {self.duration_s:.3f} s")


def _factor_code_bytes(records: list[RecordInfo]) -> int:
    return sum(r.payload - _KEYF_FIXED.size for r in records if r.raw_codes is not None)


def file_rate(data: bytes) -> FileRate:
    """:class:`FileRate` of a complete, valid file's bytes (BitstreamError otherwise)."""
    data = _as_bytes(data)
    parser = StreamParser()
    parser.feed(data)
    bs = parser.close()
    return FileRate(len(data), _factor_code_bytes(parser.records), bs.header.duration_s)


def describe(data: bytes) -> str:
    """The report of ``promptus info``: header fields, bytes per part, entropy gain and kbit/s.

    Bitrates are over the clip duration ``frame_count / fps`` with 1 kbit = 1000 bit:
    "total" counts every byte of the file, "factors only" the keyframe code bytes
    as stored (after entropy coding, without scales and zero points).
    """
    data = _as_bytes(data)
    parser = StreamParser()
    parser.feed(data)
    bs = parser.close()
    records = parser.records
    h, cfg = bs.header, bs.header.config
    by_name = {r.name: r for r in records}
    keyf = [r for r in records if r.raw_codes is not None]
    init_rec = next(r for r in records if r.name.startswith("init latent"))
    framed = [r for r in records if r.name != "magic+version"]
    framing = sum(r.size - r.payload for r in framed)
    stored_codes = _factor_code_bytes(records)
    rate = FileRate(len(data), stored_codes, h.duration_s)
    raw_codes = sum(r.raw_codes for r in keyf)
    codec_counts = {c: sum(r.codec == c for r in keyf) for c in CODECS}
    duration = h.duration_s

    lines = [
        f"promptus bitstream, format version {parser.version}, {len(data)} bytes",
        f"  frame size   {cfg.width}×{cfg.height}",
        f"  fps          {cfg.fps:g}",
        f"  frames       {h.frame_count} ({duration:.3f} s)",
        f"  rank         {cfg.rank}",
        f"  interval     {cfg.interval} ({_plural(h.keyframe_count, 'keyframe')})",
        f"  noise        seed {cfg.seed}, {cfg.noise_generator}",
        f"  mix          {cfg.mix:g}",
        f"  quantizer    {cfg.quant_bits} bits",
        f"  embedding    {cfg.tokens} tokens × {cfg.embed_dim}, timestep {cfg.timestep}",
        f"  latent       {cfg.latent_channels}×{cfg.height // cfg.latent_factor}×{cfg.width // cfg.latent_factor}, "
        f"init latent {bs.init.precision}",
        f"  model        {_printable(h.model.name)} (digest {h.model.hexdigest})",
        "",
        f"  {'part':<28}{'bytes':>10}{'share':>9}",
    ]
    parts = [
        ("magic/version", by_name["magic+version"].size),
        ("header", by_name["header"].payload),
        (f"init latent ({bs.init.precision})", init_rec.payload),
        (f"keyframes ({len(keyf)})", sum(r.payload for r in keyf)),
        (f"framing ({len(framed)} records)", framing),
    ]
    if by_name["end"].payload:
        parts.append(("file digest (SHA-256)", by_name["end"].payload))
    assert sum(n for _, n in parts) == len(data), "layout does not cover the file"
    for label, n in parts + [("total", len(data))]:
        lines.append(f"  {label:<28}{n:>10}{100 * n / len(data):>8.1f}%")
    used = ", ".join(f"{c} ×{n}" for c, n in codec_counts.items() if n)
    gain = 100 * (raw_codes - stored_codes) / raw_codes if raw_codes else 0.0
    lines += [
        "",
        f"  entropy coding: {raw_codes} raw code bytes → {stored_codes} stored ({gain:.2f}% saved; {used})",
        f"  bitrate: {rate.describe()} (1 kbit = 1000 bit)",
        "",
        f"  {'offset':>10}{'size':>9}  record",
    ]
    shown = records if len(records) <= 16 else records[:8] + [None] + records[-4:]
    for r in shown:
        if r is None:
            lines.append(f"  {'...':>10}{'':>9}  ({len(records) - 12} more records)")
        else:
            extra = f" [{r.codec}, {r.raw_codes} raw code bytes]" if r.codec else ""
            lines.append(f"  {r.offset:>10}{r.size:>9}  {r.name}{extra}")
    return "\n".join(lines)
