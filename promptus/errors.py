"""Exceptions raised for user mistakes.

Every error a user can cause (bad input file, missing weights, wrong frame size)
is a :class:`PromptusError` whose message says what was wrong and what to do.
``assert`` is reserved for the library's own invariants.
"""

from __future__ import annotations

from typing import Any


class PromptusError(Exception):
    """Base class of every error a user of promptus can cause."""


class BitstreamError(PromptusError):
    """A .promptus file or stream is malformed, truncated or corrupted.

    ``record`` names the first bad record (e.g. ``"keyframe record 3"``) and
    ``partial`` holds what was parsed intact before it (a
    :class:`promptus.bitstream.Bitstream` whose keyframe list may be short), or
    ``None`` when nothing usable came before the error.
    """

    def __init__(self, message: str, *, record: str | None = None, partial: Any = None):
        super().__init__(message)
        self.record = record
        self.partial = partial


class ModelNotFoundError(PromptusError):
    """Model weights are missing or unreadable."""


class VideoError(PromptusError):
    """Input frames cannot be read or do not fit the codec settings."""


class MetricUnavailable(PromptusError):
    """A metric cannot be computed here; ``reason`` says why (and what would fix it)."""

    def __init__(self, metric: str, reason: str):
        super().__init__(f"{metric} is unavailable: {reason}")
        self.metric = metric
        self.reason = reason


class EncodeAborted(PromptusError):
    """An encode stopped because its ``should_stop`` said so (see :class:`promptus.Encoder`).

    The ``keyframes_done`` finished keyframes stay in the checkpoint next to the output;
    ``Encoder.encode(..., resume=True)`` with the same input and settings continues from there.
    """

    def __init__(self, message: str, *, keyframes_done: int):
        super().__init__(message)
        self.keyframes_done = keyframes_done
