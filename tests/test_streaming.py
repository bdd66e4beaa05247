"""Prompt streaming on loopback with the tiny model at 64 px: server, receiver, faults, scheduler, browser.

One server (uvicorn in a thread, 127.0.0.1, a free port) serves a folder of small
clips for the whole module; every test bounds its own time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
websockets = pytest.importorskip("websockets", reason="the serve extra (websockets) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from promptus.bitstream import Bitstream, Header, InitLatent, Keyframe, split_records, to_bytes  # noqa: E402
from promptus.config import CodecConfig  # noqa: E402
from promptus.errors import BitstreamError, PromptusError  # noqa: E402
from promptus.prompts import quantize_tensor  # noqa: E402
from promptus.streaming import (  # noqa: E402
    AdmissionError, ConcealingReader, Receiver, StreamScheduler, backend_decoders, create_app,
)

from netutil import free_port  # noqa: E402

HOST = "127.0.0.1"
ARTIFACTS = Path(__file__).resolve().parents[1] / "outputs" / "test-artifacts"


def make_clip(models, *, frame_count=41, interval=4, rank=2, size=64, fps=60.0, seed=0) -> Bitstream:
    cfg = CodecConfig(width=size, height=size, fps=fps, rank=rank, interval=interval)
    g = torch.Generator().manual_seed(seed)
    kfs = [Keyframe(k * interval, quantize_tensor(torch.randn(77, rank, generator=g)),
                    quantize_tensor(torch.randn(rank, 1024, generator=g)))
           for k in range(cfg.keyframe_count(frame_count))]
    init = InitLatent.from_array(torch.randn(cfg.latent_shape, generator=g).numpy(), "fp32")
    return Bitstream(Header(cfg, frame_count, models.identity()), init, kfs)


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app, *, start_timeout: float = 30, **config):
        import uvicorn

        self.port = free_port(HOST)
        config = {"log_level": "warning", "ws_max_size": 65536, "lifespan": "on", **config}
        self.app = app
        self.start_timeout = start_timeout
        self.server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=self.port, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def http(self, path=""):
        return f"http://{HOST}:{self.port}{path}"

    def ws(self, path=""):
        return f"ws://{HOST}:{self.port}{path}"


@pytest.fixture(scope="module")
def clips(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    bs = make_clip(tiny)
    (root / "clip.promptus").write_bytes(to_bytes(bs))
    (root / "sub").mkdir()
    short = make_clip(tiny, frame_count=21, seed=1)
    (root / "sub" / "short.promptus").write_bytes(to_bytes(short))
    secret = tmp_path_factory.mktemp("outside") / "secret.promptus"
    secret.write_bytes(to_bytes(short))
    (root / "escape.promptus").symlink_to(secret)  # a symlink out of the root: never served
    (root / "escape_dir").symlink_to(secret.parent, target_is_directory=True)
    return root, {"clip.promptus": bs, "sub/short.promptus": short}


@pytest.fixture(scope="module")
def decoder_for(tiny):
    return backend_decoders(tiny, "torch", "cpu")


@pytest.fixture(scope="module")
def offline(decoder_for, clips):
    """Every clip decoded offline, frame by frame, for comparison."""
    _, bss = clips
    return {name: decoder_for(bs.header).decode_all(bs) for name, bs in bss.items()}


@pytest.fixture(scope="module")
def server(clips, decoder_for):
    root, _ = clips
    with ServerThread(create_app(root, decoder_for=decoder_for)) as s:
        yield s


def receive_all(url, decoder_for, timeout=60):
    async def go():
        rx = Receiver(url, decoder_for=decoder_for)
        segs = [seg async for seg in rx]
        return rx, segs

    return asyncio.run(asyncio.wait_for(go(), timeout))


def frames_of(segs):
    return torch.cat([s.frames for s in segs if not s.catchup])


# --------------------------------------------------------------- stream + receiver


def test_every_frame_arrives_in_real_time_and_equals_the_offline_decode(server, clips, offline, decoder_for):
    _, bss = clips
    bs = bss["clip.promptus"]
    t0 = time.perf_counter()
    rx, segs = receive_all(server.ws("/ws/prompts/clip.promptus"), decoder_for)
    wall = time.perf_counter() - t0
    frames = frames_of(segs)
    assert frames.shape[0] == bs.header.frame_count
    assert torch.equal(frames, offline["clip.promptus"])
    assert not rx.stats.damage
    # Paced at the clip's real time: keyframe k leaves (k−1)·T frames after the start.
    paced = (bs.header.keyframe_count - 2) * bs.header.interval / bs.header.fps
    assert wall >= paced * 0.9
    print(f"\nreal time: {rx.stats.summary()} (clip {bs.header.duration_s:.2f} s, paced {paced:.2f} s)")
    assert rx.stats.latency_ms(0.5) < 1000


def test_fast_pace_and_seek_are_exact(server, clips, offline, decoder_for):
    rx, segs = receive_all(server.ws("/ws/prompts/sub/short.promptus?pace=fast&start=2"), decoder_for)
    assert rx.start_keyframe == 2 and rx.start_frame == 8
    shown = frames_of(segs)
    ref = offline["sub/short.promptus"]
    # Seeking regenerates the prompts before the seek point unseen, so the frames are exact.
    assert torch.equal(shown, ref[shown.shape[0] and ref.shape[0] - shown.shape[0]:])
    assert segs[-1].stop == ref.shape[0] and shown.shape[0] >= ref.shape[0] - 8
    print(f"\nfast: {rx.stats.summary()}")


def test_clip_listing_and_range_download(server, clips):
    root, _ = clips
    r = httpx.get(server.http("/api/clips"), timeout=10).json()
    names = sorted(c["name"] for c in r["clips"])
    assert names == ["clip.promptus", "sub/short.promptus"]  # the symlinks out of the root are not listed
    info = next(c for c in r["clips"] if c["name"] == "clip.promptus")
    assert info["frames"] == 41 and info["kbps"] > 0
    data = (root / "clip.promptus").read_bytes()
    whole = httpx.get(server.http("/files/clip.promptus"), timeout=10)
    assert whole.status_code == 200 and whole.content == data
    part = httpx.get(server.http("/files/clip.promptus"), headers={"Range": "bytes=10-99"}, timeout=10)
    assert part.status_code == 206 and part.content == data[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(data)}"


@pytest.mark.parametrize("name", [
    "../outside/secret.promptus", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "sub/../../x.promptus",
    "escape.promptus", "escape_dir/secret.promptus", "sub%5C..%5C..%5Csecret.promptus", "nothing.promptus",
])
def test_no_path_traversal_or_symlink_escape(server, name):
    r = httpx.get(server.http(f"/files/{name}"), timeout=10)
    assert r.status_code in (403, 404), (name, r.status_code)
    assert b"\x89PRM" not in r.content and b"root:" not in r.content  # no file's bytes came back

    async def ws():
        async with websockets.connect(server.ws(f"/ws/prompts/{name}")) as c:
            msg = json.loads(await asyncio.wait_for(c.recv(), 10))
            assert msg["type"] == "error"
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(c.recv(), 10)

    asyncio.run(ws())


def test_library_resolve_refuses_escapes(clips):
    from promptus.streaming import ClipForbidden, ClipLibrary, ClipNotFound

    root, _ = clips
    lib = ClipLibrary(root)
    assert lib.resolve("sub/short.promptus") == (root / "sub" / "short.promptus").resolve()
    for bad in ("../x", "/etc/passwd", "escape.promptus", "escape_dir/secret.promptus", "a\\b", "a\x00b", ""):
        with pytest.raises(ClipForbidden):
            lib.resolve(bad)
    with pytest.raises(ClipNotFound):
        lib.resolve("missing.promptus")


async def send_until_closed(server, payload, path="/ws/prompts/clip.promptus"):
    """Send ``payload`` to the prompt socket and read until the server closes it: (error messages, close code)."""
    async with websockets.connect(server.ws(path)) as c:
        await c.send(payload)
        errors = []
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                m = await asyncio.wait_for(c.recv(), 10)
                if isinstance(m, str) and json.loads(m)["type"] == "error":
                    errors.append(json.loads(m)["message"])
        return errors, c.close_code


def test_garbage_from_a_client_gets_an_error_and_a_closed_socket(server):
    def go(payload):
        return send_until_closed(server, payload)

    for payload, code in ((b"\x00\xff garbage", 1003), ("not json", 1008), ('{"type": "launch"}', 1008),
                          ('{"type": "seek", "keyframe": "x"}', 1008)):
        errors, close = asyncio.run(go(payload))
        assert errors and close == code, (payload, errors, close)
    # Over the server's message limit (64 KiB here): the connection is closed, the server lives on.
    _, close = asyncio.run(go("x" * 100_000))
    assert close == 1009
    assert httpx.get(server.http("/api/status"), timeout=10).status_code == 200


# --------------------------------------------------------------------- faults


class FaultyProxy:
    """A WebSocket relay on 127.0.0.1 that damages chosen binary messages of the stream.

    ``faults`` maps the index of a binary message (0 = header piece) to "flip"
    (one byte of the payload inverted), "truncate" (the last 7 bytes cut off) or
    "drop" (never delivered).
    """

    def __init__(self, upstream: str, faults: dict[int, str]):
        self.upstream, self.faults = upstream, faults
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from websockets.asyncio.client import connect
        from websockets.asyncio.server import serve

        async def relay(client):
            async with connect(self.upstream + client.request.path) as up:
                n = 0
                async for msg in up:
                    if isinstance(msg, bytes):
                        fault = self.faults.get(n)
                        n += 1
                        if fault == "drop":
                            continue
                        if fault == "flip":
                            msg = bytearray(msg)
                            msg[len(msg) // 2] ^= 0xFF
                            msg = bytes(msg)
                        elif fault == "truncate":
                            msg = msg[:-7]
                    await client.send(msg)

        async def main():
            self.stop = asyncio.get_running_loop().create_future()
            async with serve(relay, HOST, 0) as srv:
                self.port = srv.sockets[0].getsockname()[1]
                self.ready.set()
                await self.stop

        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(main())

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set_result, None)
        self.thread.join(10)


def test_damaged_records_are_reported_and_concealed_and_the_stream_goes_on(server, clips, offline, decoder_for):
    _, bss = clips
    bs = bss["clip.promptus"]
    T = bs.header.interval
    # message 0 = header, 1 = init latent, 2 + k = keyframe k
    faults = {2 + 3: "flip", 2 + 6: "truncate", 2 + 8: "drop"}
    with FaultyProxy(server.ws(), faults) as proxy:
        rx, segs = receive_all(f"ws://{HOST}:{proxy.port}/ws/prompts/clip.promptus?pace=fast", decoder_for)
    frames = frames_of(segs)
    ref = offline["clip.promptus"]
    assert frames.shape[0] == bs.header.frame_count  # every frame still comes out
    damaged = [str(d) for d in rx.stats.damage]
    print("\n" + "\n".join(damaged))
    assert len(damaged) == 3
    assert "checksum" in damaged[0] and "truncated" in damaged[1] and "never arrived" in damaged[2]
    assert all("held the prompt" in d for d in damaged)
    assert [s.start for s in segs if s.concealed] == [2 * T + 1, 5 * T + 1, 7 * T + 1]
    # Before the first damage the frames are exact; the concealed segments differ from the
    # original (the held prompt) and the stream resynchronises at the next good keyframe.
    assert torch.equal(frames[:2 * T + 1], ref[:2 * T + 1])
    assert not torch.equal(frames[2 * T + 1:3 * T + 1], ref[2 * T + 1:3 * T + 1])


def test_concealing_reader_without_the_network(tiny):
    bs = make_clip(tiny, frame_count=17, interval=4)
    pieces, err = split_records(to_bytes(bs))
    assert err is None and len(pieces) == 2 + 5 + 1
    r = ConcealingReader()
    out = []
    bad = bytearray(pieces[2])
    bad[-1] ^= 1  # keyframe 0's CRC
    for p in [pieces[0], pieces[1], bytes(bad), pieces[3], pieces[5], pieces[4], pieces[6], pieces[7]]:
        out += r.feed(p)
    kinds = [type(x).__name__ for x in out]
    # keyframe 0 damaged: keyframe 1's prompt stands in for it; keyframe 3 lost: keyframe 2's held;
    # the late keyframe 2... arrives after 3 and is dropped.
    assert kinds == ["Header", "InitLatent", "Concealed", "Keyframe", "Concealed", "Keyframe", "Keyframe"]
    idx = [getattr(x, "keyframe", x).index for x in out[2:]]
    assert idx == [0, 4, 8, 12, 16]
    assert len(r.damage) == 3 and "first good keyframe stands in" in str(r.damage[0])
    with pytest.raises(BitstreamError, match="header is damaged"):
        ConcealingReader().feed(pieces[0][:-3])
    r2 = ConcealingReader()
    r2.feed(pieces[0])
    with pytest.raises(BitstreamError, match="init latent is damaged"):
        r2.feed(pieces[1][:-1])


def test_a_truncated_file_is_served_up_to_the_damage(server, clips, offline, decoder_for):
    root, bss = clips
    data = to_bytes(bss["sub/short.promptus"])
    (root / "cut.promptus").write_bytes(data[:-1500])  # cut inside the last keyframe record
    segs = []

    async def go():
        rx = Receiver(server.ws("/ws/prompts/cut.promptus?pace=fast"), decoder_for=decoder_for)
        with pytest.raises(PromptusError, match="the file is damaged.*keyframe record 5"):
            async for seg in rx:
                segs.append(seg)
        return rx

    try:
        rx = asyncio.run(asyncio.wait_for(go(), 30))
    finally:
        (root / "cut.promptus").unlink()
    # The intact keyframes 0..4 give frames 0..16, exactly; the stream is reported cut short.
    assert torch.equal(frames_of(segs), offline["sub/short.promptus"][:17])
    assert "ended after 5 of 6 keyframes" in str(rx.stats.damage[-1])


def _client_script(url: str) -> str:
    return textwrap.dedent(f"""
        import asyncio, sys
        from websockets.asyncio.client import connect
        async def main():
            async with connect({url!r}) as c:
                n = 0
                async for m in c:
                    n += 1
                    if n == 4:
                        print("receiving", flush=True)
        asyncio.run(main())
    """)


def test_a_client_killed_mid_stream_is_dropped_without_stalling_others(server, clips, offline, decoder_for):
    url = server.ws("/ws/prompts/clip.promptus")
    proc = subprocess.Popen([sys.executable, "-c", _client_script(url)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "receiving"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # Another client is served in full while the server notices the dead one.
        rx, segs = receive_all(url, decoder_for)
        assert torch.equal(frames_of(segs), offline["clip.promptus"])
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while httpx.get(server.http("/api/status"), timeout=10).json()["clients"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.http("/api/status"), timeout=10).json()["clients"] == 0


def test_fifty_clients_at_once(server, clips):
    root, _ = clips
    pieces, _ = split_records((root / "clip.promptus").read_bytes())

    async def one(i):
        async with websockets.connect(server.ws("/ws/prompts/clip.promptus")) as c:
            got = [m async for m in c if isinstance(m, bytes)]
            return got

    async def all_():
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(50)))
        return results, time.perf_counter() - t0

    results, wall = asyncio.run(asyncio.wait_for(all_(), 60))
    assert all(r == pieces for r in results)  # byte for byte: every record, in order, to every client
    print(f"\n50 clients, each paced in real time: all {len(pieces)} pieces to each in {wall:.2f} s")
    assert httpx.get(server.http("/api/status"), timeout=10).json()["clients"] == 0


# ------------------------------------------------------------------- scheduler


def test_admission_control_refuses_what_the_device_cannot_serve_in_real_time(tiny, decoder_for):
    bs = make_clip(tiny, fps=30.0)
    sched = StreamScheduler(decoder_for, headroom=0.9)
    sched.capacity = 100.0  # frames/s, as if measured
    handles = [sched.open(bs.header, bs.init) for _ in range(3)]  # 90 of the 90 usable frames/s
    assert sched.load == 90.0 and all(h.admission.realtime for h in handles)
    adm = sched.admit(30.0)
    assert not adm.admitted and "is busy" in adm.reason
    with pytest.raises(AdmissionError) as e:
        sched.open(bs.header, bs.init)
    assert e.value.admission.offer == 0.0  # 90% of 100 frames/s are promised already
    handles[0].close()
    lower = sched.open(bs.header, bs.init, rate=60.0, accept_lower=True)  # 30 of the 60 asked for
    assert lower.rate == pytest.approx(30.0) and not lower.admission.realtime
    with pytest.raises(AdmissionError):  # nothing left, not even at a lower rate
        sched.open(bs.header, bs.init, accept_lower=True)


def test_scheduler_serves_streams_exactly_and_a_stalled_consumer_holds_up_no_one(tiny, decoder_for, clips, offline):
    _, bss = clips
    bs = bss["clip.promptus"]
    with StreamScheduler(decoder_for, max_queued=2) as sched:
        stalled = sched.open(bs.header, bs.init)
        live = [sched.open(bs.header, bs.init) for _ in range(2)]
        for h in [stalled, *live]:
            for kf in bs.keyframes:
                h.push(kf)
            h.end()
        outs = []
        for h in live:
            segs = []
            while (seg := h.get(timeout=30)) is not None:
                segs.append(seg)
            outs.append(torch.cat([s.frames for s in segs]))
        assert all(torch.equal(o, offline["clip.promptus"]) for o in outs)
        assert len(stalled.out) == 2  # decoded up to its queue bound, then skipped
        assert sched.capacity > 0
        stalled.close()


def test_a_viewer_the_gpu_cannot_serve_is_told_so(server):
    sched = server.app.state.promptus.scheduler
    saved = sched.capacity
    sched.capacity = 20.0  # as if the device made only 20 frames/s: 18 usable, the clip needs 60

    async def view(query):
        async with websockets.connect(server.ws(f"/ws/view/clip.promptus{query}")) as c:
            msgs = []
            try:
                while not msgs or not isinstance(msgs[-1], bytes):  # up to the first frame
                    m = await asyncio.wait_for(c.recv(), 10)
                    msgs.append(json.loads(m) if isinstance(m, str) else m)
            except websockets.ConnectionClosed:
                pass
            return msgs, c.close_code

    try:
        msgs, code = asyncio.run(view(""))
        assert code == 1013 and msgs[0]["type"] == "admission" and not msgs[0]["admitted"]
        assert msgs[0]["offer"] == pytest.approx(18.0) and "is busy" in msgs[1]["message"]
        # Accepting the lower rate: frames come, at 18 frames/s instead of 60.
        msgs, _ = asyncio.run(view("?accept_lower=1"))
        hello = msgs[0]
        assert hello["type"] == "hello" and hello["admission"]["rate"] == pytest.approx(18.0)
        assert isinstance(msgs[-1], bytes) and msgs[-1][8:10] == b"\xff\xd8"  # a JPEG frame
    finally:
        sched.capacity = saved


# ------------------------------------------------------------------ the browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser_server(tiny, tmp_path_factory, decoder_for):
    """A 4-second clip with its original video beside it, served with the viewer."""
    from promptus.video import FrameWriter, sky_clip

    root = tmp_path_factory.mktemp("browser")
    bs = make_clip(tiny, frame_count=97, interval=4, fps=24.0, seed=3)
    (root / "sky.promptus").write_bytes(to_bytes(bs))
    frames = sky_clip(frame_count=97, size=64)
    with FrameWriter(root / "sky.mp4", 24.0, crf=23) as w:
        w.write_batch(frames)
    from promptus.streaming.server import ServerLimits

    limits = ServerLimits(webrtc_loopback=True)  # tests send nothing beyond 127.0.0.1
    with ServerThread(create_app(root, decoder_for=decoder_for, limits=limits)) as s:
        yield s


def test_webrtc_loopback_mode_keeps_only_loopback_candidates():
    pytest.importorskip("aiortc", reason="aiortc (serve extra) is not installed")
    import aioice.ice

    from promptus.streaming.webrtc import gather_loopback_candidates_only, keep_loopback_candidates

    offer = ("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
             "a=candidate:1 1 udp 2122260223 192.0.2.2 50000 typ host generation 0\r\n"
             "a=candidate:2 1 udp 2122194687 127.0.0.1 50001 typ host generation 0\r\n"
             "a=candidate:3 1 udp 2122129151 abcd.local 50002 typ host generation 0\r\n"
             "a=candidate:4 1 udp 2122063615 ::1 50003 typ host generation 0\r\n"
             "a=mid:0\r\n")
    kept = keep_loopback_candidates(offer)
    assert "192.0.2.2" not in kept and ".local" not in kept
    assert "127.0.0.1 50001" in kept and "::1 50003" in kept and "a=mid:0" in kept
    original = aioice.ice.get_host_addresses
    try:
        gather_loopback_candidates_only()
        assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
    finally:
        aioice.ice.get_host_addresses = original


def _artifact(path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)


@pytest.mark.browser  # 6 s on 2 cores: headless Chromium
def test_viewer_in_headless_chromium_websocket_and_webrtc(browser_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) is not installed")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on this machine (CI installs Debian's chromium)")
    args = ["--no-sandbox", "--autoplay-policy=no-user-gesture-required",
            # host candidates as plain addresses (aiortc cannot resolve the browser's mDNS names), and
            # loopback ones: the server keeps WebRTC media on 127.0.0.1 (ServerLimits.webrtc_loopback)
            "--disable-features=WebRtcHideLocalIpsWithMdns", "--allow-loopback-in-peer-connection"]
    results = {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            logs = []
            page.on("console", lambda m: logs.append(m.text))
            for transport in ("websocket", "webrtc"):
                page.goto(browser_server.http(f"/?clip=sky.promptus&transport={transport}"))
                try:
                    page.wait_for_function(
                        "() => { const s = window.promptusViewer; return s && s.framesShown >= 24 "
                        "&& s.statsUpdates >= 3 && (s.transport === 'websocket' || s.transport === 'webrtc') "
                        "&& (s.transport !== 'webrtc' || s.videoKbps !== null) }",
                        timeout=60_000)
                except Exception:
                    print(transport, page.evaluate("() => ({...window.promptusViewer})"), "\n".join(logs))
                    raise
                state = page.evaluate("() => ({...window.promptusViewer})")
                assert state["transport"] == transport, (state, logs)
                fps = float(page.inner_text("#stat-fps"))
                kbps = float(page.inner_text("#stat-prompt-kbps"))
                h264 = float(page.inner_text("#stat-h264-kbps"))
                latency = float(page.inner_text("#stat-latency"))
                assert fps > 5 and kbps > 0 and h264 > 0 and latency > 0
                page.wait_for_timeout(500)
                shot = tmp_path / f"viewer_{transport}.png"
                page.screenshot(path=str(shot))
                _artifact(shot)
                if transport == "websocket":  # the canvas holds a real image, not a blank
                    spread = page.evaluate(
                        "() => { const c = document.getElementById('ws-canvas');"
                        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                        " let lo = 255, hi = 0; for (let i = 0; i < d.length; i += 4) {"
                        " lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); } return hi - lo; }")
                    assert spread > 20
                results[transport] = (state["codec"], fps, kbps, h264, latency, state["framesShown"])
        finally:
            browser.close()
    for t, (codec, fps, kbps, h264, latency, n) in results.items():
        print(f"\n{t}: codec {codec}, {fps:.0f} fps, prompts {kbps:.0f} kbit/s, H.264 original {h264:.0f} kbit/s, "
              f"latency {latency:.0f} ms, {n} frames shown")
    print(f"screenshots: {ARTIFACTS}")


# ------------------------------------------------------------------ the commands


@pytest.mark.slow  # 8 s on 2 cores: full tier
def test_serve_and_play_commands(clips, tmp_path, capsys):
    root, bss = clips
    repo = Path(__file__).resolve().parents[1]
    port = free_port(HOST)
    server = subprocess.Popen([sys.executable, "-m", "promptus", "-q", "serve", str(root), "--port", str(port),
                               "--model", "tiny", "--device", "cpu", "--backend", "torch"],
                              cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://{HOST}:{port}/api/status", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.2)
        from promptus.commands.main import main

        out = tmp_path / "played"
        rc = main(["-q", "play", f"ws://{HOST}:{port}/ws/prompts/clip.promptus", "--model", "tiny",
                   "--device", "cpu", "--backend", "torch", "--out", str(out)])
        printed = capsys.readouterr().out
        assert rc == 0 and "41 frames" in printed and "0 damaged or lost records" in printed
        assert len(list(out.glob("*.png"))) == 41
        with capsys.disabled():
            print("\n" + printed.strip())
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


# ---- a newcomer's first hour on a CPU (issue 25): the viewer's fallback, said on the page

@pytest.mark.browser  # 8 s on 2 cores: headless Chromium
def test_viewer_falls_back_within_seconds_and_says_so_on_the_page(tiny, tmp_path):
    """A peer connection that never connects (as where ICE cannot get through) is given up after ~3 s from its
    connection state, the page says why and shows the WebSocket frames; a short clip's chart spans the width;
    the server names its device (CPU) and has a favicon."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) is not installed")
    pytest.importorskip("aiortc", reason="aiortc (serve extra) is not installed")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no /usr/bin/chromium on this machine (CI installs Debian's chromium)")
    from test_streaming import ServerThread, make_clip

    from promptus.bitstream import to_bytes
    from promptus.streaming import backend_decoders
    from promptus.streaming.scheduler import StreamScheduler
    from promptus.streaming.server import ServerConfig, create_app

    (tmp_path / "short.promptus").write_bytes(to_bytes(make_clip(tiny, frame_count=21, interval=10, fps=8.0)))
    scheduler = StreamScheduler(backend_decoders(tiny, "torch", "cpu"), device="cpu")
    missing = []
    with ServerThread(create_app(tmp_path, scheduler=scheduler, limits=ServerConfig(webrtc_loopback=True))) as s, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("response", lambda r: r.status == 404 and missing.append(r.url))
            page.add_init_script("RTCPeerConnection.prototype.setRemoteDescription = async function () {};")
            page.goto(s.http("/?clip=short.promptus"))
            try:
                page.wait_for_function("() => window.promptusViewer.framesShown > 0 && window.promptusViewer.ended"
                                       " && window.promptusViewer.statsUpdates > 0", timeout=90_000)
            except Exception:
                print(page.evaluate("() => ({...window.promptusViewer})"))
                raise
            state = page.evaluate("() => ({...window.promptusViewer})")
            notice = page.inner_text("#notice")
            status = page.inner_text("#server-status")
            # the chart's last drawn point sits at the right edge, not in its first pixels
            right = page.evaluate("() => { const c = document.getElementById('rate-chart');"
                                  " const d = c.getContext('2d').getImageData(c.width - 12, 0, 8, c.height).data;"
                                  " let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i + 3] > 0 &&"
                                  " (d[i] > 120 || d[i + 2] > 120); return n; }")
            page.screenshot(path=str(tmp_path / "viewer_fallback.png"))
        finally:
            browser.close()
    assert state["transport"] == "websocket" and state["webrtcFailedAfterMs"] < 6000, state
    assert "WebRTC did not connect" in notice and "WebSocket" in notice, notice
    assert "on the CPU" in status and "GPU" not in status and "stream(s)" not in status, status
    assert right > 0
    assert not missing, missing
