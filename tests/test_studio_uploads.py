"""The studio in front of strangers (issue 23, findings 9-13).

Uploads: sizes are read from headers before any pixel, and a hostile upload under
1 MB costs at most 100 MB more memory than a valid one of the same kind (measured as
the rise of the process's peak resident set, tests/bounded.py). Sessions: tested
through HTTP as a second visitor would, against a studio mounted in the streaming
server (``promptus serve --studio``), which must also clean up on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptus.studio.uploads import UploadError, UploadLimits, prepare_clip
from promptus.video import write_frames

from bounded import bounded_memory
from netutil import free_port
from synthetic import synthetic_clip

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
#: The promise: a hostile upload under 1 MB costs at most this much more than a valid one.
GROWTH_MB = 100


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming ``width``×``height`` RGB pixels (no pixel data follows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)))


def _png(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _valid_zip(path: Path, frames: int = 12, size: int = 64) -> Path:
    clip = synthetic_clip(frames, size, size).numpy()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, f in enumerate(clip):
            zf.writestr(f"{i:05d}.png", _png(f))
    return path


def _mp4(path: Path, frames: int = 11, size: int = 64) -> Path:
    write_frames(synthetic_clip(frames, size, size).numpy(), path, 30.0)
    return path


# ------------------------------------------------------------------ finding 9


def test_a_zip_of_one_20000_pixel_png_is_refused_at_upload_and_leaves_nothing(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("00000.png", _png_header(20000, 20000) + b"\x00" * 1000)
    dest = tmp_path / "session" / "clip"
    with pytest.raises(UploadError, match="20000×20000 pixels"):
        prepare_clip(z, dest)
    assert not dest.exists()


# ------------------------------------------------------------------ finding 12


@pytest.fixture(scope="module")
def hostile_zip(tmp_path_factory):
    """Hostile zips under 1 MB, beside a valid zip of frames."""
    d = tmp_path_factory.mktemp("hostile_zip")
    # A zip bomb: a real 64×64 PNG followed by 300 MB of zeros, deflated to about 300 kB.
    bomb = d / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("00000.png", "w", force_zip64=True) as f:
        f.write(_png(np.zeros((64, 64, 3), np.uint8)))
        zero = bytes(1 << 20)
        for _ in range(300):
            f.write(zero)
    # Many members that each claim a 4096×4096 frame with nothing behind the header.
    claims = d / "claims.zip"
    with zipfile.ZipFile(claims, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(200):
            zf.writestr(f"{i:05d}.png", _png_header(4096, 4096))
    return _valid_zip(d / "valid.zip"), [bomb, claims]


@pytest.fixture(scope="module")
def hostile_video(tmp_path_factory):
    """An H.264 clip of one 8000×8000 frame (under 1 MB), beside a valid 64×64 clip."""
    d = tmp_path_factory.mktemp("hostile_video")
    big = d / "big.mp4"
    code = ("import av, sys\n"
            "with av.open(sys.argv[1], 'w') as c:\n"
            "    s = c.add_stream('libx264', rate=30); s.width = s.height = 8000; s.pix_fmt = 'yuv420p'\n"
            "    s.options = {'preset': 'ultrafast', 'crf': '51'}\n"
            "    f = av.VideoFrame(8000, 8000, 'yuv420p')\n"
            "    for p in f.planes: p.update(bytes(p.buffer_size))\n"
            "    for pkt in [*s.encode(f), *s.encode()]: c.mux(pkt)\n")
    # Made in a child process: encoding it takes memory and time this process should not measure.
    r = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, timeout=300)
    if r.returncode:
        pytest.skip(f"could not make the 8000×8000 H.264 clip (libx264?): {r.stderr[-300:]}")
    return _mp4(d / "valid.mp4"), [big]


def _peak(upload: Path, dest: Path) -> tuple[float, Exception | None]:
    with bounded_memory(ceiling_mb=3072) as m:
        try:
            prepare_clip(upload, dest)
            err = None
        except UploadError as e:
            err = e
    return m.peak_mb, err


def _compare(valid: Path, attacks: list[Path], tmp_path: Path, kind: str) -> None:
    base, err = _peak(valid, tmp_path / "valid")
    assert err is None, err
    for i, upload in enumerate(attacks):
        dest = tmp_path / f"s{i}"
        peak, err = _peak(upload, dest)
        print(f"\n{upload.name} ({upload.stat().st_size:,} bytes): +{peak:.0f} MB (valid {kind}: +{base:.0f} MB): {err}")
        assert upload.stat().st_size < 1 << 20, (upload, upload.stat().st_size)
        assert isinstance(err, UploadError), f"{upload.name} was accepted"
        assert not dest.exists()
        assert peak <= base + GROWTH_MB, f"{upload.name}: +{peak:.0f} MB against +{base:.0f} MB for a valid {kind}"


def test_hostile_zips_under_1_mb_cost_at_most_100_mb_more_than_a_valid_one(hostile_zip, tmp_path):
    _compare(*hostile_zip, tmp_path, "zip")


@pytest.mark.slow  # libx264 encodes an 8000×8000 frame first (a few seconds)
def test_a_huge_video_under_1_mb_is_refused_at_upload_for_at_most_100_mb_more(hostile_video, tmp_path):
    """Finding 12: refused at upload (not at encode), sized from the stream before any frame is decoded."""
    _compare(*hostile_video, tmp_path, "video")
    with pytest.raises(UploadError, match="8000×8000 pixels"):
        prepare_clip(hostile_video[1][0], tmp_path / "s", UploadLimits())


# --------------------------------------------------------- a studio on loopback


gradio = pytest.importorskip("gradio", reason="the studio needs gradio (pip install 'promptus[studio]')")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client comes with gradio")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

SETTINGS = ["Basic", "Standard · about 225 kbit/s", 8, 10, 128, 10, 10, "taesd", "fp16", False, "torch", 12]


@pytest.fixture(scope="module")
def studio_server(tiny, tmp_path_factory):
    """``promptus serve --studio`` in this process: the streaming app with the studio mounted at /studio."""
    import torch

    from promptus.streaming import create_app
    from promptus.studio.app import build_studio, mount_studio
    from promptus.studio.jobs import StudioModel

    gradio_tmp = tmp_path_factory.mktemp("gradio")
    saved = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_tmp)
    root = tmp_path_factory.mktemp("served")
    app = create_app(root)
    blocks = build_studio(StudioModel(tiny, "tiny", torch.device("cpu"), None))
    studio = blocks.promptus_studio
    mount_studio(app, "/studio", blocks=blocks)
    port = free_port(HOST)
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the studio server did not start"
        time.sleep(0.1)
    try:
        yield studio, f"http://{HOST}:{port}/studio/"
    finally:
        server.should_exit = True
        thread.join(30)
        if saved is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved


def _visitor(url: str):
    return gradio_client.Client(url, verbose=False, download_files=False)


def _upload(client, file) -> str:
    clip_md, status, _ = client.predict(file, *SETTINGS, api_name="/on_upload")
    return status


def _session_of(studio, client):
    return studio.sessions._sessions[client.session_hash]


def test_a_visitor_cannot_take_or_read_another_visitors_files(studio_server, tmp_path):
    """Finding 10, through HTTP: B names A's files; B reads what A's links reveal."""
    studio, url = studio_server
    a, b = _visitor(url), _visitor(url)
    status = _upload(a, gradio_client.handle_file(str(_mp4(tmp_path / "a.mp4"))))
    assert "clip loaded" in status, status
    victim = _session_of(studio, a)
    clip = victim.clip.path
    assert clip.exists()
    # B hands on_upload a raw path inside A's folder, as a crafted request can (plain HTTP: no upload).
    filedata = {"path": str(clip), "meta": {"_type": "gradio.FileData"}, "orig_name": "clip.mp4"}
    event = httpx.post(url + "gradio_api/call/on_upload", json={"data": [filedata, *SETTINGS]}, timeout=30)
    assert event.status_code == 200, event.text
    answer = httpx.get(url + f"gradio_api/call/on_upload/{event.json()['event_id']}", timeout=60).text
    assert "clip loaded" not in answer and ("error" in answer.lower()), answer[:500]
    assert clip.exists() and victim.clip is not None
    # A's page links to a published copy of its file; the link works, and reveals nothing else.
    link = victim.publish(clip)
    base = url + "gradio_api/file="
    assert httpx.get(base + str(link), timeout=30).status_code == 200
    for secret in (clip, studio.sessions.root / "owner.pid", victim.folder / "clip" / "clip.mp4",
                   link.parent.parent.parent / "owner.pid"):
        r = httpx.get(base + str(secret), timeout=30)
        assert r.status_code in (403, 404), (secret, r.status_code)


def test_two_visitors_uploading_identical_bytes_both_get_their_clip(studio_server, tmp_path):
    """Finding 11: the framework stores identical uploads at one path; each session takes a copy."""
    studio, url = studio_server
    same = _mp4(tmp_path / "same.mp4")
    a, b = _visitor(url), _visitor(url)
    assert "clip loaded" in _upload(a, gradio_client.handle_file(str(same)))
    assert "clip loaded" in _upload(b, gradio_client.handle_file(str(same)))
    ca, cb = _session_of(studio, a).clip.path, _session_of(studio, b).clip.path
    assert ca != cb and ca.read_bytes() == cb.read_bytes() == same.read_bytes()


def test_a_refused_bomb_upload_shows_a_message_and_leaves_no_files(studio_server, tmp_path):
    """Finding 9 through the page: a message, not a bare "Error", and nothing left in the session."""
    studio, url = studio_server
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("00000.png", _png_header(20000, 20000) + b"\x00" * 1000)
    c = _visitor(url)
    status = _upload(c, gradio_client.handle_file(str(z)))
    assert "20000×20000" in status, status
    s = _session_of(studio, c)
    assert not s.upload_dir.exists()


# ------------------------------------------------------------------ finding 13


@pytest.mark.slow  # starts `promptus serve --studio` (torch and Gradio imports, the tiny model)
def test_serve_with_the_studio_removes_the_visitors_files_on_sigterm(tmp_path):
    port = free_port(HOST)
    gradio_tmp = tmp_path / "gradio"
    root = tmp_path / "served"
    root.mkdir()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(gradio_tmp), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "promptus", "serve", str(root), "--studio", "--no-viewer",
                             "--model", "tiny", "--device", "cpu", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://{HOST}:{port}/studio/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=30)[0]
            time.sleep(0.5)
        client = _visitor(f"http://{HOST}:{port}/studio/")
        assert "clip loaded" in _upload(client, gradio_client.handle_file(str(_mp4(tmp_path / "v.mp4"))))
        folders = list(gradio_tmp.glob("promptus-studio-*"))
        assert folders and any(folders[0].rglob("clip.mp4"))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in out, out
    assert not list(gradio_tmp.glob("promptus-studio-*")), out


# ---- a newcomer's first hour on a CPU (issue 25): upload errors in words

def test_an_upload_error_names_no_errno_and_no_temporary_path(tmp_path):
    uploads = pytest.importorskip("promptus.studio.uploads", reason="the studio needs gradio")
    (tmp_path / "fake.mp4").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(uploads.UploadError) as e:
        uploads.prepare_clip(tmp_path / "fake.mp4", tmp_path / "s")
    assert "Errno" not in str(e.value) and str(tmp_path) not in str(e.value), str(e.value)
    assert "not a readable video" in str(e.value)
