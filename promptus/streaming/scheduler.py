"""One GPU, many streams: fair real-time scheduling and admission control.

Every stream is a :class:`~promptus.decoder.ClipState` plus the keyframes that have
arrived for it. One worker thread owns the device and runs one segment step at a
time, always for the stream whose next frame must be shown first (earliest
deadline first): a stream's deadline is the display time of its next frame,
``origin + (frame − first frame) / rate``. A stream whose consumer has not taken
its finished segments is skipped, so a slow viewer never holds up the others.

Admission control keeps promises it can keep: the scheduler measures how many
frames per second the device sustains (``capacity``, from full segments, the
first ones of :meth:`StreamScheduler.calibrate`) and admits a new stream at its
real-time rate only while the rates already promised plus this one stay under
``headroom × capacity``. Otherwise the viewer is refused and told the rate that is
left, which it may accept (the clip then plays slower than real time) instead of
every stream stalling. A capacity measured under load (other work on the machine)
would refuse viewers long after the load is gone: with no stream open, the worker
measures the device again once the last measurement is ``again_after`` seconds old.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..bitstream import Header, InitLatent, Keyframe
from ..config import ServerConfig
from ..decoder import ClipState, Decoder
from ..errors import PromptusError

log = logging.getLogger(__name__)

_SERVER = ServerConfig()


@dataclass(frozen=True)
class Admission:
    """The scheduler's answer to a viewer asking for a stream at ``requested`` frames/s.

    ``rate`` is what it may have (0 when refused); ``capacity`` the measured frames/s
    of the device (``nan`` before any measurement), ``load`` the frames/s already
    promised to ``streams`` open streams and ``offer`` the frames/s still free for one
    more stream (at a lower rate than asked, when refused). ``device``: the index of the
    device that took the stream, on a server with several (None with one).
    """

    admitted: bool
    rate: float
    requested: float
    capacity: float
    load: float
    streams: int
    reason: str
    offer: float = 0.0
    device: int | None = None

    @property
    def realtime(self) -> bool:
        return self.admitted and self.rate >= self.requested

    def to_dict(self) -> dict:
        return {"admitted": self.admitted, "rate": self.rate, "requested": self.requested, "realtime": self.realtime,
                "capacity": None if math.isnan(self.capacity) else self.capacity, "load": self.load,
                "streams": self.streams, "offer": self.offer, "reason": self.reason, "device": self.device}


class AdmissionError(PromptusError):
    """The device cannot take one more stream; ``admission`` says what rate is left."""

    def __init__(self, admission: Admission):
        super().__init__(admission.reason)
        self.admission = admission


@dataclass(frozen=True)
class ProducedSegment:
    """A decoded segment of one stream: frames ``start .. start+n−1`` as host uint8 N×H×W×3.

    ``arrived`` is when its closing keyframe was pushed, ``ready`` when its frames were
    on the host (both ``time.perf_counter()``); ``concealed`` marks a held prompt.
    """

    start: int
    frames: torch.Tensor
    arrived: float
    ready: float
    concealed: bool = False

    @property
    def stop(self) -> int:
        return self.start + self.frames.shape[0]

    @property
    def latency(self) -> float:
        """Seconds from the closing keyframe's arrival to frames on the host."""
        return self.ready - self.arrived


class StreamHandle:
    """One admitted stream: push keyframes in (any thread), take segments out.

    ``push`` never blocks; the producer paces itself (at most ``max_pending``
    keyframes may wait). ``get`` blocks a thread, ``aget`` awaits in an event loop;
    both return None after :meth:`end` once every segment is out, or after close.
    """

    def __init__(self, scheduler: "StreamScheduler", state: ClipState, rate: float, admission: Admission,
                 max_pending: int, max_queued: int):
        self.scheduler = scheduler
        self.state = state
        self.header = state.header
        self.rate = rate
        self.admission = admission
        self.max_pending = max_pending
        self.max_queued = max_queued
        self.pending: deque[tuple[Keyframe, float, bool]] = deque()
        self.out: deque[ProducedSegment] = deque()
        self.next_frame = 0  # first frame of the next segment
        self.origin: float | None = None  # display time of frame ``first_frame``
        self.first_frame = 0
        self.ended = False
        self.busy = False  # a keyframe of this stream is on the device
        self.closed = False
        self.error: BaseException | None = None
        self.frames_done = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    # -- producer side

    def push(self, keyframe: Keyframe, arrived: float | None = None, *, concealed: bool = False) -> None:
        """Queue ``keyframe`` (arrived at ``arrived``, ``time.perf_counter()``, now by default)."""
        arrived = time.perf_counter() if arrived is None else arrived
        with self.scheduler._cv:
            if self.closed:
                raise PromptusError("the stream is closed")
            if len(self.pending) >= self.max_pending:
                raise PromptusError(f"more than {self.max_pending} keyframes wait for the decoder: "
                                    "the producer must pace the stream")
            if self.origin is None:
                self.origin = arrived
            self.pending.append((keyframe, arrived, concealed))
            self.scheduler._cv.notify_all()

    def end(self) -> None:
        """No more keyframes will come."""
        with self.scheduler._cv:
            self.ended = True
            self.scheduler._cv.notify_all()
        self._wake()

    def set_origin(self, origin: float, first_frame: int) -> None:
        """Frame ``first_frame`` is to be shown at ``origin`` (``time.perf_counter()``); sets the deadlines."""
        with self.scheduler._cv:
            self.origin, self.first_frame = origin, first_frame

    # -- consumer side

    def _pop(self) -> tuple[bool, ProducedSegment | None]:
        with self.scheduler._cv:
            if self.error is not None:
                raise self.error
            if self.out:
                seg = self.out.popleft()
                self.scheduler._cv.notify_all()  # room for the next segment
                return True, seg
            if self.closed or (self.ended and not self.pending and not self.busy):
                return True, None
            return False, None

    def get(self, timeout: float | None = None) -> ProducedSegment | None:
        """The next segment (blocking); None when the stream is over. TimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.scheduler._cv:
            while True:
                done, seg = self._pop()
                if done:
                    return seg
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("no segment in time")
                self.scheduler._cv.wait(left)

    async def aget(self) -> ProducedSegment | None:
        """The next segment, awaited in the running event loop; None when the stream is over."""
        if self._event is None:
            self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        while True:
            self._event.clear()
            done, seg = self._pop()
            if done:
                return seg
            await self._event.wait()

    def _wake(self) -> None:
        if self._loop is not None and self._event is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def close(self) -> None:
        """Leave the scheduler and free this stream's share of the device."""
        self.scheduler._remove(self)

    # -- scheduling

    def deadline(self) -> float:
        origin = self.origin if self.origin is not None else time.perf_counter()
        return origin + (self.next_frame - self.first_frame) / self.rate

    def runnable(self) -> bool:
        return bool(self.pending) and len(self.out) < self.max_queued and not self.closed


class StreamScheduler:
    """Shares one decoding device among streams (see the module docstring).

    ``decoder_for(header)`` returns the :class:`Decoder` for a clip (backends are
    specialised for the clip's interval and size; return the same one for equal
    headers). Use as a context manager, or call :meth:`start` / :meth:`stop`. ``device``
    (the decoders' device) is made the current CUDA device of the worker thread.
    """

    def __init__(self, decoder_for: Callable[[Header], Decoder], *, headroom: float = _SERVER.headroom,
                 max_streams: int = _SERVER.max_clients,
                 max_queued: int = 3, max_pending: int = 64, min_rate_fraction: float = 0.25, smoothing: float = 0.2,
                 device: torch.device | str | None = None):
        if not 0 < headroom <= 1:
            raise PromptusError(f"headroom={headroom} must lie in (0, 1]")
        self.decoder_for = decoder_for
        self.headroom = headroom
        self.max_streams = max_streams
        self.max_queued = max_queued
        self.max_pending = max_pending
        self.min_rate_fraction = min_rate_fraction
        self.smoothing = smoothing
        self.device = None if device is None else torch.device(device)
        self.capacity = math.nan  # frames/s the device sustains, measured
        self.busy_s = 0.0  # device time spent in segment steps
        self.frames = 0
        self._streams: list[StreamHandle] = []
        self._cv = threading.Condition()
        self._device = threading.Lock()  # one segment step on the device at a time
        self._thread: threading.Thread | None = None
        self._stop = False
        self._calibration: tuple | None = None  # (header, init, keyframes, rounds) to measure with again
        self.again_after = math.inf  # seconds; see calibrate()
        self.measured_at = -math.inf  # time.monotonic() of the last measurement

    def _device_word(self) -> str:
        """"GPU", "CPU" or "decoding device", for messages people read."""
        if self.device is None:
            return "decoding device"
        return "GPU" if self.device.type == "cuda" else self.device.type.upper()

    # -- lifecycle

    def start(self) -> "StreamScheduler":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="promptus-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for s in list(self._streams):
            self._remove(s)

    def __enter__(self) -> "StreamScheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- measurement

    def _observe(self, frames: int, seconds: float, full: bool) -> None:
        self.busy_s += seconds
        self.frames += frames
        if full and seconds > 0:
            self.measured_at = time.monotonic()
            fps = frames / seconds
            self.capacity = fps if math.isnan(self.capacity) else (
                (1 - self.smoothing) * self.capacity + self.smoothing * fps)

    def calibrate(self, header: Header, init: InitLatent, keyframes: list[Keyframe], *, rounds: int = 3,
                  again_after: float | None = None) -> float:
        """Decode ``rounds`` full segments of a clip (warming up the backend) and set ``capacity``
        to the median frames/s of all but the first; returns it.

        ``again_after`` (seconds): the worker repeats this measurement whenever no stream is
        open and the last measurement is older, so that capacity recovers after a load.
        """
        if again_after is not None:
            self._calibration, self.again_after = (header, init, keyframes, rounds), again_after
            self.measured_at = time.monotonic()  # measuring now: the worker need not
        with on_device(self.device):  # backends are built on the current CUDA device
            decoder = self.decoder_for(header)
        full = [kf for kf in keyframes[1:] if kf.index <= header.frame_count - 1]
        if not keyframes or not full:
            raise PromptusError("calibration needs a clip with at least one full segment")
        rates = []
        with self._device, on_device(self.device):
            for r in range(max(2, rounds)):
                if r % len(full) == 0:  # (re)start the clip: frame 0 first
                    state = decoder.start(header, init)
                    _host(state.push(keyframes[0]).frames)
                t0 = time.perf_counter()
                n = _host(state.push(full[r % len(full)]).frames).shape[0]
                rates.append(n / (time.perf_counter() - t0))
        self.capacity = float(np.median(rates[1:]))  # the first round warms up (graph capture, compilation)
        self.measured_at = time.monotonic()
        log.info("scheduler: the device sustains %.0f frames/s (%s)", self.capacity, decoder.backend.describe())
        return self.capacity

    # -- admission

    @property
    def load(self) -> float:
        """Frames/s promised to the open streams."""
        with self._cv:
            return sum(s.rate for s in self._streams)

    @property
    def streams(self) -> int:
        with self._cv:
            return len(self._streams)

    def admit(self, rate: float) -> Admission:
        """Whether a stream at ``rate`` frames/s can be served in real time now (no side effect)."""
        with self._cv:
            return self._admit(rate)

    def _admit(self, rate: float) -> Admission:
        if not rate > 0:
            raise PromptusError(f"a stream's rate must be positive, got {rate}")
        n, load, cap = len(self._streams), sum(s.rate for s in self._streams), self.capacity
        if n >= self.max_streams:
            return Admission(False, 0.0, rate, cap, load, n, f"the server already serves {n} streams, its limit")
        if math.isnan(cap):  # nothing measured yet: admit; the first segments measure the device
            return Admission(True, rate, rate, cap, load, n, "admitted (device not measured yet)", rate)
        budget = self.headroom * cap
        left = max(0.0, budget - load)
        if load + rate <= budget:
            return Admission(True, rate, rate, cap, load, n, "admitted in real time", left)
        return Admission(False, 0.0, rate, cap, load, n,
                         f"the {self._device_word()} is busy: {n} streams take {load:.0f} of the {cap:.0f} frames/s "
                         "it sustains "
                         f"({100 * self.headroom:.0f}% usable); one more at {rate:g} frames/s would make every "
                         f"stream late. {left:.1f} frames/s are free: watch at that rate (slower than real time) "
                         "or try again later", left)

    def open(self, header: Header, init: InitLatent, *, rate: float | None = None, accept_lower: bool = False,
             force: bool = False) -> StreamHandle:
        """Open a stream of the clip ``header`` at ``rate`` frames/s (the clip's fps by default).

        Raises :class:`AdmissionError` when the device cannot serve it in real time,
        unless ``accept_lower`` (then the stream gets the free rate, if at least
        ``min_rate_fraction`` of the request) or ``force`` (admitted regardless; the
        benchmark uses it to show what overload does).
        """
        rate = float(rate or header.fps)
        with on_device(self.device):
            decoder = self.decoder_for(header)
        with self._cv:
            adm = self._admit(rate)
            if not adm.admitted and not force:
                free = adm.offer
                if accept_lower and free >= self.min_rate_fraction * rate and adm.streams < self.max_streams:
                    adm = Admission(True, free, rate, adm.capacity, adm.load, adm.streams,
                                    f"admitted at {free:.1f} frames/s, slower than the clip's {rate:g} (GPU busy)",
                                    free)
                else:
                    raise AdmissionError(adm)
            elif not adm.admitted:
                adm = Admission(True, rate, rate, adm.capacity, adm.load, adm.streams, "forced past admission control",
                                adm.offer)
        with on_device(self.device):
            state = decoder.start(header, init)  # checks the model identity, uploads the init latent
        handle = StreamHandle(self, state, adm.rate, adm, self.max_pending, self.max_queued)
        with self._cv:
            self._streams.append(handle)
            self._cv.notify_all()
        return handle

    def _remove(self, handle: StreamHandle) -> None:
        with self._cv:
            handle.closed = True
            if handle in self._streams:
                self._streams.remove(handle)
            self._cv.notify_all()
        handle._wake()

    # -- the worker

    def _next(self) -> StreamHandle | None:
        ready = [s for s in self._streams if s.runnable()]
        return min(ready, key=StreamHandle.deadline) if ready else None

    def _stale(self) -> bool:
        """Idle, and the capacity is older than ``again_after``: time to measure again."""
        return (self._calibration is not None and not self._streams
                and time.monotonic() - self.measured_at > self.again_after)

    def _remeasure(self) -> None:
        header, init, keyframes, rounds = self._calibration
        before = self.capacity
        try:
            self.calibrate(header, init, keyframes, rounds=rounds)
        except Exception as e:  # noqa: BLE001 - the old measurement stays; try again later
            log.warning("scheduler: measuring the device again failed: %s", e)
            self.measured_at = time.monotonic()
            return
        log.info("scheduler: idle, measured the device again: %.0f frames/s (was %.0f)", self.capacity, before)

    def _run(self) -> None:
        with on_device(self.device):
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cv:
                job = self._next()
                while job is None and not self._stop and not self._stale():
                    self._cv.wait(min(0.5, max(0.01, self.again_after / 4)))
                    job = self._next()
                if self._stop:
                    return
                if job is not None:
                    keyframe, arrived, concealed = job.pending.popleft()
                    job.busy = True
            if job is None:  # idle and stale: measure again (streams opened meanwhile wait one calibration)
                self._remeasure()
                continue
            try:
                with self._device:
                    t0 = time.perf_counter()
                    seg = job.state.push(keyframe)
                    frames = _host(seg.frames)
                    ready = time.perf_counter()
                n = frames.shape[0]
                self._observe(n, ready - t0, full=n == job.header.interval)
                out = ProducedSegment(seg.start, frames, arrived, ready, concealed)
                with self._cv:
                    job.next_frame = out.stop
                    job.frames_done += n
                    job.busy = False
                    if not job.closed:
                        job.out.append(out)
                    self._cv.notify_all()
            except Exception as e:  # noqa: BLE001 - handed to that stream's consumer, the others go on
                log.warning("stream failed: %s", e)
                with self._cv:
                    job.error = e
                    job.busy = False
                    job.closed = True
                    if job in self._streams:
                        self._streams.remove(job)
                    self._cv.notify_all()
            job._wake()


def on_device(device: torch.device | None):
    """``device`` as the current CUDA device of this thread (CUDA graphs and streams follow it); else no-op."""
    return torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()


def _host(frames: torch.Tensor) -> torch.Tensor:
    """Frames on the host (waits for the device)."""
    return frames.cpu() if frames.device.type != "cpu" else frames
