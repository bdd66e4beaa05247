"""The prompt stream on the wire, and the receiver's concealment of damaged records.

A stream is a .promptus file cut at its record boundaries
(:func:`promptus.bitstream.split_records`), one piece per WebSocket binary
message: the signature and header record together, the init latent record, one
message per keyframe record, and the end record. Each piece keeps its
length prefix and CRC-32, so the receiver checks every message on its own.

WebSocket ``/ws/prompts/{clip}?start=K&pace=realtime|fast``. Server → client:

* text ``{"type": "start", "clip", "start", "keyframes", "frames", "fps", "bytes", "pace"}``
  before the header piece of every (re)start;
* binary pieces. Keyframes before keyframe ``start`` travel unpaced (the
  receiver regenerates them unseen: every segment starts from the last latent of
  the one before, so seeking is exact); from there the keyframe closing a segment
  leaves one interval before that segment's first frame is due;
* text ``{"type": "error", "message"}`` before the server closes on a problem.

Client → server: text ``{"type": "seek", "keyframe": K}`` restarts the stream at
keyframe K. Anything else is an error: the server answers with an error message
and closes the socket (1003 for binary data, 1008 otherwise).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from ..bitstream import Header, InitLatent, Keyframe, parse_record
from ..config import ServerConfig
from ..errors import BitstreamError, PromptusError

log = logging.getLogger(__name__)

#: Largest client → server message the server reads (a seek is a few dozen bytes).
MAX_CONTROL_BYTES = ServerConfig.max_control_bytes
#: Deepest JSON nesting a client may send (a control message is one flat object).
MAX_JSON_DEPTH = ServerConfig.max_json_depth
#: Largest server → client message a receiver accepts by default: an fp32 init latent
#: of a 2048² frame (1 MiB) plus room; raise it for larger frames.
MAX_PIECE_BYTES = 4 << 20


@dataclass(frozen=True)
class Damage:
    """A record the receiver could not use: what it was, why, and how it was concealed."""

    record: str
    problem: str
    concealment: str

    def __str__(self) -> str:
        return f"{self.record}: {self.problem}; {self.concealment}"


@dataclass(frozen=True)
class Concealed:
    """A keyframe stand-in: ``keyframe`` holds the last good prompt at a lost keyframe's index."""

    keyframe: Keyframe


class ConcealingReader:
    """Turns stream pieces into decoder items, concealing damaged or lost keyframes.

    ``feed(piece)`` returns the items to decode, in order: the Header, the
    InitLatent, then one Keyframe (or :class:`Concealed` stand-in) per keyframe
    index. A damaged keyframe record is reported in ``damage`` and replaced by the
    last good prompt held at its index; a keyframe that never came (the next good
    one jumps ahead) is concealed the same way, so the frame count stays right and
    decoding resynchronises at the next good record. Before any good keyframe there
    is nothing to hold: those indices take the first good prompt when it arrives.
    A damaged header or init latent cannot be concealed: BitstreamError.
    A new header piece starts a new stream (a seek).
    """

    def __init__(self) -> None:
        self.damage: list[Damage] = []
        self._reset()

    def _reset(self) -> None:
        self.header: Header | None = None
        self.init: InitLatent | None = None
        self.position = 0  # the keyframe (by position) expected next
        self.last: Keyframe | None = None  # the last good keyframe
        self.owed = 0  # keyframe positions lost before any good keyframe
        self.ended = False

    @property
    def complete(self) -> bool:
        return self.header is not None and self.position >= self.header.keyframe_count

    def feed(self, piece: bytes) -> list[Header | InitLatent | Keyframe | Concealed]:
        try:
            item = parse_record(piece, self.header)
        except BitstreamError as e:
            return self._damaged(piece, e)
        if isinstance(item, Header):
            self._reset()  # a (re)start; the damage report goes on
            self.header = item
            return [item]
        if item is None:  # the end record
            self.ended = True
            if self.header is None or self.init is None:
                raise BitstreamError("the stream ended before its header and init latent", record="end record")
            return self._lost_until(self.header.keyframe_count, "the end record came before it")
        if isinstance(item, InitLatent):
            if self.init is not None:
                self.damage.append(Damage("init latent record", "a second init latent", "ignored"))
                return []
            self.init = item
            return [item]
        return self._keyframe(item)

    def _keyframe(self, kf: Keyframe) -> list[Keyframe | Concealed]:
        if self.init is None:
            raise BitstreamError("a keyframe came before the init latent; the stream cannot be decoded",
                                 record=f"keyframe {kf.index}")
        position = kf.index // self.header.interval
        if position < self.position:
            self.damage.append(Damage(f"keyframe {kf.index}", "arrived again or out of order", "dropped"))
            return []
        out: list[Keyframe | Concealed] = []
        if position > self.position:
            out += self._lost_until(position, "never arrived")
        if self.owed:  # keyframes lost before the first good one take its prompt
            interval = self.header.interval
            out += [Concealed(Keyframe(p * interval, kf.U_q, kf.V_q))
                    for p in range(position - self.owed, position)]
            self.owed = 0
        out.append(kf)
        self.last, self.position = kf, position + 1
        return out

    def _lost_until(self, position: int, problem: str) -> list[Concealed]:
        out = []
        for p in range(self.position, position):
            index = p * self.header.interval
            out += self._conceal(f"keyframe {index}", problem)
        return out

    def _conceal(self, record: str, problem: str) -> list[Concealed]:
        index = self.position * self.header.interval
        self.position += 1
        if self.last is None:
            self.owed += 1
            self.damage.append(Damage(record, problem, "no prompt to hold yet: the first good keyframe stands in"))
            return []
        self.damage.append(Damage(record, problem, f"held the prompt of keyframe {self.last.index}"))
        return [Concealed(Keyframe(index, self.last.U_q, self.last.V_q))]

    def _damaged(self, piece: bytes, e: BitstreamError) -> list[Concealed]:
        log.warning("damaged record: %s", e)
        if self.header is None:
            raise BitstreamError(f"the stream's header is damaged, nothing can be decoded: {e}", record=e.record) from None
        if self.init is None:
            raise BitstreamError(f"the stream's init latent is damaged, nothing can be decoded: {e}",
                                 record="init latent") from None
        if self.complete or bytes(piece[:4]) == b"END ":
            self.damage.append(Damage(e.record or "record", str(e), "ignored (after the last keyframe)"))
            return []
        return self._conceal(f"keyframe {self.position * self.header.interval}", str(e))

    def finish(self) -> list[Damage]:
        """Call when the connection closed: reports a stream cut short (its last frames cannot be made)."""
        if self.header is not None and not self.ended:
            got = min(self.position, self.header.keyframe_count)
            self.damage.append(Damage("stream", f"ended after {got} of {self.header.keyframe_count} keyframes",
                                      "the frames after it are missing"))
        return self.damage


def control(message: dict) -> str:
    """A text message of the protocol."""
    return json.dumps(message, separators=(",", ":"))


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deeply ``text`` nests JSON arrays and objects (brackets inside strings do not count).

    Linear in the text and without recursion, so that it can run before a parser that
    recurses (and raises RecursionError thousands of levels down).
    """
    depth = deepest = 0
    for b in _JSON_BRACKETS.findall(_JSON_STRING.sub("", text)):
        depth += 1 if b in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def load_client_json(text: str | bytes, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, what: str = "message"):
    """Parse JSON from a client: at most ``max_bytes`` and ``max_depth`` deep, no NaN or Infinity.

    Raises PromptusError saying which bound was passed (never RecursionError or OverflowError).
    """
    if len(text) > max_bytes:
        raise PromptusError(f"{what} of {len(text)} bytes; the limit is {max_bytes}")
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise PromptusError(f"{what} is not UTF-8 JSON text") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise PromptusError(f"{what} nests JSON {depth} levels deep; the limit is {max_depth}")
    return json.loads(text, parse_constant=_no_constant)


def parse_control(text: str | bytes | None, *, max_bytes: int = MAX_CONTROL_BYTES,
                  max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A client's control message as a dict; PromptusError saying what is wrong otherwise."""
    if text is None:
        raise PromptusError("binary data is not accepted from clients; send JSON text such as "
                            '{"type": "seek", "keyframe": 3}')
    try:
        msg = load_client_json(text, max_bytes=max_bytes, max_depth=max_depth, what="control message")
    except (ValueError, UnicodeDecodeError):
        raise PromptusError('control messages are JSON objects such as {"type": "seek", "keyframe": 3}') from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise PromptusError('a control message is a JSON object with a "type"')
    return msg
