"""The real-time receiver: prompts from a URL in, segments of frames out.

::

    from promptus.streaming import Receiver
    async for seg in Receiver("ws://127.0.0.1:8000/ws/prompts/clip.promptus", models=models):
        show(seg.frames)        # uint8 N×H×W×3 on the host, frames seg.start .. seg.stop-1

Each segment is decoded as soon as the keyframe closing it has arrived, on a
worker thread so that the network keeps being read meanwhile. Damaged or lost
keyframes are reported (``stats.damage``) and concealed (see
:class:`~promptus.streaming.wire.ConcealingReader`): the stream goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..bitstream import Header, InitLatent
from ..config import DEFAULT_ENGINE_DIR
from ..decoder import ClipState, Decoder
from ..errors import PromptusError
from .scheduler import ProducedSegment
from .wire import MAX_PIECE_BYTES, Concealed, ConcealingReader, Damage, control

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedSegment(ProducedSegment):
    """Frames ``start .. stop−1`` (host uint8 N×H×W×3) of the stream.

    ``arrived``/``ready`` (``time.perf_counter()``): when the closing keyframe came in
    and when the frames were on the host. ``concealed``: made with a held prompt.
    ``catchup``: regenerated only to reach a seek point, not meant to be shown.
    """

    catchup: bool = False


@dataclass
class ReceiverStats:
    """Live and total numbers of a receiver: bytes, frames, latency, damage."""

    started: float = field(default_factory=time.perf_counter)
    bytes: int = 0
    frames: int = 0
    catchup_frames: int = 0
    segments: int = 0
    latencies: list[float] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    window_s: float = 2.0
    _recent_bytes: deque = field(default_factory=deque, repr=False)
    _recent_frames: deque = field(default_factory=deque, repr=False)

    def _trim(self, now: float) -> None:
        for q in (self._recent_bytes, self._recent_frames):
            while q and q[0][0] < now - self.window_s:
                q.popleft()

    def on_bytes(self, n: int, now: float) -> None:
        self.bytes += n
        self._recent_bytes.append((now, n))
        self._trim(now)

    def on_segment(self, seg: ReceivedSegment) -> None:
        self.segments += 1
        if seg.catchup:  # regenerated to reach a seek point, never shown: not part of the frame rate
            self.catchup_frames += seg.frames.shape[0]
            return
        self.frames += seg.frames.shape[0]
        self.latencies.append(seg.latency)
        self._recent_frames.append((seg.ready, seg.frames.shape[0]))
        self._trim(seg.ready)

    def live_fps(self) -> float:
        """Frames per second over the last ``window_s`` seconds."""
        now = time.perf_counter()
        self._trim(now)
        span = min(self.window_s, now - self.started)
        return sum(n for _, n in self._recent_frames) / span if span > 0 else 0.0

    def live_kbps(self) -> float:
        """Received kbit/s (all bytes of the prompt stream) over the last ``window_s`` seconds."""
        now = time.perf_counter()
        self._trim(now)
        span = min(self.window_s, now - self.started)
        return 8 * sum(n for _, n in self._recent_bytes) / span / 1000 if span > 0 else 0.0

    def latency_ms(self, q: float = 0.5) -> float:
        """A quantile (0.5 = median) of the per-segment latency in ms; nan before any segment."""
        return 1000 * quantile(self.latencies, q)

    def summary(self) -> str:
        dt = time.perf_counter() - self.started
        catchup = f" (and {self.catchup_frames} regenerated unseen to reach the start)" if self.catchup_frames else ""
        return (f"{self.frames} frames{catchup} in {dt:.1f} s ({self.frames / dt if dt else 0:.1f} fps), "
                f"{self.bytes} bytes ({8 * self.bytes / dt / 1000 if dt else 0:.1f} kbit/s), latency median "
                f"{self.latency_ms(0.5):.1f} ms, p95 {self.latency_ms(0.95):.1f} ms, "
                f"{len(self.damage)} damaged or lost records")


def backend_decoders(models, backend: str = "auto", device=None, *,
                     engine_dir: str = DEFAULT_ENGINE_DIR) -> Callable[[Header], Decoder]:
    """``decoder_for(header)``: a Decoder over ``models`` with a backend made for the clip
    (:func:`promptus.backends.backend_for_clip`; one per distinct batch and size, reused)."""
    from ..backends import backend_for_clip, clip_batch, resolve_device

    dev = resolve_device(device)
    cache: dict[tuple, Decoder] = {}

    def decoder_for(header: Header) -> Decoder:
        key = (clip_batch(header), header.width, header.height)
        if key not in cache:
            b = backend_for_clip(header, models, name=backend, device=dev, engine_dir=engine_dir)
            cache[key] = Decoder(b, models.identity())
        return cache[key]

    return decoder_for


def quantile(values, q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation); nan for none."""
    if not len(values):
        return float("nan")
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


_CLOSED = object()


class Receiver:
    """Receives a prompt stream from ``url`` (``ws://host:port/ws/prompts/CLIP``) and decodes it.

    Give ``decoder_for`` (see :func:`backend_decoders`) or ``models`` (+ ``backend``,
    ``device``). Iterate with ``async for``; :attr:`stats` fills as it goes.
    ``BitstreamError`` when the header or init latent is damaged, ``PromptusError``
    when the server reports an error or cannot be reached.
    """

    def __init__(self, url: str, *, models=None, backend: str = "auto", device=None,
                 decoder_for: Callable[[Header], Decoder] | None = None, max_message: int = MAX_PIECE_BYTES,
                 open_timeout: float = 10.0):
        if decoder_for is None:
            if models is None:
                raise PromptusError("Receiver needs models (or decoder_for) to decode with")
            decoder_for = backend_decoders(models, backend, device)
        self.url = url
        self.decoder_for = decoder_for
        self.max_message = max_message
        self.open_timeout = open_timeout
        self.reader = ConcealingReader()
        self.stats = ReceiverStats(damage=self.reader.damage)
        self.header: Header | None = None
        self.start_keyframe = 0
        self._ws = None

    def __aiter__(self) -> AsyncIterator[ReceivedSegment]:
        return self.segments()

    async def seek(self, keyframe: int) -> None:
        """Ask the server to restart the stream at keyframe ``keyframe`` (by position)."""
        if self._ws is None:
            raise PromptusError("not connected")
        await self._ws.send(control({"type": "seek", "keyframe": int(keyframe)}))

    async def segments(self) -> AsyncIterator[ReceivedSegment]:
        """Segments in order as they are decoded."""
        try:
            from websockets.asyncio.client import connect
            from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
        except ImportError as e:
            raise PromptusError("the receiver needs the 'websockets' package: pip install 'promptus[serve]'") from e
        try:
            ws = await connect(self.url, max_size=self.max_message, open_timeout=self.open_timeout,
                               compression=None)
        except (OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError) as e:
            raise PromptusError(f"cannot open the stream {self.url}: {e}") from None
        self._ws = ws
        queue: asyncio.Queue = asyncio.Queue(maxsize=1024)

        async def read():
            try:
                async for msg in ws:
                    await queue.put((msg, time.perf_counter()))
            except ConnectionClosed:
                pass
            finally:
                await queue.put((_CLOSED, time.perf_counter()))

        reader = asyncio.create_task(read())
        # One decoding thread: segments stay in order and the event loop keeps reading.
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="promptus-receiver")
        loop = asyncio.get_running_loop()
        state: ClipState | None = None
        try:
            while True:
                msg, arrived = await queue.get()
                if msg is _CLOSED:
                    break
                if isinstance(msg, str):
                    self._on_control(msg)
                    continue
                self.stats.on_bytes(len(msg), arrived)
                for item in self.reader.feed(msg):
                    if isinstance(item, Header):
                        self.header, state = item, None
                    elif isinstance(item, InitLatent):
                        decoder = self.decoder_for(self.header)
                        state = await loop.run_in_executor(executor, decoder.start, self.header, item)
                    else:
                        concealed = isinstance(item, Concealed)
                        kf = item.keyframe if concealed else item
                        start, frames = await loop.run_in_executor(executor, _decode, state, kf)
                        seg = ReceivedSegment(start, frames, arrived, time.perf_counter(), concealed,
                                              catchup=start + frames.shape[0] - 1 < self.start_frame)
                        self.stats.on_segment(seg)
                        yield seg
                if self.reader.ended:
                    break
        finally:
            reader.cancel()
            await ws.close()
            self._ws = None
            self.reader.finish()
            executor.shutdown(wait=True)

    @property
    def start_frame(self) -> int:
        """The first frame meant to be shown (the seek point)."""
        return self.start_keyframe * (self.header.interval if self.header else 0)

    def _on_control(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            log.warning("ignoring a malformed message from the server")
            return
        if msg.get("type") == "error":
            raise PromptusError(f"the server says: {msg.get('message')}")
        if msg.get("type") == "start":
            self.start_keyframe = int(msg.get("start", 0))


def _decode(state: ClipState, keyframe) -> tuple[int, torch.Tensor]:
    seg = state.push(keyframe)
    frames = seg.frames
    return seg.start, frames.cpu() if frames.device.type != "cpu" else frames


def receive(url: str, **kwargs) -> Receiver:
    """``async for seg in receive(url, models=...)``: see :class:`Receiver`."""
    return Receiver(url, **kwargs)
