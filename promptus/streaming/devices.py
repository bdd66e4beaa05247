"""One server, every GPU: a stream scheduler per decoding device, new streams where capacity is free.

A :class:`SchedulerPool` keeps one :class:`~promptus.streaming.scheduler.StreamScheduler`
per device (its own worker thread, decoders and backends) and offers the server the
scheduler's own interface (``start``, ``stop``, ``calibrate``, ``admit``, ``open``,
``streams``, ``load``, ``capacity``). ``open`` places a new stream on the least loaded
device that can serve it in real time: the lowest share of its usable capacity
already promised (``load / (headroom × capacity)``), then the fewest streams, then
the first in the list. Each device keeps its own earliest-deadline order and its own
capacity measurement; a viewer is refused only when no device has room, and is
offered the largest rate that one device still has free.

:func:`capacity_status` is the decoding part of the server's ``/api/status`` for one
scheduler or a pool (totals plus one entry per device) and :func:`ready` the answer
of ``/api/ready``, which a load balancer in front of several machines polls
(docs/serving.md).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import threading
from collections.abc import Sequence

import torch

from ..bitstream import Header, InitLatent, Keyframe
from ..config import DEFAULT_ENGINE_DIR
from ..errors import PromptusError
from .scheduler import Admission, AdmissionError, StreamHandle, StreamScheduler, on_device

log = logging.getLogger(__name__)


class SchedulerPool:
    """Streams over several devices, one :class:`StreamScheduler` each (see the module docstring).

    Build it with :func:`scheduler_pool` (models and backends on every device) or from
    schedulers made by hand. Every stream of the pool's schedulers must be opened
    through the pool, which decides placement under one lock.
    """

    def __init__(self, schedulers: Sequence[StreamScheduler]):
        if not schedulers:
            raise PromptusError("a scheduler pool needs at least one device")
        self.schedulers = list(schedulers)
        self._lock = threading.Lock()
        self._warm: set[tuple[int, tuple]] = set()  # (device, clip shape) whose decoder is built

    # -- lifecycle

    def start(self) -> "SchedulerPool":
        for s in self.schedulers:
            s.start()
        return self

    def stop(self) -> None:
        for s in self.schedulers:
            s.stop()

    def __enter__(self) -> "SchedulerPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def calibrate(self, header: Header, init: InitLatent, keyframes: list[Keyframe], *, rounds: int = 3,
                  again_after: float | None = None) -> float:
        """Measure every device on this clip, one after the other (:meth:`StreamScheduler.calibrate`;
        with ``again_after`` each device measures itself again when idle); returns the total frames/s."""
        for i, s in enumerate(self.schedulers):
            s.calibrate(header, init, keyframes, rounds=rounds, again_after=again_after)
            with self._lock:
                self._warm.add((i, _shape(header)))
            log.info("device %d (%s): %.0f frames/s", i, s.device, s.capacity)
        return self.capacity

    # -- the numbers the server shows (the sums over the devices)

    @property
    def headroom(self) -> float:
        return self.schedulers[0].headroom

    @property
    def capacity(self) -> float:
        """Frames/s of the measured devices together (nan while none is measured)."""
        caps = [s.capacity for s in self.schedulers if not math.isnan(s.capacity)]
        return float(sum(caps)) if caps else math.nan

    @property
    def load(self) -> float:
        return float(sum(s.load for s in self.schedulers))

    @property
    def streams(self) -> int:
        return sum(s.streams for s in self.schedulers)

    # -- placement

    def order(self) -> list[int]:
        """Device indices, least loaded first (unmeasured devices count as free)."""
        def key(i: int):
            s = self.schedulers[i]
            usable = s.headroom * s.capacity
            share = s.load / usable if usable > 0 else (0.0 if math.isnan(usable) else math.inf)
            return share, s.streams, i

        return sorted(range(len(self.schedulers)), key=key)

    def admit(self, rate: float) -> Admission:
        """Where a stream at ``rate`` frames/s would go now (no side effect); refused when no device has room."""
        with self._lock:
            refusals = []
            for i in self.order():
                adm = self.schedulers[i].admit(rate)
                if adm.admitted:
                    return dataclasses.replace(adm, device=i)
                refusals.append((i, adm))
            return self._refusal(rate, refusals)

    def open(self, header: Header, init: InitLatent, *, rate: float | None = None, accept_lower: bool = False,
             force: bool = False) -> StreamHandle:
        """Open a stream on the least loaded device that serves it in real time; the handle's
        ``admission.device`` says which. ``accept_lower`` takes the device with the most frames/s
        free when none has room for real time; ``force`` the least loaded one regardless. Raises
        :class:`AdmissionError` (with the totals) when no device can take it."""
        rate = float(rate or header.fps)
        shape = _shape(header)
        for _ in range(2 * len(self.schedulers) + 2):
            with self._lock:  # one placement at a time
                i, mode = self._place(rate, accept_lower, force)
                s = self.schedulers[i]
                if (i, shape) in self._warm:
                    try:
                        return self._placed(s.open(header, init, rate=rate, accept_lower=mode == "lower",
                                                   force=mode == "force"), i)
                    except AdmissionError:  # its capacity was measured lower meanwhile: place again
                        continue
            # A shape this device has not decoded yet: its backend is built (maybe for minutes)
            # outside the lock, so that other viewers are placed meanwhile; then place again.
            with on_device(s.device):
                s.decoder_for(header)
            with self._lock:
                self._warm.add((i, shape))
        raise PromptusError("could not place the stream: the devices' measured capacity kept changing; try again")

    def _place(self, rate: float, accept_lower: bool, force: bool) -> tuple[int, str]:
        """The device for one more stream at ``rate`` and how it is admitted ("realtime", "force",
        "lower"); AdmissionError when none can take it. Call under the lock."""
        refusals: list[tuple[int, Admission]] = []
        for i in self.order():
            adm = self.schedulers[i].admit(rate)
            if adm.admitted:
                return i, "realtime"
            refusals.append((i, adm))
        if force:
            return self.order()[0], "force"
        if accept_lower:
            i, best = max(refusals, key=lambda r: r[1].offer)
            s = self.schedulers[i]
            if best.offer >= s.min_rate_fraction * rate and best.streams < s.max_streams:
                return i, "lower"
        raise AdmissionError(self._refusal(rate, refusals))

    @staticmethod
    def _placed(handle: StreamHandle, device: int) -> StreamHandle:
        handle.admission = dataclasses.replace(handle.admission, device=device)
        return handle

    def _refusal(self, rate: float, refusals: list[tuple[int, Admission]]) -> Admission:
        """The pool's answer when every device refused: the totals, and the largest offer of one device."""
        if len(self.schedulers) == 1:
            return refusals[0][1]
        n, load, cap = self.streams, self.load, self.capacity
        offer = max(a.offer for _, a in refusals)
        if all(a.streams >= self.schedulers[i].max_streams for i, a in refusals):
            reason = f"every device already serves as many streams as it may ({n} in all); try again later"
        elif n == 0:
            reason = (f"no device decodes {rate:g} frames/s in real time: the most one of the {len(self.schedulers)} "
                      f"devices has usable is {offer:.1f} frames/s; watch at that rate (slower than real time)")
        else:
            kinds = {getattr(getattr(sc, "device", None), "type", None) for sc in self.schedulers}
            word = "GPU" if kinds == {"cuda"} else "device"  # never "GPU" on a CPU server
            reason = (f"every {word} is busy: {n} streams take {load:.0f} of the {cap:.0f} frames/s that the "
                      f"{len(self.schedulers)} devices sustain ({100 * self.headroom:.0f}% usable); the most one "
                      f"device has free is {offer:.1f} frames/s: watch at that rate (slower than real time) or "
                      "try again later")
        return Admission(False, 0.0, rate, cap, load, n, reason, offer)


def _shape(header: Header) -> tuple:
    """What a device's decoder is built for (backend_decoders makes one per interval and size)."""
    return header.interval, header.width, header.height


def replicate_models(models, devices: Sequence[torch.device]) -> list:
    """``models`` on each of ``devices``: itself where it already is, else an exact copy moved there
    (so every device decodes with the same weights and model digest). Repeated devices share one copy."""
    here = torch.device(models.device)
    copies = {}
    for dev in devices:
        dev = torch.device(dev)
        if str(dev) not in copies:
            copies[str(dev)] = models if dev == here else copy.deepcopy(models).to(dev)
    return [copies[str(torch.device(d))] for d in devices]


def scheduler_pool(models, devices: Sequence[torch.device], *, backend: str = "auto",
                   engine_dir: str = DEFAULT_ENGINE_DIR, **options) -> SchedulerPool:
    """A :class:`SchedulerPool` over ``devices``: ``models`` replicated on each, decoders made with
    ``backend`` (:func:`~promptus.streaming.receiver.backend_decoders`), ``options`` passed to
    every :class:`StreamScheduler` (headroom, max_streams, ...)."""
    from .receiver import backend_decoders

    per_device = replicate_models(models, devices)
    return SchedulerPool([StreamScheduler(backend_decoders(m, backend, d, engine_dir=engine_dir), device=d, **options)
                          for m, d in zip(per_device, devices)])


def members(scheduler: StreamScheduler | SchedulerPool | None) -> list[StreamScheduler]:
    """The per-device schedulers behind what the server holds (none without a viewer)."""
    if scheduler is None:
        return []
    return list(scheduler.schedulers) if isinstance(scheduler, SchedulerPool) else [scheduler]


def device_status(scheduler: StreamScheduler, index: int) -> dict:
    """One device's entry of ``/api/status``: frames/s measured, usable, promised and free; streams."""
    cap = scheduler.capacity
    measured = not math.isnan(cap)
    usable = scheduler.headroom * cap if measured else None
    load = scheduler.load
    return {"index": index, "device": None if scheduler.device is None else str(scheduler.device),
            "streams": scheduler.streams, "max_streams": scheduler.max_streams,
            "capacity": cap if measured else None, "usable": usable, "load": load,
            "free": max(0.0, usable - load) if measured else None,
            "utilisation": load / usable if measured and usable > 0 else None,
            "frames": scheduler.frames, "busy_s": scheduler.busy_s}


def capacity_status(scheduler: StreamScheduler | SchedulerPool | None) -> dict:
    """The decoding part of ``/api/status``: totals over the devices and one entry per device.

    Totals: ``streams``, ``capacity`` (measured frames/s, None before any measurement),
    ``usable`` (× headroom), ``load`` (frames/s promised), ``free`` (usable − load),
    ``max_stream_fps`` (the largest rate one more stream can get in real time: the most
    any single device has free), ``utilisation`` (load / usable), ``headroom``.
    """
    devices = [device_status(s, i) for i, s in enumerate(members(scheduler))]
    measured = [d for d in devices if d["capacity"] is not None]
    unmeasured = len(devices) - len(measured)
    usable = sum(d["usable"] for d in measured) if measured else None
    load = float(sum(d["load"] for d in devices))
    return {
        "viewer": scheduler is not None, "streams": sum(d["streams"] for d in devices),
        "capacity": sum(d["capacity"] for d in measured) if measured else None, "usable": usable, "load": load,
        "free": sum(d["free"] for d in measured) if measured else None,
        # an unmeasured device admits any stream: it is measured by its first segments
        "max_stream_fps": None if unmeasured or not devices else max(d["free"] for d in devices),
        "utilisation": load / usable if usable else None,
        "headroom": scheduler.headroom if scheduler is not None else None,
        "devices": devices,
    }


def ready(scheduler: StreamScheduler | SchedulerPool | None, rate: float) -> tuple[bool, str]:
    """Whether one more stream at ``rate`` frames/s would be served in real time now, and why (not)."""
    if scheduler is None:
        return True, "no viewer: prompt streams and files only"
    adm = scheduler.admit(rate)
    return adm.admitted, adm.reason
