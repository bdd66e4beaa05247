"""A pipelined decoder: parsing, generation and output overlap.

Three stages run at once, joined by bounded queues:

1. a reader thread parses bitstream items and dequantizes each keyframe's factors
   into pinned host memory (segment k+1 is ready before segment k finishes);
2. the calling thread uploads the factors and enqueues the segment step on the GPU
   (it never waits for the GPU);
3. with ``to_host=True`` each segment's frames are copied to pinned host buffers on
   a separate CUDA stream, and a writer thread waits for that copy and hands the
   frames to ``sink`` (a video writer, say) while the GPU runs the next segment.

With ``to_host=False`` the frames stay on the GPU and ``sink`` receives them there.
End-to-end throughput then approaches the GPU-only throughput.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable

import torch

from .bitstream import Header, InitLatent, Keyframe
from .decoder import Decoder

_DONE = object()


class _Worker(threading.Thread):
    """A thread that records its exception for the caller to re-raise."""

    def __init__(self, target, name):
        super().__init__(target=self._run, name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def _run(self):
        try:
            self._target_fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self.error = e


class PipelinedDecoder:
    """Decodes a stream of bitstream items with reading, GPU work and output overlapped.

    ``run(items, sink)`` returns the number of frames produced; ``sink(start, frames)``
    is called in frame order from the writer thread (host uint8 N×H×W×3 when
    ``to_host``, else device frames from the calling thread).
    """

    def __init__(self, decoder: Decoder, *, to_host: bool = True, depth: int = 3):
        self.decoder = decoder
        self.to_host = to_host
        self.depth = depth
        self.device = decoder.backend.device

    def run(self, items: Iterable[Header | InitLatent | Keyframe],
            sink: Callable[[int, torch.Tensor], None] | None = None) -> int:
        cuda = self.device.type == "cuda"
        parsed: queue.Queue = queue.Queue(maxsize=self.depth)
        outgoing: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(q, item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def read():
            try:
                for item in items:
                    if stop.is_set():
                        return
                    if isinstance(item, Keyframe):
                        U, V = item.U, item.V  # dequantized here, off the GPU thread
                        if cuda:
                            U, V = U.pin_memory(), V.pin_memory()
                        put(parsed, (item, (U, V)))
                    else:
                        put(parsed, (item, None))
            finally:
                put(parsed, _DONE)

        buffers: queue.Queue = queue.Queue()  # pinned host buffers to reuse

        def write():
            while True:
                job = outgoing.get()
                if job is _DONE:
                    return
                start, frames, event, buf = job
                if event is not None:
                    event.synchronize()
                if sink is not None:
                    sink(start, frames)
                if buf is not None:
                    buffers.put(buf)

        backend = self.decoder.backend
        # The graph-host-copy lever: the segment graph itself copies to pinned host buffers, in a ring longer
        # than the frames this pipeline can hold at once (queue + writer + the segment being made).
        in_graph = cuda and self.to_host and getattr(backend, "graph_host_copy", False)
        if in_graph:
            backend.host_ring = self.depth + 3
        reader = _Worker(read, "promptus-reader")
        writer = _Worker(write, "promptus-writer") if self.to_host else None
        copy_stream = torch.cuda.Stream(self.device) if cuda and self.to_host else None
        reader.start()
        if writer:
            writer.start()
        count = 0
        session = self.decoder.session()
        try:
            while True:
                job = parsed.get()
                if job is _DONE:
                    break
                item, factors = job
                if factors is not None:
                    factors = tuple(f.to(self.device, non_blocking=True) for f in factors)
                for seg in session.accept(item, factors):
                    count += seg.frames.shape[0]
                    if not self.to_host:
                        if sink is not None:
                            sink(seg.start, seg.frames)
                        continue
                    put(outgoing, self._to_host(seg, copy_stream, buffers))
                if writer is not None and writer.error is not None:
                    break
        finally:
            if writer:
                put(outgoing, _DONE)
                writer.join()
            stop.set()
            reader.join()
            if in_graph:
                backend.host_ring = 0
        for w in (reader, writer):
            if w is not None and w.error is not None:
                raise w.error
        if cuda and not self.to_host:
            torch.cuda.synchronize(self.device)
        return count

    def _to_host(self, seg, copy_stream, buffers: queue.Queue):
        frames = seg.frames
        if copy_stream is None:  # CPU: nothing to copy
            return seg.start, frames, None, None
        if frames.device.type == "cpu":  # the segment graph copied them (graph_host_copy): wait for its event
            return seg.start, frames, self.decoder.backend.host_ready, None
        buf = None
        while not buffers.empty():
            cand = buffers.get_nowait()
            if cand.shape == frames.shape:
                buf = cand
                break
        if buf is None:
            buf = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(copy_stream):
            buf.copy_(frames, non_blocking=True)
            frames.record_stream(copy_stream)  # keep the allocator from reusing it mid-copy
            event = torch.cuda.Event()
            event.record(copy_stream)
        return seg.start, buf, event, buf
