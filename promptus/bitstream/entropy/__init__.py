"""Entropy coding of keyframe codes: the coder registry and the functions over it.

:data:`CODERS` is the one list of coders: the ids a KEYF record may hold, the values
of ``entropy=`` (and of the command line's ``--entropy``), and every message naming
them derive from it. Adding a coder is one module and one entry below
(docs/design.md, "Adding an entropy coder"; the exact streams: docs/format.md).
"""

from __future__ import annotations

from ...errors import PromptusError
from ..spec import FormatError
from .base import AUTO, CoderRegistry, EntropyCoder, EntropyContext, StreamCoder
from .stdlib import Bz2Coder, LzmaCoder, RawCoder, ZlibCoder

__all__ = [
    "CODERS", "CODECS", "ENTROPY_CHOICES", "CoderRegistry", "EntropyCoder", "EntropyContext", "StreamCoder",
    "compress_codes", "decompress_codes", "entropy_code", "new_context",
]

#: Every coder, one entry each; ``entropy="auto"`` tries them in id order and keeps the
#: first smallest block.
CODERS = CoderRegistry([
    RawCoder(),
    ZlibCoder(),
    LzmaCoder(),
    Bz2Coder(),
])

#: Entropy codecs of the keyframe codes, by their id in the KEYF record (built-in coders).
CODECS = CODERS.names
#: Values of ``entropy=``: try every codec ("auto"), store raw ("none"), or try one codec.
ENTROPY_CHOICES = CODERS.choices


def new_context() -> EntropyContext:
    """The coder state at the start of a stream, for a writer or a reader."""
    return EntropyContext(CODERS)


def compress_codes(codes: bytes, codec: str, context: EntropyContext | None = None) -> bytes:
    """The block ``codec`` stores for ``codes`` (no fallback to raw; see docs/format.md).

    ``context``: the stream's coder state (default: the state before keyframe 0).
    """
    coder = CODERS.by_name(codec)
    return coder.compress(codes, (context or new_context()).state(coder))


def entropy_code(codes: bytes, entropy: str = AUTO, context: EntropyContext | None = None) -> tuple[str, bytes]:
    """(codec, block) as :func:`promptus.bitstream.to_bytes` stores ``codes``: the smallest
    block of the codecs ``entropy`` allows, raw unless one is strictly smaller.

    ``context``: the stream's coder state (default: the state before keyframe 0); the
    caller advances it past this keyframe.
    """
    candidates = CODERS.candidates(entropy)
    best = (CODERS.raw.name, bytes(codes))
    if candidates and context is None:
        context = new_context()
    for coder in candidates:
        block = coder.compress(codes, context.state(coder))
        if len(block) < len(best[1]):
            best = (coder.name, block)
    return best


def decompress_codes(block: bytes, coder: EntropyCoder, size: int, context: EntropyContext | None) -> bytes:
    """Exactly ``size`` code bytes from a KEYF block stored by ``coder`` (``CODERS.by_id`` of its id byte).

    ``context`` is the reader's coder state before this keyframe; None where the
    keyframes before it are unknown (a record parsed on its own), which only stateless
    coders can decode. Any flaw raises :class:`FormatError`.
    """
    if coder.stateful and context is None:
        raise FormatError(f"its codes are stored with {coder.name}, which needs the keyframes before it; "
                          "parse the stream in order")
    try:
        out = coder.decompress(block, size, context.state(coder) if context is not None else None)
    except FormatError:
        raise
    except PromptusError as e:
        raise FormatError(str(e)) from None
    except Exception as e:  # zlib.error, LZMAError, OSError, EOFError...: all mean a damaged block
        raise FormatError(f"{coder.name} codes cannot be decompressed ({e})") from None
    if len(out) != size:  # every coder's promise, checked once for all of them
        raise FormatError(f"{coder.name} codes decompress to {len(out)} bytes, the header implies {size}")
    return bytes(out)
