"""Promptus Studio in a real headless Chromium (playwright driving Debian's chromium), on loopback.

One flow, as a person would use it: a bad upload and one over the size bound get
messages in the page; a tiny generated
clip is uploaded and encoded (two keyframes) while the progress bar moves; the
.promptus file is downloaded and decodes; a second run is aborted during its
second keyframe and resumed to the end; closing the page removes the session's
files. Screenshots go to outputs/test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import promptus
from promptus.video import write_frames
from netutil import free_port
from synthetic import synthetic_clip

gr = pytest.importorskip("gradio", reason="the studio needs gradio (pip install 'promptus[studio]')")
uvicorn = pytest.importorskip("uvicorn", reason="the studio test serves with uvicorn (comes with gradio)")
playwright_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (studio extra)")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
CHROMIUM = os.environ.get("PROMPTUS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (apt-get install chromium; .ci/run does)")

FRAMES, SIZE = 11, 64  # interval 10: keyframes 0 and 10


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The studio mounted under /studio of the streaming server's app (``promptus serve --studio``), on loopback."""
    from promptus.studio import build_studio, mount_studio
    from promptus.studio.settings import StudioSettings
    from promptus.studio.uploads import MB, UploadLimits

    os.environ["GRADIO_HEARTBEAT_INTERVAL"] = "1"  # notice a closed page within seconds
    work = tmp_path_factory.mktemp("studio")
    defaults = StudioSettings(size=SIZE, iters_first=25, iters=60, perceptual=False, init_latent="taesd")
    blocks = build_studio("tiny", device="cpu", defaults=defaults, limits=UploadLimits(max_bytes=5 * MB),
                          workdir=work, poll_s=0.3)
    streaming = True
    try:
        from promptus.streaming.server import create_app
        app = create_app(tmp_path_factory.mktemp("clips"), calibrate=False)
    except ImportError as e:
        streaming = False  # without the serve extra: a bare FastAPI app, the same mount
        print(f"studio test: streaming server unavailable ({e}); mounting into a bare FastAPI app")
        from fastapi import FastAPI
        app = FastAPI()
    app = mount_studio(app, "/studio", blocks=blocks)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/studio/", blocks.promptus_studio, streaming
    srv.should_exit = True
    thread.join(30)
    blocks.promptus_studio.close()
    os.environ.pop("GRADIO_HEARTBEAT_INTERVAL", None)


def _progress(page) -> dict:
    return page.eval_on_selector("#studio-progress-bar", "e => ({...e.dataset})")


def _wait_state(page, states, timeout_s):
    page.wait_for_function(
        f"() => {list(states)!r}.includes(document.querySelector('#studio-progress-bar')?.dataset.state)",
        timeout=timeout_s * 1000)
    return _progress(page)


def _status(page) -> str:
    return page.inner_text("#studio-status")


@pytest.mark.browser  # 35 s on 2 cores: headless Chromium
def test_encode_abort_resume_download_in_chromium(server, tmp_path):
    url, studio, streaming = server
    if streaming:  # the streaming server's own routes answer beside the studio
        with urllib.request.urlopen(url.replace("/studio/", "/api/clips"), timeout=30) as r:
            assert r.status == 200
    clip = tmp_path / "clip.mp4"
    write_frames(synthetic_clip(FRAMES, SIZE, SIZE).numpy(), clip, 30.0)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 50)
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(6 << 20))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#studio-banner", timeout=60_000)
        assert "Tiny test model" in page.inner_text("#studio-banner")

        # A file that is not a video: a message in the page, no stack trace.
        page.set_input_files("#studio-upload input[type=file]", str(broken))
        page.wait_for_function("document.querySelector('#studio-status').innerText.includes('cannot use')",
                               timeout=60_000)
        assert "not a readable video" in _status(page) and "Traceback" not in page.content()
        page.click("#studio-upload button[aria-label='Clear']")
        # Over the upload bound (5 MB here): refused before it is stored, said in the page.
        page.set_input_files("#studio-upload input[type=file]", str(big))
        page.wait_for_selector("text=exceed the maximum allowed size", timeout=30_000)

        # The real clip; the preset shows rank, interval and the expected rate before encoding.
        page.set_input_files("#studio-upload input[type=file]", str(clip))
        page.wait_for_function(f"document.querySelector('#studio-clip').innerText.includes('{FRAMES} frames')",
                               timeout=60_000)
        rate = page.inner_text("#studio-rate")
        assert "Rank 8 · interval 10" in rate and "kbit/s expected for this clip" in rate and "2 keyframes" in rate
        page.get_by_label("Low · about 100 kbit/s").check()
        page.wait_for_function("document.querySelector('#studio-rate').innerText.includes('Rank 4')", timeout=30_000)
        page.get_by_label("Advanced").check()
        page.wait_for_selector("#studio-rank", state="visible", timeout=30_000)
        page.get_by_label("Basic").check()
        page.get_by_label("Standard · about 225 kbit/s").check()
        page.wait_for_function("document.querySelector('#studio-rate').innerText.includes('Rank 8')", timeout=30_000)

        # Run 1: two keyframes, progress moves, then results.
        page.click("#studio-encode")
        seen = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            d = _progress(page)
            if d["state"] in ("encoding", "decoding", "done") and int(d["done"]) > 0:
                seen.append(int(d["done"]))
            if d["state"] in ("done", "failed", "aborted"):
                break
            if len(seen) == 3:
                page.screenshot(path=str(ARTIFACTS / "studio-encoding.png"), full_page=True)
            time.sleep(0.25)
        assert d["state"] == "done", (d, _status(page))
        assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # the bar moved forward several times
        assert int(d["total"]) == 25 + 60
        page.wait_for_function("document.querySelector('#studio-status').innerText.includes('Done')",
                               timeout=30_000)

        page.get_by_role("tab", name="Results").click()
        page.wait_for_function("document.querySelector('#studio-results').innerText.includes('kbit/s')",
                               timeout=30_000)
        summary = page.inner_text("#studio-results")
        assert "every byte of the file" in summary and "reproduced the encoder's closed loop exactly" in summary
        page.wait_for_selector("#studio-video video", timeout=30_000)
        with page.expect_download(timeout=60_000) as dl:
            page.click("#studio-download-promptus")
        got = tmp_path / "downloaded.promptus"
        dl.value.save_as(got)
        frames = promptus.decode(got, model="tiny", device="cpu", backend="eager")
        assert frames.shape == (FRAMES, SIZE, SIZE, 3)
        session = next(iter(studio.sessions._sessions.values()))
        assert got.read_bytes() == session.out.read_bytes()
        assert torch.equal(frames, session.shown_job.outcome.decoded)
        page.screenshot(path=str(ARTIFACTS / "studio-results.png"), full_page=True)

        # Run 2: abort during keyframe 1, then resume it to the end.
        page.get_by_role("tab", name="Encode").click()
        page.click("#studio-encode")
        page.wait_for_function("() => { const d = document.querySelector('#studio-progress-bar').dataset;"
                               " return d.state === 'encoding' && d.keyframe === '1'; }", timeout=120_000)
        t0 = time.monotonic()
        page.click("#studio-abort")
        d = _wait_state(page, ["aborted"], 30)
        stopped_in = time.monotonic() - t0
        assert stopped_in < 10, stopped_in
        assert "1 finished keyframe is kept" in _status(page)
        assert session.job.keyframes_done == 1
        page.wait_for_selector("#studio-resume:not([disabled])", timeout=10_000)
        page.click("#studio-resume")
        d = _wait_state(page, ["done", "failed"], 180)
        assert d["state"] == "done", _status(page)
        assert session.job.resume and [r.keyframe for r in session.job.outcome.result.keyframes] == [0, 1]
        page.screenshot(path=str(ARTIFACTS / "studio-encode.png"), full_page=True)
        page.get_by_role("tab", name="Performance").click()  # the last encode's time per keyframe
        page.wait_for_function("document.querySelector('#studio-keyframe-table').innerText.includes('ms / iteration')",
                               timeout=30_000)
        table = page.inner_text("#studio-keyframe-table")
        assert "0–0" in table and "1–10" in table, table  # keyframe 0 closes frame 0, keyframe 1 frames 1–10

        folder = session.folder
        assert folder.exists()
        context.close()
        browser.close()

    # The page is gone: the session's folder goes with it.
    deadline = time.monotonic() + 30
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists(), "the session's temporary folder outlived the page"
    print(f"studio: abort took effect in {stopped_in:.2f} s; screenshots in {ARTIFACTS}")
