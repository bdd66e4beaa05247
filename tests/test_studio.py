"""Promptus Studio without a browser: presets and rates, upload checks, sessions, encode jobs (abort, resume).

The page itself is tested in headless Chromium in test_studio_browser.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptus
from promptus.encoder import checkpoint_paths
from promptus.errors import PromptusError
from promptus.studio.jobs import EncodeJob, StudioModel
from promptus.studio.session import SessionRegistry
from promptus.studio.settings import (
    PRESETS, StudioSettings, describe_rate, expected_rate, frames_to_encode, preset_by_label,
)
from promptus.studio.uploads import MB, UploadError, UploadLimits, prepare_clip
from promptus.video import write_frames
from netutil import free_port, wait_listening
from synthetic import synthetic_clip

FAST = StudioSettings(size=32, rank=2, interval=3, iters_first=8, iters=6, perceptual=False, init_latent="taesd",
                      max_frames=61)


@pytest.fixture(scope="module")
def model(tiny):
    return StudioModel(tiny, "tiny", torch.device("cpu"), None)


def _mp4(path, frames=11, size=64):
    write_frames(synthetic_clip(frames, size, size).numpy(), path, 30.0)
    return path


def _zip(path, images: dict[str, np.ndarray]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in images.items():
            png = path.parent / "x.png"
            Image.fromarray(arr).save(png)
            zf.write(png, name)
    return path


# ------------------------------------------------------------- presets, rate


def test_presets_hit_their_nominal_rates_at_30_fps():
    """The factor codes of each preset land within 10 % of its name (the rest is shown separately)."""
    for p in PRESETS:
        codec = StudioSettings().with_preset(p).codec(30.0)
        est = expected_rate(codec, 301, "fp16").estimate
        assert abs(est.factor_kbps - p.nominal_kbps) / p.nominal_kbps < 0.10, (p, est.factor_kbps)
        assert preset_by_label(p.label) is p
    assert [p.nominal_kbps for p in PRESETS] == [100, 225, 450]
    with pytest.raises(PromptusError, match="unknown preset"):
        preset_by_label("Ultra")


def test_expected_rate_is_the_exact_size_of_a_raw_file_and_bounds_the_real_one(model, tmp_path):
    clip = synthetic_clip(8, 32, 32)  # keyframes 0, 3, 6 and a last one at 7
    codec = FAST.codec(24.0)
    res = promptus.Encoder(codec, FAST.train(), model.models, device="cpu", progress=False).encode(
        clip, tmp_path / "a.promptus")
    bs = promptus.read(res.path)
    raw = promptus.write(tmp_path / "raw.promptus", bs, entropy="none")
    rate = expected_rate(codec, 8, FAST.init_precision, model.models.identity())
    assert rate.file_bytes == raw
    assert res.bytes <= rate.file_bytes
    assert rate.kbps == pytest.approx(8 * raw / (8 / 24.0) / 1000)
    assert rate.framing_bytes > 0
    text = describe_rate(rate)
    assert "Rank 2 · interval 3" in text and f"{rate.kbps:.1f} kbit/s" in text and "init latent (fp16" in text


def test_settings_are_validated_with_messages():
    with pytest.raises(PromptusError, match="multiple of 8"):
        StudioSettings(size=60)
    with pytest.raises(PromptusError, match="backend"):
        StudioSettings(backend="warp")
    with pytest.raises(PromptusError, match="whole number"):
        StudioSettings(rank=2.5)
    with pytest.raises(PromptusError, match="interval 10 needs at least 11"):
        frames_to_encode(StudioSettings(), 10)
    assert frames_to_encode(StudioSettings(max_frames=40), 500) == 40
    assert StudioSettings(iters_first=5, iters=2, interval=3).total_iterations(7) == 5 + 2 * 2


# -------------------------------------------------------------------- uploads


def test_a_video_upload_is_copied_into_the_session_and_described(tmp_path):
    clip = prepare_clip(_mp4(tmp_path / "up.mp4"), tmp_path / "session" / "clip")
    assert (clip.frame_count, clip.width, clip.height, clip.fps) == (11, 64, 64, 30.0)
    # Copied: the web framework's upload may be another visitor's identical upload too.
    assert clip.path.parent == tmp_path / "session" / "clip" and (tmp_path / "up.mp4").exists()
    assert "11 frames of 64×64" in clip.describe()


def test_a_4_gb_upload_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "huge.mp4"
    with open(big, "wb") as f:  # sparse: no disk used
        f.truncate(4 << 30)
    with pytest.raises(UploadError, match=r"4\.0 GB.*up to 200\.0 MB"):
        prepare_clip(big, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name, data, message", [
    ("notes.txt", b"hello", "not a video"),
    ("fake.mp4", b"\x00garbage" * 100, "not a readable video"),
    ("empty.mp4", b"", "empty"),
    ("frames.zip", b"PK not really", "not a readable zip"),
])
def test_non_video_uploads_get_clear_messages(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UploadError, match=message):
        prepare_clip(tmp_path / name, tmp_path / "s")


def test_a_1x1_clip_is_refused(tmp_path):
    z = _zip(tmp_path / "tiny.zip", {f"{i}.png": np.zeros((1, 1, 3), np.uint8) for i in range(12)})
    with pytest.raises(UploadError, match="1×1 pixels; the studio needs at least 16×16"):
        prepare_clip(z, tmp_path / "s")


def test_a_zip_of_frames_is_unpacked_in_order_and_never_outside(tmp_path):
    frames = synthetic_clip(12, 32, 32).numpy()
    # Natural order (f2 before f10); a member that tries to escape and macOS litter are skipped.
    names = [f"../../escape/f{i}.png" if i == 3 else f"clip/f{i}.png" for i in range(12)]
    z = _zip(tmp_path / "frames.zip", dict(zip(names, frames)))
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("__MACOSX/clip/._f1.png", b"junk")
    clip = prepare_clip(z, tmp_path / "s" / "clip")
    assert clip.frame_count == 11 and (clip.width, clip.height) == (32, 32)
    files = sorted(clip.path.iterdir())
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(11)]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "s" / "escape").exists()
    for f, i in zip(files, [i for i in range(12) if i != 3]):
        assert np.array_equal(np.asarray(Image.open(f)), frames[i])


def test_zip_limits_bound_what_it_unpacks(tmp_path):
    frames = {f"{i}.png": np.full((32, 32, 3), i, np.uint8) for i in range(5)}
    with pytest.raises(UploadError, match="holds 5 images; the studio takes up to 4"):
        prepare_clip(_zip(tmp_path / "a.zip", frames), tmp_path / "s", UploadLimits(max_zip_frames=4))
    with pytest.raises(UploadError, match="unpacks to more than"):
        prepare_clip(_zip(tmp_path / "b.zip", frames), tmp_path / "s", UploadLimits(max_unpacked_bytes=200))
    with pytest.raises(UploadError, match="holds no images"):
        prepare_clip(_zip(tmp_path / "c.zip", {}), tmp_path / "s")


# -------------------------------------------------------------------- sessions


def test_sessions_have_private_folders_removed_at_the_end(tmp_path):
    reg = SessionRegistry(tmp_path, max_sessions=2)
    a = reg.get("../../etc")  # an id is a key, never a path
    assert a.folder.parent == reg.private and ".." not in a.folder.name
    (a.folder / "upload.mp4").write_bytes(b"x")
    assert reg.get("../../etc") is a
    reg.close("../../etc")
    assert not a.folder.exists() and len(reg) == 0
    b, c = reg.get("b"), reg.get("c")
    d = reg.get("d")  # over the bound: the least recently used idle session goes
    assert not b.folder.exists() and c.folder.exists() and d.folder.exists()
    with pytest.raises(PromptusError, match="no session"):
        reg.get(None)
    reg.close_all()
    assert not reg.root.exists() and tmp_path.exists()


# ------------------------------------------------------------------------ jobs


def _wait(job, state_ok, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        p = job.snapshot()
        if state_ok(p):
            return p
        time.sleep(0.02)
    raise AssertionError(f"timed out; last progress {job.snapshot()}")


@pytest.mark.slow  # 14 s on 2 cores: full tier
def test_abort_stops_within_seconds_keeps_keyframes_and_resume_finishes(model, tmp_path):
    folder = tmp_path / "session"
    clip = prepare_clip(_mp4(tmp_path / "clip.mp4", frames=10, size=32), folder / "clip")  # keyframes 0, 3, 6, 9
    settings = FAST.replace(iters=60)
    out = folder / "encode" / "clip.promptus"
    job = EncodeJob(model, settings, clip, out).start()
    p = _wait(job, lambda p: p.keyframe == 1 and p.iteration >= 2 or p.finished)
    assert p.state == "encoding" and p.done > settings.iters_first
    assert job.preview().shape == (32, 64, 3)  # the keyframe's original beside its reconstruction
    t0 = time.monotonic()
    job.abort()
    assert job.wait(10), "the encode did not stop within 10 s"
    stopped_in = time.monotonic() - t0
    p = job.snapshot()
    assert p.state == "aborted" and "1 finished keyframe is kept" in p.message, p
    assert job.keyframes_done == 1 and stopped_in < 5
    assert not out.exists() and checkpoint_paths(out)[1].exists()

    other = EncodeJob(model, settings.replace(iters=7), clip, out, resume=True).start()
    assert other.wait(60)
    assert other.snapshot().state == "failed" and "different train" in other.snapshot().message

    resumed = EncodeJob(model, settings, clip, out, resume=True).start()
    assert resumed.wait(300)
    p = resumed.snapshot()
    assert p.state == "done" and p.done == p.total == settings.iters_first + 3 * settings.iters, p
    o = resumed.outcome
    assert [r.keyframe for r in o.result.keyframes] == [0, 1, 2, 3]
    frames = promptus.decode(out, model="tiny", device="cpu", backend="eager")
    assert frames.shape == (10, 32, 32, 3) and torch.equal(frames, o.decoded)
    assert o.matches_closed_loop and len(o.psnr) == 10 and o.ssim is not None and len(o.ssim) == 10
    assert o.file_bytes == os.path.getsize(out) <= o.expected.file_bytes
    assert o.kbps == pytest.approx(8 * o.file_bytes / (10 / 30) / 1000)
    assert all(v.is_file() and v.stat().st_size > 0 for v in o.videos.values())


def test_a_clip_shorter_than_one_interval_fails_at_once(model, tmp_path):
    clip = prepare_clip(_mp4(tmp_path / "c.mp4", frames=3, size=32), tmp_path / "s")
    with pytest.raises(PromptusError, match="interval 3 needs at least 4"):
        EncodeJob(model, FAST, clip, tmp_path / "o.promptus")


def test_an_encode_waits_for_the_machine_and_can_be_aborted_while_waiting(model, tmp_path):
    import threading

    clip = prepare_clip(_mp4(tmp_path / "c.mp4", frames=10, size=32), tmp_path / "s")
    machine = threading.Lock()
    machine.acquire()  # someone else's encode
    job = EncodeJob(model, FAST, clip, tmp_path / "o.promptus", machine=machine).start()
    p = _wait(job, lambda p: "another session" in p.message)
    assert p.state == "waiting"
    job.abort()
    assert job.wait(5) and job.snapshot().state == "aborted"
    machine.release()


# ----------------------------------------------------------------- performance


@pytest.mark.slow  # 25 s on 2 cores: full tier
def test_performance_tab_runs_the_library_benchmark_with_the_eager_baseline(model, tmp_path):
    pytest.importorskip("gradio", reason="the page needs gradio (pip install 'promptus[studio]')")
    from promptus.studio.app import Studio

    studio = Studio(model, defaults=FAST, workdir=tmp_path)
    try:
        import promptus.studio.app as app

        calls = {}
        real = app.run_decode_benchmark

        def small(*args, **kwargs):  # the page's call, on a clip small enough for a test
            calls.update(kwargs)
            return real(*args, **dict(kwargs, keyframes=2, reps=1))

        app.run_decode_benchmark = small
        try:
            steps = list(studio.on_bench(["torch"], 32, 3))  # what runs, at once; then the table
            (first, _), (note, table) = steps[0], steps[-1]
        finally:
            app.run_decode_benchmark = real
    finally:
        studio.close()
    assert calls["size"] == 32 and calls["batch"] == 3
    assert list(table["backend"]) == ["eager", "torch"] and list(table["status"]) == ["ok", "ok"]
    assert table["vs eager"][0] == "1.00×" and table["FPS to host"].min() > 0
    assert "segment ms" in table.columns and "one segment of 3 frames" in note and "model tiny" in note
    assert "measuring eager, torch" in first and len(steps) == 2
    assert not (tmp_path / studio.sessions.root.name).exists()


# --------------------------------------------------------------------- command


@pytest.mark.slow  # 12 s on 2 cores: full tier
def test_promptus_studio_serves_on_loopback_and_cleans_up_on_ctrl_c(tmp_path):
    pytest.importorskip("gradio", reason="the studio needs gradio (pip install 'promptus[studio]')")
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "promptus", "studio", "--model", "tiny", "--device", "cpu",
                             "--port", str(port), "--workdir", str(tmp_path)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        page = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, proc.communicate(timeout=30)[0] if proc.poll() is not None else "no answer"
        assert "Promptus Studio" in page
        assert len(list(tmp_path.iterdir())) == 1  # the server's own folder inside --workdir
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"open http://127.0.0.1:{port}/" in out and "Traceback" not in out, out
    assert list(tmp_path.iterdir()) == []  # sessions and the server's folder removed, --workdir kept


def test_orphaned_server_folders_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / "promptus-studio-orphan"
    (orphan / "s1").mkdir(parents=True)
    (orphan / "owner.pid").write_text(dead.stdout.strip())
    unknown = tmp_path / "promptus-studio-unknown"  # no owner file: not ours to judge
    unknown.mkdir()
    live = SessionRegistry(tmp_path)
    again = SessionRegistry(tmp_path)  # a second server beside a live one keeps it
    assert not orphan.exists() and unknown.exists() and live.root.exists() and again.root.exists()
    live.close_all()
    again.close_all()


def test_previews_are_session_files_and_only_the_last_two_stay(tmp_path):
    s = SessionRegistry(tmp_path).get("a")
    paths = [s.view("preview", np.full((8, 8, 3), i, np.uint8)) for i in range(5)]
    assert [p.exists() for p in paths] == [False, False, False, True, True]
    assert paths[-1].parent.parent == s.public and len(set(paths)) == 5
    assert np.asarray(Image.open(paths[-1]))[0, 0, 0] == 4


# ---- a newcomer's first hour on a CPU (issue 25): Ctrl-C in the background, the studio's words on a CPU

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # 10 s on 2 cores: full tier
def test_studio_started_in_the_background_stops_on_ctrl_c(tmp_path):
    pytest.importorskip("gradio", reason="the studio needs gradio (pip install 'promptus[studio]')")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "promptus", "studio", "--model", "tiny", "--device", "cpu",
                             "--port", str(port), "--workdir", str(tmp_path)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_listening(proc, port, timeout=180)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in out, out
    assert list(tmp_path.iterdir()) == []  # closed as on Ctrl-C: the sessions' files are gone


def test_studio_counts_keyframes_from_one_and_offers_no_gpu_backends_on_a_cpu():
    app = pytest.importorskip("promptus.studio.app", reason="the studio needs gradio")
    from promptus.studio.jobs import Progress

    text = app.progress_html(Progress("encoding", keyframe=1, keyframes=2, iteration=3, iterations=40))
    assert "keyframe 2 of 2" in text
    assert "keyframe 1 of 7" in app.progress_html(Progress("encoding", keyframe=0, keyframes=7, iterations=150))
    assert not set(app.offered_backends("cpu")) & {"compile", "tensorrt"}
    assert "eager" in app.offered_backends("cpu")
    assert set(app.GPU_ONLY_BACKENDS) <= set(app.offered_backends("cuda"))
    theme = app.offline_theme()  # no web font: an offline page renders every letter in one typeface
    assert "googleapis" not in str(theme._stylesheets) and "#studio-abort:disabled" in app.STUDIO_CSS
