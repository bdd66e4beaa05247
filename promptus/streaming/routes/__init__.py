"""The server's routes, one module per kind: plain HTTP, prompt streams, the JPEG viewer, WebRTC.

Each module has a ``router``; :func:`promptus.streaming.server.create_app` includes
them. The routes share one :class:`~promptus.streaming.server.StreamingState`,
``app.state.promptus`` (:func:`state_of`).
"""

from __future__ import annotations

from ...errors import PromptusError


def state_of(connection):
    """The :class:`StreamingState` of the app that received ``connection`` (a Request or WebSocket)."""
    return connection.app.state.promptus


def open_session(state, name: str, params):
    """A :class:`ViewSession` of clip ``name`` with the viewer's ``rate``, ``start`` and ``accept_lower``."""
    from ..viewer import ViewSession

    if state.scheduler is None:
        raise PromptusError("this server has no model to regenerate frames with (start it with a --model)")
    clip = state.library.clip(name)
    try:
        rate = float(params.get("rate") or clip.header.fps)
        start = int(params.get("start") or 0)
    except (TypeError, ValueError, OverflowError):
        raise PromptusError("rate must be a number and start an integer") from None
    if not 0 < rate <= 10 * clip.header.fps:
        raise PromptusError(f"rate must lie in (0, {10 * clip.header.fps:g}] frames/s")
    accept_lower = str(params.get("accept_lower", "0")).lower() in ("1", "true", "yes")
    return ViewSession(state.scheduler, clip, rate=rate, accept_lower=accept_lower, start=start)
