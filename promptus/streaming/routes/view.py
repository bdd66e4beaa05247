"""``WS /ws/view/{name}``: frames regenerated on the server, sent as JPEG messages."""

from __future__ import annotations

import asyncio
import struct
import time

from fastapi import APIRouter, WebSocket

from ...errors import PromptusError
from ..clients import Connection, TaskOwner, websocket_client
from ..scheduler import AdmissionError
from ..viewer import ViewSession, encode_jpeg
from . import open_session, state_of

router = APIRouter()

#: Binary frame message of /ws/view: u32 frame index, f32 latency so far (ms), then JPEG bytes.
FRAME_HEADER = struct.Struct("<If")


async def _frames(conn: Connection, session: ViewSession, quality: int) -> None:
    await conn.send_control({"type": "hello", "clip": session.clip.info(), "transport": "websocket",
                             "admission": session.admission.to_dict()})
    last_stats = 0.0
    async for f in session.frames():
        jpeg = await asyncio.to_thread(encode_jpeg, f.rgb, quality)
        await conn.send(FRAME_HEADER.pack(f.index, 1000 * f.latency) + jpeg)
        session.note_video_bytes(len(jpeg))
        if time.perf_counter() - last_stats > 0.5:
            last_stats = time.perf_counter()
            await conn.send_control(session.stats())
    await conn.send_control(session.stats())
    await conn.send_control({"type": "end"})


@router.websocket("/ws/view/{name:path}")
async def view(ws: WebSocket, name: str):
    state = state_of(ws)
    async with websocket_client(ws, state.slots, state.limits, f"viewer of {name}") as conn:
        if conn is None:
            return
        try:
            session = await asyncio.to_thread(open_session, state, name, ws.query_params)
        except AdmissionError as e:
            await conn.send_control({"type": "admission", **e.admission.to_dict()})
            await conn.refuse(str(e), 1013)
            return
        except PromptusError as e:
            await conn.refuse(str(e))
            return
        session.transport, session.codec = "websocket", "jpeg"

        async def on_message(msg):
            if msg["type"] != "ping":
                raise PromptusError(f"unknown control message {msg['type']!r}; this socket takes 'ping'")
            t = msg.get("t")
            await conn.send_control({"type": "pong", "t": t if isinstance(t, (int, float)) else None})

        try:
            async with TaskOwner(conn.what) as tasks:
                reader = tasks.spawn(conn.controls(on_message), "controls")
                sender = tasks.spawn(_frames(conn, session, state.limits.jpeg_quality), "frames")
                await tasks.first(reader, sender)
        finally:
            session.close()
