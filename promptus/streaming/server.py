"""The prompt-streaming server: a FastAPI app over one folder of .promptus files.

Routes (``create_app(root, ...)``), each group in its own module of :mod:`.routes`:

* ``GET /`` — the browser viewer (``static/index.html``);
* ``GET /api/clips`` — the clips under the root with their header and bitrates;
  ``GET /api/status`` — streams, capacity per device and in total, limits;
  ``GET /api/ready?fps=F`` — 200 when one more viewer at F frames/s would be served in
  real time, else 503 (for load balancers; docs/serving.md);
* ``GET /files/{name}`` — any file under the root, with HTTP range requests
  (:mod:`.routes.http`);
* ``WS /ws/prompts/{name}`` — the prompt stream (:mod:`promptus.streaming.wire`,
  :mod:`.routes.prompts`);
* ``WS /ws/view/{name}`` — frames regenerated on the server, as JPEG messages (:mod:`.routes.view`);
* ``POST /api/webrtc/{name}`` — the same frames as a WebRTC video track (:mod:`.routes.webrtc_offer`).

Everything served comes from under the root (:class:`ClipLibrary`); every client is
bounded (:class:`~promptus.config.ServerConfig`: slots, bytes queued, messages per
second, JSON size and depth) and a client that does not read is dropped without
stalling others (:mod:`.clients`). Other apps (the Studio) mount themselves into
the returned app; the routes' shared state is ``app.state.promptus`` (a
:class:`StreamingState`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from ..config import ServerConfig
from ..errors import PromptusError

try:  # at module level: FastAPI resolves the routes' annotations in their modules' globals
    from fastapi import FastAPI
except ImportError as e:
    raise PromptusError("the streaming server needs FastAPI: pip install 'promptus[serve]'") from e

from .clients import ClientSlots, TaskOwner, TransportMiddleware
from .devices import SchedulerPool, capacity_status, ready
from .library import ClipLibrary
from .routes import http, prompts, view, webrtc_offer
from .scheduler import StreamScheduler

log = logging.getLogger(__name__)

#: The server's bounds; the name the server had before they moved to :mod:`promptus.config`.
ServerLimits = ServerConfig


@dataclass
class StreamingState:
    """What the routes share: the library, the scheduler (one device's or a pool's), the bounds, the clients
    and the app's own tasks."""

    library: ClipLibrary
    scheduler: StreamScheduler | SchedulerPool | None
    limits: ServerConfig
    realtime: bool = True
    slots: ClientSlots = None  # type: ignore[assignment]
    webrtc: set = field(default_factory=set)
    tasks: TaskOwner = field(default_factory=lambda: TaskOwner("server"))
    on_stopping: list = field(default_factory=list)  # called in the event loop when the server begins to stop
    on_shutdown: list = field(default_factory=list)  # callables run when the app stops (the Studio's clean-up)

    def __post_init__(self) -> None:
        if self.slots is None:
            self.slots = ClientSlots(self.limits.max_clients)

    @property
    def clients(self) -> int:
        return self.slots.count

    @property
    def served(self) -> int:
        return self.slots.served

    def status(self) -> dict:
        return {"clients": self.clients, "served": self.served, "max_clients": self.limits.max_clients,
                **capacity_status(self.scheduler), "webrtc": webrtc_offer.webrtc_available()[1]}

    def ready(self, rate: float) -> tuple[bool, str]:
        """Whether one more viewer at ``rate`` frames/s would be served in real time now, and why (not)."""
        if self.clients >= self.limits.max_clients:
            return False, f"the server has {self.clients} clients, its limit"
        return ready(self.scheduler, rate)


def create_app(root, *, decoder_for=None, scheduler: StreamScheduler | SchedulerPool | None = None,
               realtime: bool = True, limits: ServerConfig | None = None, calibrate: bool = True):
    """The server's FastAPI app for the .promptus files under ``root``.

    ``decoder_for(header) -> Decoder`` (see :func:`promptus.streaming.backend_decoders`)
    lets the server regenerate frames for the browser viewer; without it (and
    without ``scheduler``) only prompt streams and files are served; a
    :class:`~promptus.streaming.devices.SchedulerPool` as ``scheduler`` decodes on
    several devices (``promptus serve --devices``). ``realtime``
    paces prompt streams at the clip's frame rate (a client may ask ``pace=fast``).
    With ``calibrate`` the scheduler measures the device on the first clip at start-up
    (and again whenever it has been idle ``limits.recalibrate_idle_s``).
    """
    limits = limits or ServerConfig()
    library = ClipLibrary(root, max_file_bytes=limits.max_file_bytes)
    if scheduler is None and decoder_for is not None:
        scheduler = StreamScheduler(decoder_for, max_streams=limits.max_clients, headroom=limits.headroom)
    state = StreamingState(library, scheduler, limits, realtime)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if scheduler is not None:
            scheduler.start()
            if calibrate:
                await asyncio.to_thread(_calibrate, state)
        try:
            yield
        finally:
            for session in list(state.webrtc):
                await session.close()
            await state.tasks.aclose()
            if scheduler is not None:
                await asyncio.to_thread(scheduler.stop)
            for stop in state.on_shutdown:
                try:
                    await asyncio.to_thread(stop)
                except Exception as e:  # noqa: BLE001 - one failing clean-up must not skip the others
                    log.warning("shutdown: %s failed: %s", getattr(stop, "__qualname__", stop), e)

    app = FastAPI(title="Promptus streaming", lifespan=lifespan)
    app.state.promptus = state
    app.add_middleware(TransportMiddleware, config=limits)
    for module in (http, prompts, view, webrtc_offer):
        app.include_router(module.router)
    http.mount_static(app)
    return app


def _calibrate(state: StreamingState) -> None:
    """Measure the device on the first clip that parses (warms up the backend, too)."""
    for name in state.library.names():
        try:
            clip = state.library.clip(name)
            if len(clip.keyframes) >= 2:
                state.scheduler.calibrate(clip.header, clip.init, clip.keyframes,
                                          again_after=state.limits.recalibrate_idle_s)
                return
        except PromptusError as e:
            log.info("not calibrating on %s: %s", name, e)
    log.info("no clip to calibrate on; the first stream measures the device")


def run_server(app, *, host: str, port: int, **uvicorn_kwargs) -> None:
    """Serve ``app`` with uvicorn until Ctrl-C or SIGTERM, then shut down within ``shutdown_timeout_s``.

    Before uvicorn waits for open connections, ``state.on_stopping`` runs: a page's
    endless streams (the Studio's heartbeat) end then, instead of being cut with a
    traceback; the app's shutdown (``on_shutdown``: the Studio's files) runs after.
    """
    import uvicorn

    state: StreamingState = app.state.promptus

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            for stop in state.on_stopping:
                try:
                    stop()
                except Exception as e:  # noqa: BLE001 - the others must still run
                    log.warning("stopping: %s failed: %s", getattr(stop, "__qualname__", stop), e)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, ws_max_size=state.limits.max_control_bytes,
                            timeout_graceful_shutdown=state.limits.shutdown_timeout_s, **uvicorn_kwargs)
    Server(config).run()
