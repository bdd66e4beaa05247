"""The constants of the .promptus format (docs/format.md): signature, version, record
types, field layouts and limits. Every other module of the package reads them here."""

from __future__ import annotations

import struct

import numpy as np

from ..config import MODEL_DIGEST_SIZE

#: File signature. Like PNG's: a high-bit byte (catches 7-bit transfers), a name,
#: CR LF (catches newline conversion), ^Z (stops DOS ``type``), LF.
MAGIC = b"\x89PRM\r\n\x1a\n"
#: Format version this package writes; it reads every version up to this one.
#: Version 2 added the whole-file digest in the END record.
VERSION = 2

#: Init-latent precisions, by their id in the INIT record.
PRECISIONS = ("fp32", "fp16", "int8")

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

HEAD, INIT, KEYF, END = b"HEAD", b"INIT", b"KEYF", b"END "
RECORD_TYPES = (HEAD, INIT, KEYF, END)
KIND = {HEAD: "header", INIT: "init latent", KEYF: "keyframe", END: "end"}

VERSION_FIELD = struct.Struct("<H")
FRAME = struct.Struct("<4sI")  # record type, payload length
CRC = struct.Struct("<I")
FRAMING = FRAME.size + CRC.size  # bytes of framing around each payload
PREFIX = len(MAGIC) + VERSION_FIELD.size
STR_LEN = struct.Struct("<H")
HEAD_A = struct.Struct("<HHdHHI")  # width, height, fps, rank, interval, seed
HEAD_B = struct.Struct("<dBHHHBBI")  # mix, quant_bits, tokens, embed_dim, timestep, channels, factor, frame_count
HEAD_MIN = HEAD_A.size + STR_LEN.size + HEAD_B.size + STR_LEN.size + DIGEST_SIZE
HEAD_MAX = HEAD_MIN + 2 * 0xFFFF
KEYF_FIXED = struct.Struct("<IBfBfB")  # index, codec, U scale, U zero point, V scale, V zero point
CHANNEL_QUANT = np.dtype([("scale", "<f4"), ("zero_point", "u1")])  # int8 init latent side info

U8, U16, U32 = 0xFF, 0xFFFF, 0xFFFFFFFF


class FormatError(Exception):
    """A payload is malformed; the parser turns it into a BitstreamError naming the record."""

    #: What the user should do, as the parser words it after the problem.
    advice = "the file is corrupted; fetch or copy it again"


class UnknownCoderError(FormatError):
    """A keyframe names an entropy coder this promptus does not know: damage, or a newer writer."""

    advice = "a newer promptus may have written it (upgrade promptus to read it), or the file is corrupted"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
