"""Parsing .promptus bytes: the incremental :class:`StreamParser`, whole files
(:func:`from_bytes`, :func:`iter_records`) and single records as a stream sends them
(:func:`split_records`, :func:`parse_record`).

Damage is reported at the first bad record (BitstreamError naming it), and
``BitstreamError.partial`` keeps what was intact before it. Layout: docs/format.md.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

from ..errors import BitstreamError, PromptusError
from .entropy import new_context
from .records import (
    Bitstream, Header, InitLatent, Item, Keyframe, code_bytes, init_payload_sizes, unpack_header, unpack_init,
    unpack_keyframe,
)
from .spec import (
    CRC, DECOMPRESSION_BASE, DECOMPRESSION_RATIO, END, FILE_DIGEST_SIZE, FRAME, FRAMING, HEAD, HEAD_MAX, HEAD_MIN,
    INIT, KEYF, KEYF_FIXED, KIND, MAGIC, PREFIX, RECORD_TYPES, VERSION, VERSION_FIELD, FormatError, plural,
)


@dataclass(frozen=True)
class RecordInfo:
    """Where one part of a file lies: ``size`` counts its framing, ``payload`` only its content."""

    name: str
    offset: int
    size: int
    payload: int
    codec: str | None = None
    raw_codes: int | None = None  # uncompressed code bytes of a keyframe


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
        self._entropy = new_context()  # what stateful entropy coders carry from keyframe to keyframe

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
            self._fail("magic", 0, f"truncated: the data is only {plural(avail, 'byte')} long, too short for the "
                                   f"{PREFIX}-byte .promptus signature and version",
                       "the file is empty or was cut short; fetch it again")
        rtype, name = self._expected()
        if avail == 0:
            where = "the data ends here, before this record"
        elif avail < FRAME.size:
            where = f"the data ends inside this record's framing ({avail} of {FRAME.size} bytes)"
        else:
            _, length = FRAME.unpack_from(self._buf, self._pos)
            where = f"the data ends inside this record ({avail} of {length + FRAMING} bytes present)"
        if rtype == KEYF:
            what = f"; the file should hold {plural(self.header.keyframe_count, 'keyframe')}"
        elif rtype == END:
            what = "; all keyframes are there, only the end record is missing"
        else:
            what = ""
        self._fail(name, self.offset, f"truncated: {where}{what}",
                   "the file was cut short (an interrupted transfer or write?); fetch it again")

    # -- internals

    def _expected(self) -> tuple[bytes, str]:
        """Type and name of the record that must come next."""
        if self.header is None:
            return HEAD, "header record"
        if self.init is None:
            return INIT, "init latent record"
        if len(self.keyframes) < self.header.keyframe_count:
            return KEYF, f"keyframe record {len(self.keyframes)}"
        return END, "end record"

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
            intact = (f" The header, init latent and {plural(len(self.keyframes), 'keyframe')} before it are intact "
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
                               f"{plural(avail, 'byte')} of unexpected data after the end record",
                               "the file is damaged, or two files were concatenated")
                return
            if avail < FRAME.size:
                return
            offset = self.offset
            rtype, length = FRAME.unpack_from(self._buf, self._pos)
            expected, name = self._expected()
            self._check_framing(rtype, length, expected, name, offset)
            if avail < length + FRAMING:
                return
            start = self._pos + FRAME.size
            payload = bytes(self._buf[start:start + length])
            (crc,) = CRC.unpack_from(self._buf, start + length)
            if crc != zlib.crc32(payload, zlib.crc32(rtype)):
                self._corrupt(name, offset, "checksum mismatch")
            if rtype != END:
                self._digest.update(bytes(self._buf[self._pos:start]))
                self._digest.update(payload)
                self._digest.update(self._buf[start + length:start + length + CRC.size])
            try:
                item = self._accept(rtype, payload, offset, length)
            except FormatError as e:
                self._fail(name, offset, str(e), e.advice)
            except Exception as e:  # a safety net: malformed input must only ever raise BitstreamError
                self._corrupt(name, offset, f"unreadable payload ({type(e).__name__}: {e})")
            self._pos += length + FRAMING
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
        if avail < PREFIX:
            return False
        (version,) = VERSION_FIELD.unpack_from(self._buf, self._pos + len(MAGIC))
        if version > VERSION:
            self._fail("version", len(MAGIC), f"format version {version}: written by a newer promptus "
                                              f"(this one reads up to version {VERSION})",
                       "upgrade promptus to read it")
        if version < 1:
            self._fail("version", len(MAGIC), f"format version {version} does not exist",
                       "the file is corrupted; fetch or copy it again")
        self.records.append(RecordInfo("magic+version", 0, PREFIX, PREFIX))
        self.version = version
        self._digest.update(self._buf[self._pos:self._pos + PREFIX])
        self._pos += PREFIX
        self._started = True
        return True

    def _check_framing(self, rtype: bytes, length: int, expected: bytes, name: str, offset: int) -> None:
        """Reject a wrong record type or an impossible length before waiting for (or allocating) the payload."""
        if rtype not in RECORD_TYPES:
            self._corrupt(name, offset, f"unknown record type {rtype!r} (records are HEAD, INIT, KEYF, END)")
        if rtype != expected:
            if expected == KEYF and rtype == END:
                self._fail(name, offset,
                           f"truncated: the end record comes after only {len(self.keyframes)} of the "
                           f"{self.header.keyframe_count} keyframes the header asks for",
                           "the encoder stopped early; encode the clip again")
            if expected == END and rtype == KEYF:
                self._corrupt(name, offset, f"found another keyframe record, but {self.header.frame_count} frames "
                                            f"at interval {self.header.interval} need only "
                                            f"{self.header.keyframe_count} keyframes")
            if rtype == HEAD:
                self._corrupt(name, offset, "found a second header record")
            self._corrupt(name, offset, f"found a {KIND[rtype]} record ({rtype!r}) where the {name} must be; "
                                        "the records are out of order")
        if rtype == HEAD:
            ok, want = HEAD_MIN <= length <= HEAD_MAX, f"{HEAD_MIN}..{HEAD_MAX}"
        elif rtype == INIT:
            sizes = init_payload_sizes(self.header)
            ok, want = length in sizes, " or ".join(f"{n} ({p})" for n, p in sizes.items())
        elif rtype == KEYF:
            most = KEYF_FIXED.size + code_bytes(self.header.config)
            ok, want = KEYF_FIXED.size < length <= most, f"{KEYF_FIXED.size + 1}..{most}"
        else:
            n = FILE_DIGEST_SIZE if self.version >= 2 else 0
            ok, want = length == n, str(n)
        if not ok:
            self._corrupt(name, offset, f"payload length {length} is impossible (expected {want} bytes)")
        if rtype == KEYF:  # the whole-file budget, checked before anything is inflated
            codes = (len(self.keyframes) + 1) * code_bytes(self.header.config)
            budget = DECOMPRESSION_BASE + DECOMPRESSION_RATIO * (offset + length + FRAMING)
            if codes > budget:
                self._fail(name, offset, f"the keyframes up to here decompress to {codes} code bytes, more than "
                                         f"the {budget} bytes promptus allows for {offset + length + FRAMING} "
                                         f"bytes of file ({DECOMPRESSION_RATIO}× plus {DECOMPRESSION_BASE >> 20} MiB)",
                           "real prompt files compress far less; this one looks like a decompression bomb and is "
                           "refused")

    def _accept(self, rtype: bytes, payload: bytes, offset: int, length: int) -> Item | None:
        size = length + FRAMING
        if rtype == HEAD:
            self.header = unpack_header(payload)
            self.records.append(RecordInfo("header", offset, size, length))
            return self.header
        if rtype == INIT:
            self.init = unpack_init(payload, self.header)
            self.records.append(RecordInfo(f"init latent ({self.init.precision})", offset, size, length))
            return self.init
        if rtype == KEYF:
            i = len(self.keyframes)
            kf, codec = unpack_keyframe(payload, self.header, i, self._entropy)
            self.keyframes.append(kf)
            self.records.append(RecordInfo(f"keyframe {i} (index {kf.index})", offset, size, length, codec,
                                           code_bytes(self.header.config)))
            return kf
        if self.version >= 2 and payload != self._digest.digest():
            raise FormatError("the file's SHA-256 digest does not match its records: a record was changed or "
                               "spliced in from another file")
        self.done = True
        self.records.append(RecordInfo("end", offset, size, length))
        return None


# ---------------------------------------------------------- single records


def split_records(data: bytes) -> tuple[list[bytes], BitstreamError | None]:
    """The pieces of a file as a stream sends them: signature + version + header record,
    init latent record, each keyframe record, end record.

    Each piece is a whole framed record that :func:`parse_record` reads on its own.
    A damaged file yields its intact leading pieces and the BitstreamError that
    stopped the split (``None`` for a sound file).
    """
    data = as_bytes(data)
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
    at the next good one. A keyframe stored by a stateful entropy coder needs the
    keyframes before it and is refused here. Any flaw raises a BitstreamError naming
    the record.
    """
    piece = as_bytes(piece)
    if piece[:4] == MAGIC[:4]:  # the signature: a header piece
        parser = StreamParser()
        items = parser.feed(piece)
        if not items or parser.offset != len(piece):
            raise BitstreamError(f"header piece of {len(piece)} bytes is truncated or has trailing data "
                                 "— the stream is damaged", record="header record")
        return items[0]
    if len(piece) < FRAMING:
        raise BitstreamError(f"a record piece of {len(piece)} bytes is shorter than a record's framing "
                             f"({FRAMING} bytes) — it was truncated", record="record")
    rtype, length = FRAME.unpack_from(piece, 0)
    name = KIND.get(rtype, f"record {rtype!r}")
    if rtype not in (INIT, KEYF, END):
        raise BitstreamError(f"unknown or misplaced record type {rtype!r} — the stream is damaged", record=name)
    if len(piece) != length + FRAMING:
        raise BitstreamError(f"{name} record: {len(piece)} bytes where its framing announces {length + FRAMING} "
                             "— it was truncated or padded", record=name)
    payload = piece[FRAME.size:FRAME.size + length]
    (crc,) = CRC.unpack_from(piece, FRAME.size + length)
    if crc != zlib.crc32(payload, zlib.crc32(rtype)):
        raise BitstreamError(f"{name} record: checksum mismatch — its bytes were damaged", record=name)
    if rtype == END:
        # Version 1: empty; version 2: the whole-file SHA-256. A piece on its own cannot check
        # that digest (a receiver conceals records), so only its size is checked here.
        if length not in (0, FILE_DIGEST_SIZE):
            raise BitstreamError(f"end record with a {length}-byte payload — the stream is damaged", record=name)
        return None
    if header is None:
        raise BitstreamError(f"a {name} record came before the header", record=name)
    try:
        if rtype == INIT:
            return unpack_init(payload, header)
        if len(payload) < KEYF_FIXED.size:
            raise FormatError(f"payload of {len(payload)} bytes is shorter than a keyframe's fixed part")
        index = KEYF_FIXED.unpack_from(payload)[0]
        position, rest = divmod(index, header.interval)
        if rest or position >= header.keyframe_count:
            raise FormatError(f"keyframe index {index} is not one of 0, {header.interval}, ... up to the clip's "
                               f"{header.keyframe_count} keyframes")
        if len(payload) > KEYF_FIXED.size + code_bytes(header.config):
            raise FormatError(f"payload of {len(payload)} bytes is longer than a keyframe can be")
        return unpack_keyframe(payload, header, position, None)[0]  # keyframes before it unknown
    except FormatError as e:
        raise BitstreamError(f"{name} record: {e} — the stream is damaged", record=name) from None
    except PromptusError:
        raise
    except Exception as e:  # malformed input must only ever raise BitstreamError
        raise BitstreamError(f"{name} record: unreadable payload ({type(e).__name__}: {e})", record=name) from None


# ------------------------------------------------------------ entry points


def as_bytes(data) -> bytes:
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
    parser.feed(as_bytes(data))
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
