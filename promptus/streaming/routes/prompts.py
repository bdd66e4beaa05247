"""``WS /ws/prompts/{name}``: the prompt stream, paced at the clip's real time, with seeking."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, WebSocket

from ...errors import PromptusError
from ..clients import Connection, TaskOwner, websocket_client
from ..viewer import release_offset
from . import state_of

router = APIRouter()


def _query_int(ws: WebSocket, key: str, default: int) -> int:
    try:
        return int(ws.query_params.get(key, default))
    except ValueError:
        raise PromptusError(f"query parameter {key} must be an integer") from None


class _Seeks:
    """The latest seek a client asked for; a flood of seeks costs one restart, not one task each."""

    def __init__(self, start: int):
        self.start = start
        self.event = asyncio.Event()

    async def on_message(self, msg: dict) -> None:
        if msg["type"] != "seek":
            raise PromptusError(f"unknown control message {msg['type']!r}; this socket takes 'seek'")
        k = msg.get("keyframe")
        if not isinstance(k, int) or isinstance(k, bool):
            raise PromptusError("seek needs an integer 'keyframe'")
        self.start = k
        self.event.set()

    def take(self) -> int:
        self.event.clear()
        return self.start


async def _stream(conn: Connection, clip, pace: str, seeks: _Seeks) -> None:
    """Send the clip from ``seeks.start``; a seek restarts it from there."""
    h, keyframes = clip.header, len(clip.keyframes)
    while True:
        start = max(0, min(seeks.take(), keyframes - 1))
        await conn.send_control({"type": "start", "clip": clip.name, "start": start, "keyframes": keyframes,
                                 "frames": h.frame_count, "fps": h.fps, "bytes": clip.size, "pace": pace})
        await conn.send(clip.pieces[0])
        await conn.send(clip.pieces[1])
        t0 = time.perf_counter()
        for p in range(keyframes):
            if seeks.event.is_set():
                break
            if pace == "realtime":
                delay = t0 + release_offset(p, start, h.interval, h.fps) - time.perf_counter()
                if delay > 0:  # sleeps until the keyframe is due, or until a seek
                    try:
                        await asyncio.wait_for(seeks.event.wait(), delay)
                        break
                    except (asyncio.TimeoutError, TimeoutError):
                        pass
            await conn.send(clip.pieces[2 + p])
        else:
            for piece in clip.pieces[2 + keyframes:]:  # the end record, when the file has one
                await conn.send(piece)
            if clip.error:
                await conn.send_control({"type": "error", "message": f"the file is damaged: {clip.error}"})
            return


@router.websocket("/ws/prompts/{name:path}")
async def prompts(ws: WebSocket, name: str):
    state = state_of(ws)
    async with websocket_client(ws, state.slots, state.limits, f"prompts of {name}") as conn:
        if conn is None:
            return
        try:
            clip = await asyncio.to_thread(state.library.clip, name)
            start = _query_int(ws, "start", 0)
            pace = ws.query_params.get("pace", "realtime" if state.realtime else "fast")
            if pace not in ("realtime", "fast"):
                raise PromptusError("pace is 'realtime' or 'fast'")
        except PromptusError as e:
            await conn.refuse(str(e))
            return
        seeks = _Seeks(start)
        async with TaskOwner(conn.what) as tasks:
            reader = tasks.spawn(conn.controls(seeks.on_message), "controls")
            sender = tasks.spawn(_stream(conn, clip, pace, seeks), "stream")
            await tasks.first(reader, sender)
