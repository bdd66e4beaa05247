"""WebRTC video of a :class:`~promptus.streaming.viewer.ViewSession` (aiortc).

The browser makes the offer (one receive-only video transceiver and a data
channel named "stats"); the server answers preferring H.264, else VP8, sends the
regenerated frames as the video track and the session's numbers on the data
channel twice a second.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging

from aiortc import MediaStreamTrack  # this module is imported only where aiortc is installed

from ..errors import PromptusError
from .viewer import ViewSession

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000  # RTP video clock rate


class WebRTCSession:
    """One RTCPeerConnection sending one ViewSession's frames."""

    def __init__(self, session: ViewSession, ice_servers: tuple[str, ...] = (), *, loopback_only: bool = False):
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

        self.session = session
        self.loopback_only = loopback_only
        if loopback_only:
            gather_loopback_candidates_only()
        # No STUN server unless given (aiortc would otherwise ask a public one): host candidates
        # reach browsers on this machine and its network; elsewhere the WebSocket fallback takes over.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(u) for u in ice_servers]))
        self.done = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

        @self.pc.on("connectionstatechange")
        async def _state():
            log.info("webrtc: connection %s", self.pc.connectionState)
            if self.pc.connectionState in ("failed", "closed"):
                await self.close()

        @self.pc.on("datachannel")
        def _channel(channel):
            if channel.label == "stats":
                self._tasks.append(asyncio.ensure_future(self._send_stats(channel)))

    async def answer(self, sdp: str, kind: str) -> dict:
        """Take the browser's offer, return the answer (after ICE gathering)."""
        from aiortc import RTCRtpSender, RTCSessionDescription

        if kind != "offer":
            raise PromptusError(f"expected an SDP offer, got {kind!r}")
        # A sending transceiver made before the offer is applied takes the offer's video m-line;
        # its codec preferences (H.264 first, VP8 as the fallback) decide what the answer sends.
        transceiver = self.pc.addTransceiver(_SessionTrack(self.session, self), direction="sendonly")
        caps = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences([c for c in caps if c.mimeType == "video/H264"]
                                        + [c for c in caps if c.mimeType in ("video/VP8", "video/rtx")])
        if self.loopback_only:
            sdp = keep_loopback_candidates(sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if transceiver.mid is None:
            raise PromptusError("the offer has no video transceiver; add one with direction 'recvonly'")
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        codec = _negotiated_codec(self.pc.localDescription.sdp)
        self.session.transport, self.session.codec = "webrtc", codec
        return {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type, "codec": codec}

    async def _send_stats(self, channel) -> None:
        try:
            while not self.done.is_set():
                if channel.readyState == "open":
                    channel.send(json.dumps(self.session.stats()))
                await asyncio.sleep(0.5)
        except Exception as e:  # noqa: BLE001 - a closed channel ends the loop
            log.info("webrtc: stats channel closed: %s", e)

    async def close(self) -> None:
        if self.done.is_set():
            return
        self.done.set()
        self.session.close()
        for t in self._tasks:
            t.cancel()
        await self.pc.close()


LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")


def gather_loopback_candidates_only() -> None:
    """Make aiortc's ICE agent (aioice) offer only 127.0.0.1 as a host candidate.

    aioice leaves loopback out of its host candidates, so by default media would flow over
    this machine's other interfaces even when the page is on localhost. Process-wide: it is
    meant for servers that bind to loopback only (``ServerLimits.webrtc_loopback``).
    """
    import aioice.ice

    aioice.ice.get_host_addresses = _loopback_host_addresses


def _loopback_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else (["::1"] if use_ipv6 else [])


def keep_loopback_candidates(sdp: str) -> str:
    """The offer with every ICE candidate that is not on loopback removed (mDNS names too).

    A browser offers loopback candidates only when told to (Chromium:
    ``--allow-loopback-in-peer-connection``); without them the session cannot connect and
    the page falls back to WebSocket.
    """
    kept = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) < 5 or fields[4] not in LOOPBACK_ADDRESSES:
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


def _negotiated_codec(sdp: str) -> str | None:
    """The first video codec of an SDP answer (the one that will be sent)."""
    in_video, payloads, names = False, [], {}
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_video = line.startswith("m=video")
            if in_video:
                payloads = line.split()[3:]
        elif in_video and line.startswith("a=rtpmap:"):
            pt, _, rest = line[len("a=rtpmap:"):].partition(" ")
            names[pt] = rest.split("/")[0]
    for pt in payloads:
        if names.get(pt) not in (None, "rtx", "red", "ulpfec"):
            return names[pt]
    return None


class _SessionTrack(MediaStreamTrack):
    """The ViewSession's frames as a WebRTC video track, stamped on the 90 kHz RTP clock."""

    kind = "video"

    def __init__(self, session: ViewSession, owner: WebRTCSession):
        super().__init__()
        self.session, self.owner = session, owner
        self._frames = session.frames()

    async def recv(self):
        import av
        from aiortc.mediastreams import MediaStreamError

        try:
            f = await self._frames.__anext__()
        except StopAsyncIteration:
            self.stop()
            raise MediaStreamError from None
        frame = av.VideoFrame.from_ndarray(f.rgb, format="rgb24")
        frame.pts = round(f.index * VIDEO_CLOCK / self.session.rate)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return frame
