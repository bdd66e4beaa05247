"""The prompt-streaming server: a FastAPI app over one folder of .promptus files.

Routes (``create_app(root, ...)``):

* ``GET /`` — the browser viewer (``static/index.html``);
* ``GET /api/clips`` — the clips under the root with their header and bitrates;
  ``GET /api/status`` — streams, device capacity, limits;
* ``GET /files/{name}`` — any file under the root, with HTTP range requests;
* ``WS /ws/prompts/{name}`` — the prompt stream (:mod:`promptus.streaming.wire`);
* ``WS /ws/view/{name}`` — frames regenerated on the server, as JPEG messages;
* ``POST /api/webrtc/{name}`` — the same frames as a WebRTC video track.

Everything served comes from under the root (:class:`ClipLibrary`); messages,
clients and queued frames are bounded (:class:`ServerLimits`); a client whose
sends block longer than ``send_timeout_s`` is dropped without stalling others.
Other apps (the Studio) mount themselves into the returned app; its state is
``app.state.promptus`` (a :class:`StreamingState`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PromptusError

try:  # at module level: FastAPI resolves the routes' annotations in this module's globals
    from fastapi import FastAPI, HTTPException, Request, WebSocket
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.websockets import WebSocketDisconnect
except ImportError as e:
    raise PromptusError("the streaming server needs FastAPI: pip install 'promptus[serve]'") from e

from .library import ClipForbidden, ClipLibrary, ClipNotFound
from .scheduler import AdmissionError, StreamScheduler
from .viewer import ViewSession, encode_jpeg, release_offset
from .wire import MAX_CONTROL_BYTES, control, parse_control

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
#: Binary frame message of /ws/view: u32 frame index, f32 latency so far (ms), then JPEG bytes.
FRAME_HEADER = struct.Struct("<If")


@dataclass(frozen=True)
class ServerLimits:
    """Bounds that keep one server healthy under many or misbehaving clients."""

    max_clients: int = 64  # open WebSockets and WebRTC sessions together
    send_timeout_s: float = 5.0  # a send blocked this long drops the client
    max_file_bytes: int = 256 << 20
    jpeg_quality: int = 85
    webrtc_connect_timeout_s: float = 20.0
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs for WebRTC across NATs (none: host candidates only)
    # WebRTC media on 127.0.0.1 only (both sides' candidates); the browser must offer loopback
    # candidates (Chromium: --allow-loopback-in-peer-connection), else the page uses WebSocket.
    webrtc_loopback: bool = False


@dataclass
class StreamingState:
    """What the app's routes share: the library, the scheduler, the counters."""

    library: ClipLibrary
    scheduler: StreamScheduler | None
    limits: ServerLimits
    realtime: bool = True
    clients: int = 0
    served: int = 0
    webrtc: set = field(default_factory=set)

    def status(self) -> dict:
        s = self.scheduler
        return {"clients": self.clients, "served": self.served, "max_clients": self.limits.max_clients,
                "viewer": s is not None, "streams": s.streams if s else 0,
                "capacity": None if s is None or s.capacity != s.capacity else s.capacity,
                "load": s.load if s else 0.0, "headroom": s.headroom if s else None,
                "webrtc": _webrtc_available()[1], "device": getattr(s, "device_kind", None)}


def _webrtc_available() -> tuple[bool, str]:
    try:
        import aiortc  # noqa: F401 - only whether it imports
    except ImportError:
        return False, "unavailable (aiortc is not installed)"
    return True, "available"


def create_app(root, *, decoder_for=None, scheduler: StreamScheduler | None = None, realtime: bool = True,
               limits: ServerLimits | None = None, calibrate: bool = True):
    """The server's FastAPI app for the .promptus files under ``root``.

    ``decoder_for(header) -> Decoder`` (see :func:`promptus.streaming.backend_decoders`)
    lets the server regenerate frames for the browser viewer; without it (and
    without ``scheduler``) only prompt streams and files are served. ``realtime``
    paces prompt streams at the clip's frame rate (a client may ask ``pace=fast``).
    With ``calibrate`` the scheduler measures the device on the first clip at start-up.
    """
    limits = limits or ServerLimits()
    library = ClipLibrary(root, max_file_bytes=limits.max_file_bytes)
    if scheduler is None and decoder_for is not None:
        scheduler = StreamScheduler(decoder_for, max_streams=limits.max_clients)
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
            if scheduler is not None:
                await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="Promptus streaming", lifespan=lifespan)
    app.state.promptus = state

    def lookup(name: str):
        try:
            return library.clip(name)
        except ClipNotFound as e:
            raise HTTPException(404, str(e)) from None
        except ClipForbidden as e:
            raise HTTPException(403, str(e)) from None
        except PromptusError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/clips")
    async def clips():
        return {"root": library.root.name, "clips": await asyncio.to_thread(library.list)}

    @app.get("/api/clips/{name:path}")
    async def clip_info(name: str):
        return (await asyncio.to_thread(lookup, name)).info()

    @app.get("/api/status")
    async def status():
        return state.status()

    @app.get("/files/{name:path}")
    async def files(name: str):
        try:
            path = library.resolve(name)
        except ClipNotFound as e:
            raise HTTPException(404, str(e)) from None
        except ClipForbidden as e:
            raise HTTPException(403, str(e)) from None
        media = "application/octet-stream" if path.suffix == ".promptus" else None
        return FileResponse(path, media_type=media, filename=path.name if media else None)

    # ------------------------------------------------------------- sockets

    async def refuse(ws: WebSocket, message: str, code: int = 1008) -> None:
        with contextlib.suppress(Exception):
            await ws.send_text(control({"type": "error", "message": message}))
            await ws.close(code)

    async def send(ws: WebSocket, data) -> None:
        coro = ws.send_bytes(data) if isinstance(data, bytes) else ws.send_text(data)
        await asyncio.wait_for(coro, limits.send_timeout_s)

    async def controls(ws: WebSocket, on_message) -> None:
        """Read the client's control messages until it leaves; garbage closes the socket."""
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(msg.get("code", 1000))
            text, data = msg.get("text"), msg.get("bytes")
            if data is not None and text is None:
                await refuse(ws, "binary data is not accepted from clients", 1003)
                raise WebSocketDisconnect(1003)
            if len(text) > MAX_CONTROL_BYTES:
                await refuse(ws, f"control message over {MAX_CONTROL_BYTES} bytes", 1009)
                raise WebSocketDisconnect(1009)
            try:
                await on_message(parse_control(text))
            except PromptusError as e:
                await refuse(ws, str(e))
                raise WebSocketDisconnect(1008) from None

    @contextlib.asynccontextmanager
    async def client_slot(ws: WebSocket):
        await ws.accept()
        if state.clients >= limits.max_clients:
            await refuse(ws, f"the server already has {state.clients} clients, its limit; try again later", 1013)
            yield False
            return
        state.clients += 1
        state.served += 1
        try:
            yield True
        finally:
            state.clients -= 1

    def query_int(ws: WebSocket, key: str, default: int) -> int:
        try:
            return int(ws.query_params.get(key, default))
        except ValueError:
            raise PromptusError(f"query parameter {key} must be an integer") from None

    @app.websocket("/ws/prompts/{name:path}")
    async def prompts(ws: WebSocket, name: str):
        async with client_slot(ws) as ok:
            if not ok:
                return
            try:
                clip = await asyncio.to_thread(library.clip, name)
                start = query_int(ws, "start", 0)
                pace = ws.query_params.get("pace", "realtime" if state.realtime else "fast")
                if pace not in ("realtime", "fast"):
                    raise PromptusError("pace is 'realtime' or 'fast'")
            except PromptusError as e:
                await refuse(ws, str(e))
                return
            restart: asyncio.Queue = asyncio.Queue()

            async def on_message(msg):
                if msg["type"] != "seek":
                    raise PromptusError(f"unknown control message {msg['type']!r}; this socket takes 'seek'")
                try:
                    k = int(msg.get("keyframe"))
                except (TypeError, ValueError):
                    raise PromptusError("seek needs an integer 'keyframe'") from None
                restart.put_nowait(k)

            async def stream(start: int):
                keyframes = len(clip.keyframes)
                start = max(0, min(start, keyframes - 1))
                h = clip.header
                await send(ws, control({"type": "start", "clip": clip.name, "start": start, "keyframes": keyframes,
                                        "frames": h.frame_count, "fps": h.fps, "bytes": clip.size, "pace": pace}))
                await send(ws, clip.pieces[0])
                await send(ws, clip.pieces[1])
                t0 = time.perf_counter()
                for p in range(keyframes):
                    if pace == "realtime":
                        delay = t0 + release_offset(p, start, h.interval, h.fps) - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await send(ws, clip.pieces[2 + p])
                for piece in clip.pieces[2 + keyframes:]:  # the end record, when the file has one
                    await send(ws, piece)
                if clip.error:
                    await send(ws, control({"type": "error", "message": f"the file is damaged: {clip.error}"}))

            reader = asyncio.create_task(controls(ws, on_message))
            sender = None
            try:
                while True:
                    sender = asyncio.create_task(stream(start))
                    seek = asyncio.create_task(restart.get())
                    done, _ = await asyncio.wait({sender, reader, seek}, return_when=asyncio.FIRST_COMPLETED)
                    if seek in done:
                        sender.cancel()
                        start = seek.result()
                        continue
                    seek.cancel()
                    if sender in done:
                        sender.result()
                        with contextlib.suppress(Exception):
                            await ws.close(1000)
                    else:
                        sender.cancel()
                    break
            except (asyncio.TimeoutError, TimeoutError):
                log.info("dropping a slow client of %s", name)
                with contextlib.suppress(Exception):
                    await ws.close(1008)
            except (WebSocketDisconnect, RuntimeError, OSError) as e:
                log.info("client of %s left: %s", name, e)
            finally:
                await _cancel(reader, sender)

    def open_session(name: str, params) -> ViewSession:
        if scheduler is None:
            raise PromptusError("this server has no model to regenerate frames with (start it with a --model)")
        clip = library.clip(name)
        try:
            rate = float(params.get("rate") or clip.header.fps)
            start = int(params.get("start") or 0)
        except (TypeError, ValueError):
            raise PromptusError("rate must be a number and start an integer") from None
        accept_lower = str(params.get("accept_lower", "0")).lower() in ("1", "true", "yes")
        return ViewSession(scheduler, clip, rate=rate, accept_lower=accept_lower, start=start)

    @app.websocket("/ws/view/{name:path}")
    async def view(ws: WebSocket, name: str):
        async with client_slot(ws) as ok:
            if not ok:
                return
            try:
                session = await asyncio.to_thread(open_session, name, ws.query_params)
            except AdmissionError as e:
                await send(ws, control({"type": "admission", **e.admission.to_dict()}))
                await refuse(ws, str(e), 1013)
                return
            except PromptusError as e:
                await refuse(ws, str(e))
                return
            session.transport, session.codec = "websocket", "jpeg"

            async def on_message(msg):
                if msg["type"] == "ping":
                    await send(ws, control({"type": "pong", "t": msg.get("t")}))
                else:
                    raise PromptusError(f"unknown control message {msg['type']!r}; this socket takes 'ping'")

            async def frames():
                await send(ws, control({"type": "hello", "clip": session.clip.info(), "transport": "websocket",
                                        "admission": session.admission.to_dict()}))
                last_stats = 0.0
                async for f in session.frames():
                    jpeg = await asyncio.to_thread(encode_jpeg, f.rgb, limits.jpeg_quality)
                    await send(ws, FRAME_HEADER.pack(f.index, 1000 * f.latency) + jpeg)
                    session.note_video_bytes(len(jpeg))
                    if time.perf_counter() - last_stats > 0.5:
                        last_stats = time.perf_counter()
                        await send(ws, control(session.stats()))
                await send(ws, control(session.stats()))
                await send(ws, control({"type": "end"}))

            reader = asyncio.create_task(controls(ws, on_message))
            sender = asyncio.create_task(frames())
            try:
                done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
                if sender in done:
                    sender.result()
                    with contextlib.suppress(Exception):
                        await ws.close(1000)
            except (asyncio.TimeoutError, TimeoutError):
                log.info("dropping a slow viewer of %s", name)
                with contextlib.suppress(Exception):
                    await ws.close(1008)
            except (WebSocketDisconnect, RuntimeError, OSError) as e:
                log.info("viewer of %s left: %s", name, e)
            except PromptusError as e:
                await refuse(ws, str(e), 1011)
            finally:
                await _cancel(reader, sender)
                session.close()

    @app.post("/api/webrtc/{name:path}")
    async def webrtc(name: str, request: Request):
        ok, why = _webrtc_available()
        if not ok:
            return JSONResponse({"error": f"WebRTC is {why}"}, status_code=501)
        if state.clients >= limits.max_clients:
            return JSONResponse({"error": "the server has as many clients as it takes; try again later"}, 503)
        try:
            body = await request.json()
            sdp, kind = body["sdp"], body["type"]
            if not isinstance(sdp, str) or len(sdp) > 64 * 1024:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "send JSON {sdp, type} of a WebRTC offer (at most 64 KiB)"}, 400)
        from .webrtc import WebRTCSession

        try:
            session = await asyncio.to_thread(open_session, name, body)
        except AdmissionError as e:
            return JSONResponse({"error": str(e), "admission": e.admission.to_dict()}, 503)
        except (ClipNotFound, ClipForbidden) as e:
            return JSONResponse({"error": str(e)}, 404 if isinstance(e, ClipNotFound) else 403)
        except PromptusError as e:
            return JSONResponse({"error": str(e)}, 422)
        rtc = WebRTCSession(session, limits.ice_servers, loopback_only=limits.webrtc_loopback)
        state.webrtc.add(rtc)
        state.clients += 1
        state.served += 1

        async def watch():
            try:
                await rtc.done.wait()
            finally:
                state.webrtc.discard(rtc)
                state.clients -= 1

        asyncio.ensure_future(watch())

        async def give_up():  # a browser that never connects must not hold a stream
            await asyncio.sleep(limits.webrtc_connect_timeout_s)
            if rtc.pc.connectionState != "connected":
                await rtc.close()

        asyncio.ensure_future(give_up())
        try:
            answer = await rtc.answer(sdp, kind)
        except Exception as e:  # noqa: BLE001 - a bad offer is the client's problem
            await rtc.close()
            return JSONResponse({"error": f"cannot answer this offer: {e}"}, 400)
        return {**answer, "clip": session.clip.info(), "admission": session.admission.to_dict()}

    return app


async def _cancel(*tasks) -> None:
    """Cancel ``tasks`` and collect their outcome (a client gone mid-send is no error to report)."""
    tasks = [t for t in tasks if t is not None]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _calibrate(state: StreamingState) -> None:
    """Measure the device on the first clip that parses (warms up the backend, too)."""
    for name in state.library.names():
        try:
            clip = state.library.clip(name)
            if len(clip.keyframes) >= 2:
                state.scheduler.calibrate(clip.header, clip.init, clip.keyframes)
                return
        except PromptusError as e:
            log.info("not calibrating on %s: %s", name, e)
    log.info("no clip to calibrate on; the first stream measures the device")
