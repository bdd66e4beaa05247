"""Issue 25, the first hour on a laptop: CPU threads, CPU-sized encodes, the perceptual loss without
weights, the same bytes for the same thread count, servers that stop on Ctrl-C, `serve` and `play`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptus
from promptus.bench import random_bitstream
from promptus.commands import common
from promptus.commands import play as play_cmd
from promptus.commands import serve as serve_cmd
from promptus.commands.encode import run_encode
from promptus.commands.main import build_parser, main
from promptus.config import CPU_ITERS, CPU_ITERS_FIRST, SLOW_ENCODE_WARNING_S, THREADS_ENV, TINY_SIZE
from promptus.errors import PromptusError
from promptus.threads import cpu_thread_count
from promptus.video import FrameWriter, synthetic_clip

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for i, f in enumerate(synthetic_clip(9, 32, 32).numpy()):
        Image.fromarray(f).save(folder / f"{i:05d}.png")
    return folder


def tiny_file(folder: Path, tiny, name: str = "clip.promptus", frames: int = 9) -> Path:
    cfg = promptus.CodecConfig(width=32, height=32, rank=2, interval=4, fps=24)
    path = folder / name
    promptus.write(path, random_bitstream(cfg, cfg.keyframe_count(frames), identity=tiny.identity()))
    return path


# ------------------------------------------------------------------ 1. threads


def test_thread_count_precedence_flag_env_omp_model():
    assert cpu_thread_count("tiny", environ={})[0] == 1  # the measured best for the tiny model
    assert cpu_thread_count("sd-turbo", environ={})[0] is None  # torch's default
    assert cpu_thread_count("tiny", environ={"OMP_NUM_THREADS": "2"})[0] is None  # torch already follows it
    assert cpu_thread_count("tiny", environ={THREADS_ENV: "3", "OMP_NUM_THREADS": "2"})[0] == 3
    assert cpu_thread_count("tiny", 2, environ={THREADS_ENV: "3"}) == (2, "--threads")
    for bad in ("0", "two", "-1"):
        with pytest.raises(PromptusError, match="whole number"):
            cpu_thread_count("tiny", environ={THREADS_ENV: bad})


def test_every_model_command_takes_threads():
    parser = build_parser()
    for command in ("encode", "decode", "demo", "serve", "play", "studio"):
        args = parser.parse_args([command, "x", "-o", "y", "--threads", "2"] if command in ("encode", "decode")
                                 else [command, "x", "--threads", "2"] if command in ("serve", "play")
                                 else [command, "--threads", "2"])
        assert args.threads == 2, command


def test_commands_set_the_thread_count_and_put_it_back(tmp_path, tiny, keep_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    path = tiny_file(tmp_path, tiny)
    seen = []
    real = promptus.decoder.Decoder.__init__

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        real(self, *a, **k)

    monkeypatch.setattr(promptus.decoder.Decoder, "__init__", spy)
    torch.set_num_threads(2)
    assert main(["-q", "decode", str(path), "-o", f"{tmp_path / 'a'}/", "--device", "cpu"]) == 0
    assert main(["-q", "decode", str(path), "-o", f"{tmp_path / 'b'}/", "--device", "cpu", "--threads", "2"]) == 0
    monkeypatch.setenv(THREADS_ENV, "3")
    assert main(["-q", "decode", str(path), "-o", f"{tmp_path / 'c'}/", "--device", "cpu"]) == 0
    assert seen == [1, 2, 3]
    assert torch.get_num_threads() == 2  # the caller's count is back after every command


# ---------------------------------------------------------- 2. CPU-sized defaults, projection


def encode_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["encode", "clip", "-o", "x.promptus", *extra])


def test_encode_on_a_cpu_takes_quick_defaults_and_says_so(capsys):
    args = encode_args("--model", "tiny")
    common.resolve_encoder_defaults(args, torch.device("cpu"), "tiny", "encode")
    assert (args.size, args.iters_first, args.iters) == (TINY_SIZE, CPU_ITERS_FIRST, CPU_ITERS)
    out = capsys.readouterr().out
    assert f"--size {TINY_SIZE} --iters-first {CPU_ITERS_FIRST} --iters {CPU_ITERS}" in out and "on the CPU" in out

    args = encode_args("--size", "64", "--iters", "7")  # what is given stays; SD-Turbo keeps 512 px
    common.resolve_encoder_defaults(args, torch.device("cpu"), "sd-turbo", "encode")
    assert (args.size, args.iters_first, args.iters) == (64, CPU_ITERS_FIRST, 7)
    assert "--iters-first" in capsys.readouterr().out

    args = encode_args()
    common.resolve_encoder_defaults(args, torch.device("cuda"), "sd-turbo", "encode")
    assert (args.size, args.iters_first, args.iters) == (512, 10_000, 1_500)
    assert capsys.readouterr().out == ""  # the published values need no note


def test_encode_help_states_the_cpu_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["encode"].format_help()
    assert f"{CPU_ITERS_FIRST} on a CPU" in text and "--perceptual {auto,on,off}" in text


def forecast_calls(forecast, keyframe, seconds_per_iteration, clock):
    for it in range(10):
        forecast({"keyframe": keyframe, "iteration": it})
        clock[0] += seconds_per_iteration


@pytest.mark.parametrize("kf0, kf1, warns, says", [
    (0.5, None, True, "at least 1 h 35 min"),  # 0.5 · (10 000 + 1 500 · 1): too long whatever keyframe 1 costs
    (0.01, 0.5, True, "about 12 min"),  # keyframe 0 quick, but a segment's iteration is slow
    (0.01, 0.02, False, ""),
])
def test_a_long_cpu_encode_is_announced_with_its_projected_time(kf0, kf1, warns, says, monkeypatch, caplog):
    codec = promptus.CodecConfig(width=64, height=64)
    train = promptus.TrainConfig(iters_first=10_000 if kf1 is None else 150, iters=1_500, perceptual=False)
    forecast = common.EncodeForecast(codec, train, frame_count=11, command="encode")
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="promptus"):
        forecast_calls(forecast, 0, kf0, clock)
        if kf1 is not None:
            clock[0] += kf0 * 140
            forecast_calls(forecast, 1, kf1, clock)
    assert ("projected to take" in caplog.text) == warns and forecast.warned == warns
    assert says in caplog.text
    if warns:
        assert "--resume" in caplog.text and forecast.projected_s > SLOW_ENCODE_WARNING_S


def test_describe_duration():
    assert [common.describe_duration(s) for s in (45, 125, 600, 3 * 3600 + 12 * 60)] == \
        ["45 s", "2 min 5 s", "10 min", "3 h 12 min"]


# ------------------------------------------------------------------ 3. perceptual loss


def test_perceptual_auto_turns_off_with_a_note_without_weights(monkeypatch, capsys):
    import promptus.losses

    monkeypatch.setattr(promptus.losses, "vgg19_weights_available", lambda online=None: False)
    args = encode_args()
    assert args.perceptual == "auto"
    common.resolve_perceptual(args, "encode")
    assert args.perceptual == "off" and "perceptual loss off" in capsys.readouterr().out
    args = encode_args("--perceptual", "on")  # asked for: kept, and the loader's error says where to get it
    common.resolve_perceptual(args, "encode")
    assert args.perceptual == "on"
    args = encode_args("--vgg", "my.pth")
    common.resolve_perceptual(args, "encode")
    assert args.perceptual == "on"
    monkeypatch.setattr(promptus.losses, "vgg19_weights_available", lambda online=None: True)
    args = encode_args()
    common.resolve_perceptual(args, "encode")
    assert args.perceptual == "on" and capsys.readouterr().out == ""


def test_vgg_weights_are_found_in_torch_hub_without_reading_them(tmp_path, monkeypatch):
    from promptus.losses import VGG19_FILE, vgg19_weights_available

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    assert not vgg19_weights_available(online=False)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / VGG19_FILE).write_bytes(b"not read")
    assert vgg19_weights_available(online=False)


# ------------------------------------------------------------------ 8. determinism


def test_encode_gives_the_same_bytes_and_decode_the_encoders_frames(clip_folder, tmp_path, tiny, capsys,
                                                                     keep_threads, monkeypatch):
    """The promise of docs/determinism.md on the CPU: the same inputs and thread count give the same bytes, and
    `promptus decode` (the same default thread count) gives exactly the encoder's closed-loop frames — what the
    demo prints as 'closed loop inf dB'. The test process itself runs on two threads."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    torch.set_num_threads(2)
    opts = ["--model", "tiny", "--device", "cpu", "--size", "32", "--interval", "4", "--rank", "2",
            "--iters-first", "4", "--iters", "3", "--perceptual", "off", "--init-latent", "taesd"]
    outs = []
    for name in ("a", "b"):
        args = build_parser().parse_args(["encode", str(clip_folder), "-o", str(tmp_path / f"{name}.promptus"),
                                          *opts])
        args.quiet = True
        res = run_encode(args, args.input, args.output)
        outs.append((Path(args.output).read_bytes(), res.reconstruction))
        common._restore_threads and torch.set_num_threads(common._restore_threads.pop())
    assert outs[0][0] == outs[1][0]  # same bytes
    assert main(["-q", "decode", str(tmp_path / "a.promptus"), "-o", f"{tmp_path / 'dec'}/", "--device", "cpu"]) == 0
    decoded = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "dec").glob("*.png"))])
    assert np.array_equal(decoded, outs[0][1].numpy())  # the encoder's reconstruction, bit for bit


def test_determinism_is_documented_and_the_demo_says_what_it_compares():
    doc = (ROOT / "docs" / "determinism.md").read_text()
    assert "thread count" in doc and "--threads" in doc and THREADS_ENV in doc
    demo = (ROOT / "promptus" / "commands" / "demo.py").read_text()
    assert "same thread count" in demo


# ------------------------------------------------------------------ 4, 6, 7: serve and play


def test_serve_takes_the_built_in_model_every_header_names(tmp_path, tiny):
    tiny_file(tmp_path, tiny, "a.promptus")
    (tmp_path / "sub").mkdir()
    tiny_file(tmp_path / "sub", tiny, "b.promptus")
    (tmp_path / "broken.promptus").write_bytes(b"not a file")
    args = argparse.Namespace(model="auto")
    assert serve_cmd.model_for_folder(args, tmp_path) == "tiny"
    assert serve_cmd.model_for_folder(argparse.Namespace(model="x.safetensors"), tmp_path) == "x.safetensors"
    other = promptus.CodecConfig(width=32, height=32, rank=2, interval=4)
    promptus.write(tmp_path / "c.promptus", random_bitstream(other, 2))  # names no built-in model
    assert serve_cmd.model_for_folder(args, tmp_path) == "auto"


def test_play_refuses_a_url_without_a_clip_and_a_missing_server_before_loading_a_model(monkeypatch, capsys):
    monkeypatch.setattr(play_cmd, "load_models", lambda *a, **k: pytest.fail("loaded the model first"))
    for url in ("http://127.0.0.1:8000/", "ws://127.0.0.1:8000/ws/prompts/", "http://127.0.0.1:8000"):
        assert main(["play", url]) == 1
        assert "names no clip" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    assert main(["play", f"ws://127.0.0.1:{port}/ws/prompts/demo.promptus"]) == 1
    err = capsys.readouterr().err
    assert f"no server at 127.0.0.1:{port}" in err and time.monotonic() - t0 < 10, err


def test_frame_writer_numbers_pngs_from_the_first_frame(tmp_path):
    with FrameWriter(tmp_path / "out", 24, first=20) as w:
        w.write_batch(np.zeros((3, 8, 8, 3), np.uint8))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00020.png", "00021.png", "00022.png"]


@pytest.mark.slow  # 13 s on 2 cores: full tier
def test_serve_started_in_the_background_stops_on_ctrl_c_and_play_from_a_seek_point(tmp_path, tiny):
    """`promptus serve &` from a script inherits SIGINT as ignored; Ctrl-C must still stop it. Served without
    --model: the files' headers name the tiny model. `play --start 2` writes the frames it shows, numbered as in
    the clip, and counts only those."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    tiny_file(tmp_path, tiny, frames=13)  # keyframes 0, 4, 8, 12
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "promptus", "serve", str(tmp_path), "--port", str(port),
                               "--device", "cpu", "--checkpoints", str(tmp_path / "none"), "--fast"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.communicate()[0]
                time.sleep(0.3)
        out = tmp_path / "played"
        rc = subprocess.run([sys.executable, "-m", "promptus", "play", f"http://127.0.0.1:{port}/clip.promptus",
                             "--start", "2", "--fast", "--out", f"{out}/", "--device", "cpu", "--model", "tiny"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert rc.returncode == 0, rc.stderr
        assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(5, 13)], rc.stdout
        assert "frames 5–12 of 13: 8 frames (and 5 regenerated unseen" in rc.stdout, rc.stdout
        server.send_signal(signal.SIGINT)
        printed = server.communicate(timeout=60)[0]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode is not None and "made with the built-in tiny model" in printed, printed


def test_ctrl_c_is_honoured_again_when_inherited_as_ignored():
    """A shell script's `promptus studio &` starts with SIGINT ignored; the servers reinstall Python's handler."""
    code = ("import os, signal, time\n"
            "from promptus.commands.common import honour_ctrl_c\n"
            "assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN\n"
            "honour_ctrl_c()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert run.stdout.strip() == "interrupted", run.stderr


@pytest.mark.slow  # 10 s on 2 cores: full tier
def test_studio_started_in_the_background_stops_on_ctrl_c(tmp_path):
    pytest.importorskip("gradio", reason="the studio needs gradio (pip install 'promptus[studio]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "promptus", "studio", "--model", "tiny", "--device", "cpu",
                             "--port", str(port), "--workdir", str(tmp_path)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
                time.sleep(0.5)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in out, out
    assert list(tmp_path.iterdir()) == []  # closed as on Ctrl-C: the sessions' files are gone


# ------------------------------------------------------------------ 10. noise


def test_other_libraries_info_messages_stay_out_and_ours_keep_the_prefix():
    code = ("import argparse, logging\n"
            "from promptus.commands.common import setup_logging\n"
            "setup_logging(argparse.Namespace(verbose=False, quiet=False))\n"
            "logging.getLogger('matplotlib.font_manager').info('generated new fontManager')\n"
            "logging.getLogger('aiortc.rtcrtpsender').info('RTCRtpSender(video) > sending')\n"
            "logging.getLogger('promptus.encoder').info('ours')\n"
            "logging.getLogger('aioice.ice').warning('theirs')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=60)
    assert run.stderr == "promptus: ours\naioice.ice: theirs\n", run.stderr


def test_the_viewers_status_polls_stay_out_of_the_access_log():
    def record(path):
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5", "GET", path, "1.1", 200), None)

    f = serve_cmd.QuietPolls()
    assert not f.filter(record("/api/status")) and f.filter(record("/files/clip.promptus"))
    config = serve_cmd.uvicorn_log_config()
    assert config["handlers"]["access"]["filters"] == ["quiet_polls"]


def test_demo_prints_the_rate_once_and_bench_on_a_cpu_has_no_gpu_words(tmp_path, tiny):
    from promptus.commands.bench import format_decode_table
    from promptus.commands.encode import encode_summary

    class Res:
        path, frame_count, keyframes, bytes, mean_psnr = tiny_file(tmp_path, tiny), 9, [0, 1, 2], 1, 10.0

    assert "bitrate" in encode_summary(Res()) and "bitrate" not in encode_summary(Res(), rate=False)
    nan = float("nan")
    table = format_decode_table(dict(device="cpu", torch="2", model="tiny", size=64, batch=4, frames_timed=8,
                                     dtype="float32", unet_tflop_per_batch=0.01, decoder_tflop_per_batch=0.01,
                                     matmul_ceiling_tflops=nan, arithmetic_limit_fps=nan, rows=[]))
    assert "nan" not in table and "GPU" not in table and "fp16" not in table.split("PSNR")[0]


# ------------------------------------------------------------------ 5, 11. the viewer


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


# ------------------------------------------------------------------ 9. the studio's words


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


def test_an_upload_error_names_no_errno_and_no_temporary_path(tmp_path):
    uploads = pytest.importorskip("promptus.studio.uploads", reason="the studio needs gradio")
    (tmp_path / "fake.mp4").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(uploads.UploadError) as e:
        uploads.prepare_clip(tmp_path / "fake.mp4", tmp_path / "s")
    assert "Errno" not in str(e.value) and str(tmp_path) not in str(e.value), str(e.value)
    assert "not a readable video" in str(e.value)


# ------------------------------------------------------------------ 12. the sweep's plot


@pytest.mark.parametrize("model, says", [("tiny", True), ("sd-turbo-random", True), ("sd_turbo.safetensors", False)])
def test_the_rd_plot_says_when_promptus_comes_from_random_weights(model, says):
    pytest.importorskip("matplotlib", reason="matplotlib (eval extra) is not installed")
    from promptus.plots import describe_figure, rd_figure

    rows = [{"clip": "c", "codec": codec, "rank": r, "interval": 4, "kbps_all_bytes": 10.0 * r, "psnr": 20.0 + r,
             "model": model if codec == "promptus" else None} for codec in ("promptus", "x264") for r in (2, 4)]
    fig = rd_figure(rows, "c")
    labels = [c["label"] for c in describe_figure(fig)[0]["curves"]]
    assert ("random weights" in labels[0]) == says and labels[1] == "x264"
    assert ("random weights" in fig._suptitle.get_text()) == says
