"""``POST /api/webrtc/{name}``: a browser's WebRTC offer in, the answer out; the frames as a video track.

The client slot is taken before anything else (request body, clip, admission) and
given back on every way out, so that concurrent offers cannot pass the limit.
The session is watched by a task the app owns: it frees the slot when the session
ends, and closes a session whose browser never connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...errors import PromptusError
from ..library import ClipForbidden, ClipNotFound
from ..scheduler import AdmissionError
from ..wire import load_client_json
from . import open_session, state_of

log = logging.getLogger(__name__)

router = APIRouter()

#: Longest SDP offer accepted (a browser's is a few kB).
MAX_SDP_BYTES = 64 * 1024


def webrtc_available() -> tuple[bool, str]:
    try:
        import aiortc  # noqa: F401 - only whether it imports
    except ImportError:
        return False, "unavailable (aiortc is not installed)"
    return True, "available"


class _BadOffer(Exception):
    pass


async def _read_offer(request: Request, max_bytes: int, max_depth: int) -> tuple[dict, str, str]:
    """The request's JSON body ``{sdp, type, ...}``, read at most ``max_bytes`` far."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise _BadOffer(f"the offer is over {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _BadOffer(f"the offer is over {max_bytes} bytes")
    try:
        msg = load_client_json(bytes(body), max_bytes=max_bytes, max_depth=max_depth, what="the offer")
    except PromptusError as e:
        raise _BadOffer(str(e)) from None
    except ValueError:
        raise _BadOffer("the offer is not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("sdp"), str) or not isinstance(msg.get("type"), str) \
            or len(msg["sdp"]) > MAX_SDP_BYTES:
        raise _BadOffer(f"send JSON {{sdp, type}} of a WebRTC offer (at most {MAX_SDP_BYTES // 1024} KiB)")
    return msg, msg["sdp"], msg["type"]


@router.post("/api/webrtc/{name:path}")
async def webrtc(name: str, request: Request):
    ok, why = webrtc_available()
    if not ok:
        return JSONResponse({"error": f"WebRTC is {why}"}, status_code=501)
    state = state_of(request)
    limits = state.limits
    if not state.slots.acquire():
        return JSONResponse({"error": "the server has as many clients as it takes; try again later"}, 503)
    handed_over = False  # from here the slot is given back on every way out, or handed to the watcher
    try:
        try:
            body, sdp, kind = await _read_offer(request, limits.max_offer_bytes, limits.max_json_depth)
        except _BadOffer as e:
            return JSONResponse({"error": str(e)}, 400)
        from ..webrtc import WebRTCSession

        try:
            session = await asyncio.to_thread(open_session, state, name, body)
        except AdmissionError as e:
            return JSONResponse({"error": str(e), "admission": e.admission.to_dict()}, 503)
        except (ClipNotFound, ClipForbidden) as e:
            return JSONResponse({"error": str(e)}, 404 if isinstance(e, ClipNotFound) else 403)
        except PromptusError as e:
            return JSONResponse({"error": str(e)}, 422)
        try:
            rtc = WebRTCSession(session, limits.ice_servers, loopback_only=limits.webrtc_loopback)
        except BaseException:
            session.close()
            raise
        state.webrtc.add(rtc)
        state.tasks.spawn(_watch(state, rtc, limits.webrtc_connect_timeout_s), f"webrtc {name}")
        handed_over = True
        try:
            answer = await rtc.answer(sdp, kind)
        except Exception as e:  # noqa: BLE001 - a bad offer is the client's problem
            await rtc.close()
            return JSONResponse({"error": f"cannot answer this offer: {e}"}, 400)
        return {**answer, "clip": session.clip.info(), "admission": session.admission.to_dict()}
    finally:
        if not handed_over:
            state.slots.release()


async def _watch(state, rtc, connect_timeout_s: float) -> None:
    """Hold the slot while the session lives; close it if the browser has not connected in time."""
    try:
        try:
            await asyncio.wait_for(_connected(rtc), connect_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            log.info("webrtc: the browser did not connect within %.0f s", connect_timeout_s)
            await rtc.close()
        await rtc.done.wait()
    finally:
        state.webrtc.discard(rtc)
        state.slots.release()
        with contextlib.suppress(Exception):
            await rtc.close()


async def _connected(rtc) -> None:
    while rtc.pc.connectionState != "connected" and not rtc.done.is_set():
        await asyncio.sleep(0.1)
