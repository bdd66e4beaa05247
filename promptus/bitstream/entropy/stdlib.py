"""The entropy coders built on the standard library: raw, zlib (DEFLATE), lzma (LZMA2), bz2.

Each is stateless. Compressed streams carry no container around them where the
record's CRC-32 already guards the bytes (docs/format.md, "Entropy coders")."""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Any

from ..spec import FormatError
from .base import EntropyCoder, StreamCoder


class RawCoder(EntropyCoder):
    id, name, auto = 0, "raw", False
    summary = "the codes as they are"

    def compress(self, codes: bytes, state: Any = None) -> bytes:
        return bytes(codes)

    def decompress(self, block: bytes, size: int, state: Any = None) -> bytes:
        if len(block) != size:
            raise FormatError(f"raw codes are {len(block)} bytes, the header implies {size}")
        return block


class ZlibCoder(StreamCoder):
    id, name = 1, "zlib"
    summary = "a raw DEFLATE stream (zlib level 9, memLevel 9, 32 KiB window; no zlib header or Adler-32)"

    def compress(self, codes: bytes, state: Any = None) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
        return c.compress(codes) + c.flush()

    def decompressor(self, size: int, state: Any):
        return zlib.decompressobj(-15)

    def pending_output(self, d) -> bytes:
        return d.decompress(d.unconsumed_tail, 1)  # zlib keeps unread input in unconsumed_tail

    def leftover(self, d) -> bytes:
        return d.unconsumed_tail or d.unused_data


def lzma_filters(size: int, preset: int | None = None) -> list[dict]:
    # A dictionary as large as the codes compresses as well as a 64 MiB one and
    # keeps encoder and decoder memory proportional to the keyframe.
    f = {"id": lzma.FILTER_LZMA2, "dict_size": max(4096, size)}
    if preset is not None:
        f["preset"] = preset
    return [f]


class LzmaCoder(StreamCoder):
    id, name = 2, "lzma"
    summary = "a raw LZMA2 stream (preset 9|EXTREME, dictionary max(4096, code bytes); no .xz container)"

    def compress(self, codes: bytes, state: Any = None) -> bytes:
        return lzma.compress(codes, format=lzma.FORMAT_RAW, filters=lzma_filters(len(codes), 9 | lzma.PRESET_EXTREME))

    def decompressor(self, size: int, state: Any):
        return lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=lzma_filters(size))


class Bz2Coder(StreamCoder):
    id, name = 3, "bz2"
    summary = "a bzip2 stream (level 9, with its BZh header)"

    def compress(self, codes: bytes, state: Any = None) -> bytes:
        return bz2.compress(codes, 9)

    def decompressor(self, size: int, state: Any):
        return bz2.BZ2Decompressor()
