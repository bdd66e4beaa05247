"""Prompt streaming: a server, a real-time receiver, a browser viewer, one GPU for many streams.

* :func:`create_app` — the FastAPI server over a folder of .promptus files
  (needs the ``serve`` extra);
* :class:`Receiver` / :func:`receive` — an async iterator of decoded segments from a
  stream URL, concealing damaged records;
* :class:`StreamScheduler` — fair real-time sharing of one decoding device with
  admission control; :class:`SchedulerPool` — one per device, new streams where capacity is free;
* :mod:`.wire` — the message format (the .promptus records themselves).

Importing this package needs only the core dependencies; FastAPI, websockets and
aiortc are imported where they are used.
"""

from .devices import SchedulerPool
from .library import Clip, ClipForbidden, ClipLibrary, ClipNotFound
from .receiver import ReceivedSegment, Receiver, ReceiverStats, backend_decoders, receive
from .scheduler import Admission, AdmissionError, ProducedSegment, StreamHandle, StreamScheduler
from .wire import ConcealingReader, Damage


def create_app(root, **kwargs):
    """The streaming server's FastAPI app (see :func:`promptus.streaming.server.create_app`)."""
    from .server import create_app as _create_app

    return _create_app(root, **kwargs)


__all__ = [
    "Admission", "AdmissionError", "Clip", "ClipForbidden", "ClipLibrary", "ClipNotFound", "ConcealingReader",
    "Damage", "ProducedSegment", "ReceivedSegment", "Receiver", "ReceiverStats", "SchedulerPool", "StreamHandle",
    "StreamScheduler", "backend_decoders", "create_app", "receive",
]
