"""Regenerating a clip on the server for one browser viewer, paced at its rate.

A :class:`ViewSession` releases the clip's keyframes into the shared
:class:`~promptus.streaming.scheduler.StreamScheduler` at real time (as if they
arrived over the network) and yields the decoded frames at their display times,
each stamped with its latency: from its closing keyframe's release to the moment
the frame is handed to the transport (WebSocket JPEG or WebRTC).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from .library import Clip
from .scheduler import StreamScheduler

log = logging.getLogger(__name__)

#: Display buffer: frame ``first`` is shown this long after its segment is ready.
PLAYOUT_DELAY_S = 0.1


def release_offset(position: int, start: int, interval: int, rate: float) -> float:
    """Seconds after a (re)start at keyframe ``start`` when keyframe ``position`` leaves.

    Keyframes before ``start`` leave at once (catch-up), and so do ``start`` and the
    one after it; later ones leave one interval before the first frame of the segment
    they close is due: ``((position − 1)·T − start·T) / rate``.
    """
    return max(0.0, ((position - 1) * interval - start * interval) / rate)


@dataclass(frozen=True)
class ViewFrame:
    """One frame to show: its index, RGB pixels (H×W×3 uint8) and latency so far (s)."""

    index: int
    rgb: np.ndarray
    latency: float
    concealed: bool = False


class ViewSession:
    """One viewer's regeneration of ``clip`` through ``scheduler`` (admission already decided).

    ``frames()`` is the paced frame iterator; ``stats()`` the numbers the page shows.
    Call :meth:`close` when the viewer leaves (frees its share of the GPU).
    """

    def __init__(self, scheduler: StreamScheduler, clip: Clip, *, rate: float | None = None,
                 accept_lower: bool = False, start: int = 0):
        self.clip = clip
        self.handle = scheduler.open(clip.header, clip.init, rate=rate, accept_lower=accept_lower)
        self.admission = self.handle.admission
        self.rate = self.handle.rate
        self.start = max(0, min(int(start), len(clip.keyframes) - 1))
        self.started = time.perf_counter()
        self.prompt_bytes = 0
        self.sent_frames = 0
        self.video_bytes = 0
        self.transport = "none"
        self.codec = None
        self._recent: deque = deque()  # (time, frames, prompt bytes, video bytes)
        self._latencies: deque = deque(maxlen=300)
        self._feeder: asyncio.Task | None = None
        self.closed = False

    async def _feed(self) -> None:
        """Release keyframes at real time (the clip as it would arrive over the network)."""
        clip, T = self.clip, self.clip.header.interval
        t0 = time.perf_counter()
        head = len(clip.pieces[0]) + len(clip.pieces[1])
        self._count(prompt=head)
        for p, kf in enumerate(clip.keyframes):
            due = t0 + release_offset(p, self.start, T, self.rate)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.closed:
                return
            self.handle.push(kf)
            self._count(prompt=len(clip.pieces[2 + p]))
        self.handle.end()

    def _count(self, frames: int = 0, prompt: int = 0, video: int = 0) -> None:
        now = time.perf_counter()
        self.prompt_bytes += prompt
        self.video_bytes += video
        self.sent_frames += frames
        self._recent.append((now, frames, prompt, video))
        while self._recent and self._recent[0][0] < now - 2.0:
            self._recent.popleft()

    def note_video_bytes(self, n: int) -> None:
        self._count(video=n)

    async def frames(self) -> AsyncIterator[ViewFrame]:
        """Frames from the seek point on, each at its display time."""
        self._feeder = asyncio.create_task(self._feed())
        self._feeder.add_done_callback(_collected)  # its outcome is read, never "never retrieved"
        first = self.start * self.clip.header.interval
        origin = None
        try:
            while True:
                seg = await self.handle.aget()
                if seg is None:
                    break
                if origin is None:
                    origin = time.perf_counter() + PLAYOUT_DELAY_S
                    self.handle.set_origin(origin, first)
                for i in range(seg.frames.shape[0]):
                    index = seg.start + i
                    if index < first:
                        continue  # catch-up frames: made to reach the seek point, not shown
                    delay = origin + (index - first) / self.rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    latency = time.perf_counter() - seg.arrived
                    self._latencies.append(latency)
                    self._count(frames=1)
                    yield ViewFrame(index, seg.frames[i].numpy(), latency, seg.concealed)
        finally:
            self.close()

    def stats(self) -> dict:
        now = time.perf_counter()
        span = min(2.0, max(1e-3, now - self.started))
        recent = [r for r in self._recent if r[0] >= now - 2.0]
        lat = sorted(self._latencies)
        h = self.clip.header
        return {
            "type": "stats", "transport": self.transport, "codec": self.codec,
            "fps": sum(r[1] for r in recent) / span, "clip_fps": h.fps, "rate": self.rate,
            "prompt_kbps": 8 * sum(r[2] for r in recent) / span / 1000, "clip_kbps": self.clip.kbps,
            "video_kbps": 8 * sum(r[3] for r in recent) / span / 1000,
            "h264_kbps": self.clip.original_kbps, "original_codec": self.clip.original_codec,
            "latency_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "latency_p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
            "frames": self.sent_frames, "frame_count": h.frame_count,
            "streams": self.handle.scheduler.streams, "capacity": _finite(self.handle.scheduler.capacity),
            "realtime": self.admission.realtime,
        }

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.handle.close()
            if self._feeder is not None:
                self._feeder.cancel()


def _collected(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("viewer: releasing keyframes failed: %s", task.exception())


def _finite(x: float) -> float | None:
    return x if x == x else None


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an H×W×3 uint8 frame."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
