"""One client of the server: its slot under the client limit, its socket, its tasks.

* :class:`ClientSlots` counts clients (WebSockets and WebRTC sessions together);
  :meth:`ClientSlots.acquire` checks the limit and takes a slot in one step, so no
  number of concurrent requests can pass the limit.
* :class:`TaskOwner` owns the tasks of one client: every task it starts is awaited
  or cancelled and awaited before it exits, so no exception is left unretrieved.
* :class:`Connection` wraps one WebSocket: sends that a client does not read drop
  it after ``send_timeout_s`` (the transport is cut, not closed politely: a client
  that never reads would never take the close frame either); control messages are
  bounded in size, rate and JSON depth. Every way a client can leave or misbehave
  ends in :class:`ClientGone`, which the routes treat as the end of the visit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..config import ServerConfig
from ..errors import PromptusError
from .wire import control, parse_control

log = logging.getLogger(__name__)

#: Where :class:`TransportMiddleware` leaves the connection's asyncio transport in the ASGI scope.
TRANSPORT_KEY = "promptus.transport"


class ClientGone(Exception):
    """The client left, was dropped (slow) or was closed for what it sent; ``reason`` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ClientSlots:
    """How many clients are connected, bounded by ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0  # open now
        self.served = 0  # since start
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """Take a slot if one is free (check and take in one step); False at the limit."""
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            self.served += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.count -= 1

    @contextlib.contextmanager
    def hold(self):
        """``with slots.hold() as ok:`` a slot for the block (``ok`` False at the limit)."""
        ok = self.acquire()
        try:
            yield ok
        finally:
            if ok:
                self.release()


class TaskOwner:
    """``async with TaskOwner(what) as tasks:``: tasks started with :meth:`spawn` end with the block.

    A task that ends has its outcome collected at once; on exit every task still
    running is cancelled and awaited. A client leaving is logged in one line, never
    as "Task exception was never retrieved".
    """

    def __init__(self, what: str):
        self.what = what
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Awaitable, name: str | None = None) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        e = task.exception()  # retrieved here, whoever else looks at it
        if e is not None and not isinstance(e, ClientGone):
            log.warning("%s: task %s failed: %s: %s", self.what, task.get_name(), type(e).__name__, e)

    @staticmethod
    async def first(*tasks: asyncio.Task) -> asyncio.Task:
        """Wait until one of ``tasks`` is done and return it (raising its exception, if any)."""
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        task = next(t for t in tasks if t in done)
        task.result()
        return task

    @staticmethod
    async def cancel(*tasks: asyncio.Task | None) -> None:
        """Cancel tasks and wait for them to end (their exceptions are collected, not raised)."""
        tasks = [t for t in tasks if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.cancel(*list(self.tasks))

    async def __aenter__(self) -> "TaskOwner":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class TransportMiddleware:
    """Puts each WebSocket's asyncio transport into its ASGI scope (servers that expose it: uvicorn).

    With it, :meth:`Connection.drop` can cut a client that does not read; the
    transport's write buffer is bounded by ``max_queued_bytes`` meanwhile.
    """

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None and hasattr(transport, "abort"):
                scope[TRANSPORT_KEY] = transport
                with contextlib.suppress(Exception):  # a transport without limits keeps its own
                    transport.set_write_buffer_limits(high=self.config.max_queued_bytes)
        await self.app(scope, receive, send)


class Connection:
    """One accepted WebSocket under the server's per-client bounds (see the module docstring)."""

    def __init__(self, ws: WebSocket, config: ServerConfig, what: str):
        self.ws, self.config, self.what = ws, config, what
        self.transport = ws.scope.get(TRANSPORT_KEY)
        self._tokens = float(config.message_burst)
        self._refilled = time.monotonic()
        self.closed = False

    # ---------------------------------------------------------------- out

    async def send(self, data: str | bytes) -> None:
        """Send one message; ClientGone when the client left or did not read it in time."""
        if self.closed:
            raise ClientGone("closed")
        coro = self.ws.send_bytes(data) if isinstance(data, bytes) else self.ws.send_text(data)
        try:
            await asyncio.wait_for(coro, self.config.send_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            self.drop()
            raise ClientGone(f"dropped: it did not read for {self.config.send_timeout_s:g} s") from None
        except (WebSocketDisconnect, RuntimeError, OSError) as e:
            self.closed = True
            raise ClientGone(f"left ({type(e).__name__} {e})") from None

    async def send_control(self, message: dict) -> None:
        await self.send(control(message))

    async def close(self, code: int = 1000) -> None:
        """Close politely; a client that does not answer the close frame in time is cut."""
        if self.closed:
            return
        self.closed = True
        try:
            await asyncio.wait_for(self.ws.close(code), self.config.close_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            self.drop()
            return
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        if self.transport is not None:  # a client that reads answers at once; one that does not is cut
            asyncio.get_running_loop().call_later(self.config.close_timeout_s, self._cut_if_open)

    def _cut_if_open(self) -> None:
        if not self.transport.is_closing() or self.transport.get_write_buffer_size():
            self.drop()

    async def refuse(self, message: str, code: int = 1008) -> None:
        """Tell the client what is wrong, then close with ``code``."""
        if not self.closed:
            with contextlib.suppress(ClientGone):
                await asyncio.wait_for(self.send_control({"type": "error", "message": message}),
                                       self.config.close_timeout_s)
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await self.close(code)

    def drop(self) -> None:
        """Cut the connection at once with a reset: its unsent data is discarded, here and in the kernel."""
        self.closed = True
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # linger 0: close() resets instead of sending what is queued
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # ----------------------------------------------------------------- in

    def _take_token(self) -> bool:
        now = time.monotonic()
        rate, burst = self.config.max_messages_per_s, self.config.message_burst
        self._tokens = min(burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def controls(self, on_message: Callable[[dict], Awaitable[None]]) -> None:
        """Read the client's control messages until it leaves (ClientGone); bad ones close the socket."""
        c = self.config
        while True:
            try:
                msg = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError, OSError) as e:
                raise ClientGone(f"left ({type(e).__name__})") from None
            if msg["type"] == "websocket.disconnect":
                self.closed = True
                raise ClientGone(f"left (code {msg.get('code', 1000)})")
            text, data = msg.get("text"), msg.get("bytes")
            if text is None:
                await self.refuse("binary data is not accepted from clients", 1003)
                raise ClientGone("sent binary data")
            if len(text) > c.max_control_bytes:
                await self.refuse(f"control message over {c.max_control_bytes} bytes", 1009)
                raise ClientGone("sent an oversized message")
            if not self._take_token():
                await self.refuse(f"more than {c.max_messages_per_s:g} messages per second "
                                  f"(bursts of {c.message_burst}); slow down", 1008)
                raise ClientGone("sent too many messages")
            try:
                await on_message(parse_control(text, max_bytes=c.max_control_bytes, max_depth=c.max_json_depth))
            except PromptusError as e:
                await self.refuse(str(e))
                raise ClientGone(f"sent a bad message: {e}") from None


@contextlib.asynccontextmanager
async def websocket_client(ws: WebSocket, slots: ClientSlots, config: ServerConfig, what: str):
    """Accept ``ws`` under the client limit; yields its :class:`Connection`, or None when refused.

    The block ends quietly whatever the client did (left, dropped, sent garbage): that
    is logged in one line; only the server's own bugs reach the log as tracebacks.
    """
    try:
        await ws.accept()
    except (WebSocketDisconnect, RuntimeError, OSError):
        return
    conn = Connection(ws, config, what)
    with slots.hold() as ok:
        if not ok:
            await conn.refuse(f"the server already has {slots.count} clients, its limit; try again later", 1013)
            yield None
            return
        try:
            yield conn
            await conn.close(1000)
        except ClientGone as e:
            log.info("%s: client %s", what, e.reason)
            if not conn.closed:
                await conn.close(1000)
        except PromptusError as e:
            await conn.refuse(str(e), 1011)
        finally:
            conn.closed = True
