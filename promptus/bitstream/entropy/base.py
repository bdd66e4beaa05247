"""What an entropy coder is, the registry that holds them, and the context that
stateful coders carry from keyframe to keyframe (docs/format.md, "Entropy coders")."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from ...errors import PromptusError
from ..spec import FormatError, UnknownCoderError

#: ``entropy=`` values that name no coder: try every coder ("auto"), or store raw ("none").
AUTO, NONE = "auto", "none"


class EntropyCoder:
    """One lossless way of storing a keyframe's codes: one entry of the coder registry.

    ``id`` is the byte a KEYF record stores, ``name`` what a user chooses
    (``entropy=name``). :meth:`compress` may return anything; the writer keeps a block
    only when it is smaller than the raw codes. :meth:`decompress` must return exactly
    ``size`` bytes, never allocate much more than ``size`` whatever the block claims
    (it is hostile input), and raise :class:`FormatError` (or any exception, which the
    caller words as "cannot be decompressed") for a damaged block.

    A stateless coder codes each keyframe on its own. A coder that learns from earlier
    keyframes sets ``stateful = True`` and implements :meth:`start` (its state before
    keyframe 0) and :meth:`advance` (its state after a keyframe, from that keyframe's
    raw codes); writer and reader advance every stateful coder with every keyframe,
    whichever coder stored it, so both sides hold the same state at each keyframe.
    """

    id: ClassVar[int]
    name: ClassVar[str]
    #: One line for docs and reports: the exact stream this coder stores.
    summary: ClassVar[str] = ""
    #: Whether ``entropy="auto"`` tries this coder.
    auto: ClassVar[bool] = True
    stateful: ClassVar[bool] = False

    def compress(self, codes: bytes, state: Any = None) -> bytes:
        raise NotImplementedError

    def decompress(self, block: bytes, size: int, state: Any = None) -> bytes:
        raise NotImplementedError

    def start(self) -> Any:
        """The state before the first keyframe of a stream (stateful coders)."""
        return None

    def advance(self, state: Any, codes: bytes) -> Any:
        """The state after a keyframe whose raw codes are ``codes`` (stateful coders)."""
        return state

    def __repr__(self) -> str:
        return f"<entropy coder {self.id} {self.name!r}>"


class StreamCoder(EntropyCoder):
    """A coder over a streaming decompressor of the standard library (zlib, lzma, bz2):
    output is bounded by the size the header implies, and a block must end exactly."""

    def decompressor(self, size: int, state: Any):
        """A fresh decompressor object with ``decompress(data, max_length)``, ``eof`` and ``unused_data``."""
        raise NotImplementedError

    def pending_output(self, d) -> bytes:
        """At most one more byte of output, once ``size`` bytes came out (a bomb is caught here)."""
        return d.decompress(b"", 1)

    def leftover(self, d) -> bytes:
        """Input the decompressor did not use."""
        return d.unused_data

    def decompress(self, block: bytes, size: int, state: Any = None) -> bytes:
        """Exactly ``size`` bytes from ``block``; never produces more (a bomb cannot blow memory)."""
        d = self.decompressor(size, state)
        out = d.decompress(block, size)
        if not d.eof and len(out) == size:  # the end-of-stream marker may still be pending
            if self.pending_output(d):
                raise FormatError(f"{self.name} codes decompress to more than the {size} bytes the header implies")
        leftover = self.leftover(d)
        if len(out) != size:
            raise FormatError(f"{self.name} codes decompress to {len(out)} bytes, the header implies {size}")
        if not d.eof:
            raise FormatError(f"the {self.name} stream of codes is not terminated")
        if leftover:
            raise FormatError(f"{len(leftover)} stray bytes after the {self.name} stream of codes")
        return out


class CoderRegistry:
    """The entropy coders a stream may use, by id and by name; every list of coder ids,
    every ``entropy=`` choice and every message naming them derives from it."""

    def __init__(self, coders: Iterable[EntropyCoder]):
        self._by_id: dict[int, EntropyCoder] = {}
        self._by_name: dict[str, EntropyCoder] = {}
        for coder in coders:
            self.add(coder)

    def add(self, coder: EntropyCoder) -> None:
        """Register ``coder``; its id (a byte) and name must be new."""
        if not isinstance(coder, EntropyCoder):
            raise PromptusError(f"an entropy coder must be an EntropyCoder, got {type(coder).__name__}")
        if not isinstance(coder.id, int) or not 0 <= coder.id <= 0xFF:
            raise PromptusError(f"entropy coder {coder.name!r}: id {coder.id!r} must be a byte (0..255)")
        if coder.id in self._by_id:
            raise PromptusError(f"entropy coder id {coder.id} is taken by {self._by_id[coder.id].name!r}")
        if coder.name in self._by_name or coder.name in (AUTO, NONE):
            raise PromptusError(f"entropy coder name {coder.name!r} is taken")
        self._by_id[coder.id] = coder
        self._by_name[coder.name] = coder

    def remove(self, coder: EntropyCoder) -> None:
        del self._by_id[coder.id], self._by_name[coder.name]

    @contextmanager
    def registered(self, coder: EntropyCoder) -> Iterator[EntropyCoder]:
        """``coder`` registered for the duration of a ``with`` block (tests and experiments)."""
        self.add(coder)
        try:
            yield coder
        finally:
            self.remove(coder)

    def __iter__(self) -> Iterator[EntropyCoder]:
        """Every coder, by id."""
        return iter(sorted(self._by_id.values(), key=lambda c: c.id))

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def raw(self) -> EntropyCoder:
        """The coder of id 0: the codes as they are, the fallback of every choice."""
        return self._by_id[0]

    @property
    def names(self) -> tuple[str, ...]:
        """Coder names by id."""
        return tuple(c.name for c in self)

    @property
    def choices(self) -> tuple[str, ...]:
        """The values of ``entropy=``: "auto", "none", then every coder but raw by id."""
        return (AUTO, NONE) + tuple(c.name for c in self if c.id != 0)

    def known_ids(self) -> str:
        """"0 raw, 1 zlib, ...": what an error message says this promptus knows."""
        return ", ".join(f"{c.id} {c.name}" for c in self)

    def by_id(self, coder_id: int) -> EntropyCoder:
        try:
            return self._by_id[coder_id]
        except KeyError:
            raise UnknownCoderError(f"unknown entropy codec id {coder_id} "
                                    f"(this promptus knows {self.known_ids()})") from None

    def by_name(self, name: str) -> EntropyCoder:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise PromptusError(f"unknown entropy codec {name!r}; choose one of {', '.join(self.names)}") from None

    def check_choice(self, entropy: str) -> None:
        """Raise PromptusError unless ``entropy`` is one of :attr:`choices`."""
        if entropy not in self.choices:
            raise PromptusError(f"entropy={entropy!r}; choose one of {', '.join(self.choices)}")

    def candidates(self, entropy: str) -> list[EntropyCoder]:
        """The coders ``entropy`` tries besides raw: none, one, or every ``auto`` coder by id."""
        self.check_choice(entropy)
        if entropy == NONE:
            return []
        if entropy == AUTO:
            return [c for c in self if c.auto and c.id != 0]
        return [self._by_name[entropy]]


class EntropyContext:
    """What the stateful coders of a registry carry from keyframe to keyframe of one stream.

    A writer and a reader each hold one per stream and call :meth:`advance` with every
    keyframe's raw codes in order, whichever coder stored that keyframe. Stateless
    coders have no entry; with none registered this costs nothing.
    """

    def __init__(self, coders: CoderRegistry):
        self._stateful = [c for c in coders if c.stateful]
        self._states = {c.name: c.start() for c in self._stateful}
        self.keyframes = 0  # keyframes advanced over

    def state(self, coder: EntropyCoder) -> Any:
        """``coder``'s state before the current keyframe (None for a stateless coder)."""
        if not coder.stateful:
            return None
        if coder.name not in self._states:
            raise PromptusError(f"entropy coder {coder.name!r} was registered after this stream started")
        return self._states[coder.name]

    def advance(self, codes: bytes) -> None:
        """Move past one keyframe whose raw codes are ``codes``."""
        for c in self._stateful:
            self._states[c.name] = c.advance(self._states[c.name], codes)
        self.keyframes += 1
