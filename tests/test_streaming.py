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
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
websockets = pytest.importorskip("websockets", reason="the serve extra (websockets) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from promptus.backends import make_backend  # noqa: E402
from promptus.bitstream import Bitstream, Header, InitLatent, Keyframe, split_records, to_bytes  # noqa: E402
from promptus.config import CodecConfig  # noqa: E402
from promptus.decoder import Decoder  # noqa: E402
from promptus.errors import BitstreamError  # noqa: E402
from promptus.prompts import quantize_tensor  # noqa: E402
from promptus.streaming import (  # noqa: E402
    AdmissionError, ConcealingReader, Receiver, StreamScheduler, backend_decoders, create_app,
)

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

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", ws_max_size=65536,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
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


def test_garbage_from_a_client_gets_an_error_and_a_closed_socket(server):
    async def go(payload):
        async with websockets.connect(server.ws("/ws/prompts/clip.promptus")) as c:
            await c.send(payload)
            errors = []
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    m = await asyncio.wait_for(c.recv(), 10)
                    if isinstance(m, str) and json.loads(m)["type"] == "error":
                        errors.append(json.loads(m)["message"])
            return errors, c.close_code

    for payload, code in ((b"\x00\xff garbage", 1003), ("not json", 1008), ('{"type": "launch"}', 1008),
                          ('{"type": "seek", "keyframe": "x"}', 1008)):
        errors, close = asyncio.run(go(payload))
        assert errors and close == code, (payload, errors, close)
    # Over the server's message limit (64 KiB here): the connection is closed, the server lives on.
    _, close = asyncio.run(go("x" * 100_000))
    assert close == 1009
    assert httpx.get(server.http("/api/status"), timeout=10).status_code == 200
