"""The .promptus container: write, read and stream-parse compressed prompts.

A .promptus file is readable without executing anything (no pickle). It is built
like PNG: a signature, then length-prefixed, checksummed records, so that a stream
can be parsed incrementally and damage is reported at the first bad record while
everything before it still decodes. The byte layout — every field, version 1 and 2,
the entropy coder ids and the limits — is specified in ``docs/format.md``; the
committed conformance vectors are ``tests/data/conformance-v*.promptus``.

The package, one job per module:

* :mod:`~promptus.bitstream.spec` — the format's constants (signature, version, layouts, limits);
* :mod:`~promptus.bitstream.records` — Header, InitLatent, Keyframe, Bitstream; record payloads; :func:`to_bytes`;
* :mod:`~promptus.bitstream.entropy` — the entropy-coder registry (``CODERS``), from which ids,
  ``entropy=`` choices and messages derive;
* :mod:`~promptus.bitstream.parser` — :class:`StreamParser`, :func:`from_bytes`, :func:`iter_records`,
  :func:`split_records`, :func:`parse_record`;
* :mod:`~promptus.bitstream.io` — :func:`read` and :func:`write` (atomic) of files;
* :mod:`~promptus.bitstream.report` — what ``promptus info`` prints: :func:`layout`, :func:`describe`,
  :func:`file_rate`.
"""

from ..config import CodecConfig, ModelIdentity  # noqa: F401  (CodecConfig: importable here before the split)
from ..errors import BitstreamError, PromptusError  # noqa: F401  (the same)
from ..prompts import QuantizedTensor  # noqa: F401  (the same)
from .entropy import CODECS, CODERS, ENTROPY_CHOICES, compress_codes, entropy_code
from .io import read, write
from .parser import RecordInfo, StreamParser, from_bytes, iter_records, parse_record, split_records
from .records import Bitstream, Header, InitLatent, Item, Keyframe, to_bytes
from .report import FileRate, describe, file_rate, layout
from .spec import (
    DECOMPRESSION_BASE, DECOMPRESSION_RATIO, DIGEST_SIZE, FILE_DIGEST_SIZE, MAGIC, MAX_KEYFRAME_CODE_BYTES,
    PRECISIONS, VERSION,
)

__all__ = [
    "MAGIC", "VERSION", "PRECISIONS", "CODECS", "ENTROPY_CHOICES", "ModelIdentity", "Header", "InitLatent", "Keyframe",
    "Bitstream", "RecordInfo", "StreamParser", "to_bytes", "from_bytes", "write", "read", "iter_records", "layout",
    "describe", "file_rate", "FileRate", "compress_codes", "entropy_code", "split_records", "parse_record",
    "CODERS", "Item", "MAX_KEYFRAME_CODE_BYTES", "DECOMPRESSION_BASE", "DECOMPRESSION_RATIO", "DIGEST_SIZE",
    "FILE_DIGEST_SIZE",
]
