"""Frame writers that keep up (parallel PNGs, video encoder choice) and the decoder's start-up profile and cache."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptus
import promptus.video as video
from promptus.commands.main import main
from promptus.config import PNG_LEVEL, CodecConfig
from promptus.errors import VideoError
from promptus.video import FrameWriter, sky_clip

from hostile import bitstream


def grainy(n: int = 12, size: int = 48) -> np.ndarray:
    """Distinct frames that compress unevenly, so that workers finish out of order."""
    rng = np.random.RandomState(0)
    clip = sky_clip(n, size).astype(int)
    clip[::3] += rng.randint(-40, 40, clip[::3].shape)  # every third frame noisy: slower to encode
    return np.clip(clip, 0, 255).astype(np.uint8)


def write_folder(out, frames, **kw):
    with FrameWriter(out, 30, kind="folder", **kw) as w:
        for f in frames[:5]:
            w.write(f)
        w.write_batch(torch.from_numpy(frames[5:]))
    return sorted(out.iterdir())


@pytest.mark.parametrize("level, processes", [(6, True), (1, True), (6, False)])
def test_parallel_png_writer_gives_the_serial_writers_bytes_in_order(tmp_path, level, processes):
    frames = grainy()
    serial = write_folder(tmp_path / "serial", frames, workers=1, png_level=level)
    parallel = write_folder(tmp_path / "parallel", frames, workers=4, png_level=level, png_processes=processes)
    assert [p.name for p in parallel] == [f"{i:05d}.png" for i in range(len(frames))]
    assert [p.read_bytes() for p in parallel] == [p.read_bytes() for p in serial]
    for i, p in enumerate(parallel):  # frame i is file i
        assert np.array_equal(np.asarray(Image.open(p)), frames[i])
    if level == 6:  # the writer before this change: PIL's default save
        old = io.BytesIO()
        Image.fromarray(frames[0]).save(old, format="PNG")
        assert parallel[0].read_bytes() == old.getvalue()


def test_png_level_one_is_larger_than_six(tmp_path):
    frames = sky_clip(3, 64)
    six = sum(p.stat().st_size for p in write_folder(tmp_path / "six", frames, png_level=6))
    one = sum(p.stat().st_size for p in write_folder(tmp_path / "one", frames, png_level=1))
    assert one > six


def test_writer_does_not_keep_a_view_of_the_callers_buffer(tmp_path):
    """The pipelined decoder reuses its pinned buffer as soon as the sink returns."""
    frames = grainy(6)
    buf = np.empty_like(frames[:2])
    with FrameWriter(tmp_path / "f", 30, kind="folder", workers=3) as w:
        for i in range(0, 6, 2):
            buf[:] = frames[i:i + 2]
            w.write_batch(buf)
            buf[:] = 0  # overwritten at once
    for i, p in enumerate(sorted((tmp_path / "f").iterdir())):
        assert np.array_equal(np.asarray(Image.open(p)), frames[i])


def failing_save(fail_at: int):
    real = video.save_png

    def save(frame, path, level):
        if path.name == f"{fail_at:05d}.png":
            raise OSError(28, "No space left on device")
        return real(frame, path, level)

    return save


def test_a_failing_worker_is_a_clear_error_and_leaves_no_output(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "save_png", failing_save(3))
    out = tmp_path / "frames"
    with pytest.raises(VideoError, match=r"cannot write frame 00003.png: No space left on device"):
        with FrameWriter(out, 30, kind="folder", workers=3, png_processes=False) as w:
            for f in grainy(20):
                w.write(f)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_failing_worker_leaves_an_existing_folder_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "frames"
    out.mkdir()
    (out / "00001.png").write_bytes(b"old frame")
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(video, "save_png", failing_save(5))
    w = FrameWriter(out, 30, kind="folder", workers=4, force=True, png_processes=False)
    with pytest.raises(VideoError, match="00005.png"):
        for f in grainy(8):
            w.write(f)
        w.close()  # a failure seen only when draining surfaces here
    assert sorted(p.name for p in out.iterdir()) == ["00001.png", "keep.txt"]
    assert (out / "00001.png").read_bytes() == b"old frame"


def test_an_encoding_bug_in_a_worker_names_the_frame(tmp_path, monkeypatch):
    def broken(frame, path, level):
        raise ValueError("bad mode")

    monkeypatch.setattr(video, "save_png", broken)
    with pytest.raises(VideoError, match=r"encoding frame 00000.png failed \(ValueError: bad mode\)"):
        with FrameWriter(tmp_path / "f", 30, kind="folder", workers=2, png_processes=False) as w:
            for f in grainy(6):
                w.write(f)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_worker_process_is_a_clear_error_and_leaves_no_output(tmp_path):
    """Worker processes: a file system that fails under them, and a frame PIL cannot encode."""
    import shutil

    out = tmp_path / "frames"
    with pytest.raises(VideoError, match=r"cannot write frame \d{5}.png: No such file or directory"):
        with FrameWriter(out, 30, kind="folder", workers=2, png_processes=True) as w:
            assert w._pngs.processes
            for i, f in enumerate(grainy(12)):
                if i == 4:
                    shutil.rmtree(w._tmp)  # the folder vanishes under the workers
                w.write(f)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VideoError, match=r"encoding frame 00001.png failed \(TypeError"):
        with FrameWriter(out, 30, kind="folder", workers=2, png_processes=True) as w:
            w.write(grainy(1)[0])
            w.write(np.zeros((8, 8, 3), np.float64))  # PIL has no mode for it: it fails in the worker
    assert list(tmp_path.iterdir()) == []


def test_png_level_out_of_range_is_refused(tmp_path):
    with pytest.raises(VideoError, match="from 0"):
        FrameWriter(tmp_path / "f", 30, kind="folder", png_level=12)


def test_video_encoder_choice(tmp_path, monkeypatch, caplog):
    video.nvenc_problem.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert video.choose_video_encoder(".mp4", "cpu", 12) == ("mp4", "libx264", {"crf": "12", "preset": "veryfast"})
    with caplog.at_level("INFO", logger="promptus.video"):
        assert video.choose_video_encoder(".mp4", "auto", 12)[1] == "libx264"
    assert "NVENC not used (no CUDA GPU)" in caplog.text
    with pytest.raises(VideoError, match="NVENC cannot write .webm files here: libvpx-vp9 has no NVENC"):
        video.choose_video_encoder(".webm", "nvenc")
    with pytest.raises(VideoError, match="unknown video encoder"):
        video.choose_video_encoder(".mp4", "gpu")
    video.nvenc_problem.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    with pytest.raises(VideoError, match="the NVIDIA H100 80GB HBM3 has no NVENC unit; use --video-encoder cpu"):
        video.choose_video_encoder(".mp4", "nvenc")
    assert video.choose_video_encoder(".mp4", "auto")[1] == "libx264"
    video.nvenc_problem.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    frames = sky_clip(4, 32)
    for suffix in (".mp4", ".webm"):
        with FrameWriter(tmp_path / f"v{suffix}", 30, video_encoder="auto") as w:
            w.write_batch(frames)
        assert video.read_frames(tmp_path / f"v{suffix}", 32, 32).shape == (4, 32, 32, 3)
    video.nvenc_problem.cache_clear()


# ------------------------------------------------------------------ decode command: options, profile, cache


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.promptus"
    promptus.write(path, bitstream(CodecConfig(width=64, height=64, rank=2, interval=3), 7))
    return path


def test_decode_png_level_and_start_profile(clip_file, tmp_path, capsys):
    args = ["decode", str(clip_file), "--model", "tiny", "--device", "cpu", "--backend", "eager"]
    assert main(args + ["-o", f"{tmp_path / 'six'}/", "--png-level", "6"]) == 0
    capsys.readouterr()
    assert main(args + ["-o", f"{tmp_path / 'one'}/", "--profile-start",  # level 1: the default
                        "--profile-json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "start-up profile" in out and "first segment on the host" in out
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["frames"] == 7
    marks = prof["since_process_start_s"]
    order = ["command started", "header read", "output checked, writer started", "models and backend loaded",
             "first segment on the host", "output complete"]
    assert [marks[m] for m in order] == sorted(marks[m] for m in order)
    assert "device warm-up (thread)" not in prof["phases_s"]  # nothing to warm on the CPU
    one, six = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "six").iterdir())
    assert len(one) == len(six) == 7
    for a, b in zip(one, six):  # other zlib level, same pixels
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert sum(p.stat().st_size for p in one) > sum(p.stat().st_size for p in six)


def test_device_warm_up_is_for_cuda_alone_and_never_raises(monkeypatch):
    from promptus import startup

    assert startup.warm_device("cpu", torch.float32) is None
    calls = []

    def broken(*a, **k):
        calls.append(a)
        raise RuntimeError("no driver")

    # A CUDA device that fails (this machine has none, or a fake one): the thread ends quietly, no phase recorded.
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch, "ones", broken)
    profile = startup.StartupProfile(from_now=True)
    thread = startup.warm_device("cuda:0", torch.float16, profile)
    assert thread is not None and thread.name == "promptus-warm-device"
    thread.join(10)
    assert not thread.is_alive() and calls and "device warm-up (thread)" not in profile.phases


def test_png_level_outside_0_9_is_an_argparse_error(clip_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["decode", str(clip_file), "-o", f"{tmp_path}/x/", "--png-level", "10"])
    assert e.value.code == 2 and "--png-level" in capsys.readouterr().err


def test_decoders_are_kept_per_process(tmp_path):
    from promptus import startup

    startup.clear()
    kw = dict(device="cpu", dtype=torch.float32, backend="eager")
    clip = CodecConfig(width=64, height=64, interval=3)
    first = startup.load_decoder("tiny", clip, **kw)
    again = startup.load_decoder("tiny", clip, **kw)
    assert again.reused and again.backend is first.backend and again.models is first.models
    other = startup.load_decoder("tiny", clip.replace(interval=4), **kw)  # another batch: another backend
    assert not other.reused and other.backend is not first.backend and other.models is first.models
    profile = startup.StartupProfile()
    startup.load_decoder("tiny", clip, **kw, profile=profile)
    assert any("kept" in n for n in profile.notes)
    with pytest.raises(promptus.PromptusError):  # the header's geometry is checked on a cache hit too
        startup.load_decoder("tiny", clip.replace(tokens=78), **kw)
    startup.clear()
    assert not startup.load_decoder("tiny", clip, **kw).reused
    startup.clear()


def test_architecture_digest_can_be_taken_before_the_cast(tiny):
    from promptus.backends.compile_cache import architecture_digest

    unet = torch.nn.Module.to(tiny.unet.__class__.from_config(tiny.unet.config), dtype=torch.float32)
    dec = tiny.taesd.decoder
    ahead = architecture_digest(unet, dec, dtype=torch.float16)
    assert ahead != architecture_digest(unet, dec)
    import copy

    cast = copy.deepcopy(unet).half(), copy.deepcopy(dec).half()
    assert ahead == architecture_digest(*cast)


def test_process_age_is_known_on_linux():
    from promptus.startup import process_age

    age = process_age()
    assert age is None or 0 <= age < 24 * 3600


# ------------------------------------------------------------------ bench: the command path


def test_bench_weight_files_load_through_the_loaders(tiny, tmp_path):
    """The command path's weights file (single .safetensors, diffusers keys, fp32) is what load_models reads."""
    from promptus.bench.command import _save_safetensors
    from promptus.models import load_models, model_digest, tiny_configs

    unet, taesd = tmp_path / "unet.safetensors", tmp_path / "taesd.safetensors"
    _save_safetensors(tiny.unet.state_dict(), unet)
    _save_safetensors(tiny.taesd.state_dict(), taesd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taesd.safetensors", "unet.safetensors"]  # no temp left
    loaded = load_models(str(unet), taesd=str(taesd), vae=False, configs=tiny_configs())
    assert model_digest(loaded) == model_digest(tiny)


def test_command_path_clips_must_end_on_a_keyframe(tmp_path):
    from promptus.bench.command import clip_file

    path = clip_file(tmp_path, 7, 64, 3)
    bs = promptus.read(path)
    assert bs.header.frame_count == 7 and len(bs.keyframes) == 3
    with pytest.raises(promptus.PromptusError, match="k·3\\+1"):
        clip_file(tmp_path, 8, 64, 3)


@pytest.mark.gpu
def test_graph_host_copy_gives_the_frames_of_the_plain_graph():
    """The lever: uint8 and the device-to-host copy inside the CUDA graph, in a ring the pipeline reads."""
    from promptus.backends import make_backend
    from promptus.bench import random_bitstream
    from promptus.decoder import Decoder
    from promptus.models import tiny_models
    from promptus.pipeline import PipelinedDecoder

    clip = random_bitstream(CodecConfig(width=64, height=64, interval=4), 9)
    backend = make_backend("torch", tiny_models(), "cuda", batch=4, size=64)  # its own models: moved to the GPU
    plain = Decoder(backend).decode_all(clip)
    backend.graph_host_copy = True
    parts = []
    n = PipelinedDecoder(Decoder(backend), to_host=True).run([clip.header, clip.init, *clip.keyframes],
                                                             lambda s, f: parts.append(f.clone()))
    assert n == plain.shape[0] and backend.host_ring == 0  # the ring is the pipeline's while it runs
    assert parts[1].device.type == "cpu" and torch.equal(torch.cat(parts), plain)


@pytest.mark.slow
def test_command_path_times_fresh_decode_processes(tmp_path):
    from promptus.bench.command import bench_command_path, format_command_table

    result = bench_command_path(model="tiny", device="cpu", size=32, batch=3, clips=(7,), outputs=("png", "mp4"),
                                backend="eager", engine_dir=str(tmp_path / "engines"),
                                json_path=str(tmp_path / "r.json"))
    info = json.loads((tmp_path / "r.json").read_text())["command_path"]
    assert "error" not in info["cold"] and [r["status"] for r in info["rows"]] == ["ok", "ok"]
    for r in info["rows"]:
        assert 0 < r["first_frame_s"] < r["wall_s"] and r["fps_end_to_end"] == pytest.approx(7 / r["wall_s"])
        assert r["output_mb"] > 0 and "model made in code" in r["phases_s"]
    assert "1st frame s" in format_command_table(result["command_path"])


def test_the_compiled_steps_key_is_known_before_the_weights_are_read(tiny, tmp_path, monkeypatch):
    """The meta-device skeleton has the digest of the loaded networks: the key (and the preload) can start first."""
    import promptus.models as models_mod
    from promptus import startup
    from promptus.backends.compile_cache import architecture_digest
    from promptus.bench.command import _save_safetensors
    from promptus.models import tiny_configs

    configs = tiny_configs()
    for module in (models_mod, models_mod.loading):  # the name startup reads, and the one the loader reads
        monkeypatch.setattr(module, "sd_turbo_unet_config", lambda: dict(configs["unet"]))
        monkeypatch.setattr(module, "taesd_config", lambda: dict(configs["taesd"]))
    unet, taesd = tmp_path / "unet.safetensors", tmp_path / "taesd.safetensors"
    _save_safetensors(tiny.unet.state_dict(), unet)
    _save_safetensors(tiny.taesd.state_dict(), taesd)
    skeleton = startup.architecture_skeleton(str(unet), taesd=str(taesd))
    assert next(skeleton.unet.parameters()).is_meta
    ahead = architecture_digest(skeleton.unet, skeleton.taesd.decoder, dtype=torch.float16)
    seen = []
    startup.clear()
    loaded = startup.cached_models(str(unet), device="cpu", dtype=torch.float16, taesd=str(taesd),
                                   on_architecture=seen.append)
    assert seen == [loaded] and ahead == architecture_digest(loaded.unet, loaded.taesd.decoder)
    assert startup.architecture_skeleton("tiny") is None  # made in code: nothing to read, no skeleton
    startup.clear()


def test_png_workers_follow_the_writers_working_folder(tmp_path, monkeypatch):
    """The worker processes fork from a server started elsewhere: relative outputs still land here."""
    frames = grainy(4)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        monkeypatch.chdir(tmp_path / sub)
        with FrameWriter("frames", 30, kind="folder", workers=2, png_processes=True) as w:
            w.write_batch(frames)
        assert sorted(p.name for p in (tmp_path / sub / "frames").iterdir()) == [f"{i:05d}.png" for i in range(4)]


def test_png_writer_falls_back_to_threads_when_processes_do_not_start(tmp_path, monkeypatch, caplog):
    import multiprocessing

    real = multiprocessing.get_context

    def no_forkserver(method=None):
        ctx = real("spawn")

        class Broken(type(ctx)):
            def Process(self, *a, **k):  # noqa: N802 - the context's own name
                raise OSError("no process for you")

        return Broken() if method == "forkserver" else real(method)

    monkeypatch.setattr(multiprocessing, "get_context", no_forkserver)
    frames = grainy(5)
    with caplog.at_level("WARNING", logger="promptus.video"):
        files = write_folder(tmp_path / "f", frames, workers=2, png_processes=True)
    assert "encoding on threads" in caplog.text
    assert [np.array_equal(np.asarray(Image.open(p)), f) for p, f in zip(files, frames)] == [True] * 5


def held_processes(go, fail=None, seen=None):
    """A stand-in for ``video._png_processes``: the forkserver context, whose worker processes start only once
    ``go`` is set (and then raise ``fail`` if given); ``seen`` gets the name of each thread that starts one."""
    real = video._png_processes

    def processes():
        ctx = real()

        class Held(type(ctx)):
            def Process(self, *a, **k):  # noqa: N802 - the context's own name
                if seen is not None:
                    seen.append(threading.current_thread().name)
                go.wait(HOLD)
                if fail is not None:
                    raise fail
                return super().Process(*a, **k)

        return Held()

    return processes


HOLD = 10  # seconds a held worker start waits at most


def saved_pngs(folder, frames, level=PNG_LEVEL):
    folder.mkdir()
    for i, f in enumerate(frames):
        video.save_png(f, folder / f"{i:05d}.png", level)
    return [p.read_bytes() for p in sorted(folder.iterdir())]


def test_png_worker_processes_start_while_the_writer_is_made(tmp_path, monkeypatch):
    """The forkserver imports torch before a first worker starts: the writer does not wait for that."""
    go = threading.Event()
    seen = []
    monkeypatch.setattr(video, "_png_processes", held_processes(go, seen=seen))
    frames = grainy(6)
    began = time.perf_counter()
    w = FrameWriter(tmp_path / "f", 30, kind="folder", workers=2, png_processes=True)
    assert time.perf_counter() - began < HOLD / 4
    assert any(t.name == "promptus-png-start" and t.is_alive() for t in threading.enumerate())
    go.set()
    with w:
        w.write_batch(frames)
        assert w._pngs.processes
    assert seen and set(seen) <= {"promptus-png-start", "MainThread"}  # later workers start at later frames
    assert [p.read_bytes() for p in sorted(w.out.iterdir())] == saved_pngs(tmp_path / "serial", frames)


@pytest.mark.parametrize("where", ["pool", "first worker"])
def test_png_writer_uses_threads_when_the_start_thread_fails(tmp_path, monkeypatch, caplog, where):
    import concurrent.futures

    seen = []
    if where == "pool":
        def no_pool(*a, **k):
            seen.append(threading.current_thread().name)
            raise OSError("no pool here")

        monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    else:
        go = threading.Event()
        go.set()
        monkeypatch.setattr(video, "_png_processes", held_processes(go, OSError("no worker here"), seen))
    frames = grainy(6)
    with caplog.at_level("WARNING", logger="promptus.video"):
        with FrameWriter(tmp_path / "f", 30, kind="folder", workers=2, png_processes=True) as w:
            w.write_batch(frames)
            assert not w._pngs.processes
    assert seen == ["promptus-png-start"]
    assert f"(OSError: no {where.split()[-1]} here); encoding on threads" in caplog.text
    assert [p.read_bytes() for p in sorted(w.out.iterdir())] == saved_pngs(tmp_path / "serial", frames)


@pytest.mark.parametrize("start", ["starts", "fails"])
@pytest.mark.parametrize("end", ["close", "abort"])
def test_a_writer_without_frames_ends_while_its_processes_start(tmp_path, monkeypatch, start, end):
    """close (drain) and abort (cancel) wait for the start thread, then shut down whatever it started."""
    import multiprocessing

    children = set(multiprocessing.active_children())
    go = threading.Event()
    fail = OSError("no worker here") if start == "fails" else None
    monkeypatch.setattr(video, "_png_processes", held_processes(go, fail))
    w = FrameWriter(tmp_path / "f", 30, kind="folder", workers=2, png_processes=True)
    starting = w._pngs._starting
    assert starting is not None and starting.is_alive()
    threading.Timer(0.3, go.set).start()
    if end == "close":
        assert w.close() == tmp_path / "f" and list(w.out.iterdir()) == []
    else:
        w.abort()
        assert list(tmp_path.iterdir()) == []
    assert not starting.is_alive()
    with pytest.raises(RuntimeError, match="after shutdown"):
        w._pngs._pool.submit(int)
    assert set(multiprocessing.active_children()) <= children


_UNGUARDED = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
from promptus.video import FrameWriter, main_reimport_safe
with open({marker!r}, "a") as f:
    f.write("ran\\n")
print("safe" if main_reimport_safe() else "unsafe")
with FrameWriter({out!r}, 30, kind="folder", workers=2) as w:
    for i in range(4):
        w.write(np.full((16, 16, 3), i, np.uint8))
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """A research script that writes frames at top level: the library's default writer (threads) never
    imports it again; worker processes from a forkserver would run it once more per child."""
    import subprocess
    import sys

    root = str(Path(promptus.__file__).parent.parent)
    marker, out = tmp_path / "marker", tmp_path / "frames"
    script = tmp_path / "script.py"
    script.write_text(_UNGUARDED.format(root=root, marker=str(marker), out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["unsafe"] and marker.read_text() == "ran\n"
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    guarded = tmp_path / "guarded.py"
    guarded.write_text(f"import sys\nsys.path.insert(0, {root!r})\nfrom promptus.video import main_reimport_safe\n"
                       "if __name__ == '__main__':\n    print(main_reimport_safe())\n")
    for cmd in ([sys.executable, str(guarded)],
                [sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r}); "
                                       "from promptus.video import main_reimport_safe; print(main_reimport_safe())"]):
        assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.split() == ["True"]


def test_several_files_decode_in_one_process_with_the_models_loaded_once(clip_file, tmp_path, capsys, monkeypatch):
    """Each file to -o FOLDER/<stem>/ (or <stem>.mp4 with --each), the same frames as one at a time; the models
    and backend are made once; a bad file is reported and the others are still decoded (exit status 1)."""
    import shutil

    from promptus import startup

    other = tmp_path / "in" / "second.promptus"
    other.parent.mkdir()
    shutil.copy(clip_file, other)
    broken = tmp_path / "in" / "broken.promptus"
    broken.write_bytes(b"not a promptus file")
    args = ["decode", "--model", "tiny", "--device", "cpu", "--backend", "eager"]
    assert main(args + [str(clip_file), "-o", f"{tmp_path / 'single'}/"]) == 0
    startup.clear()
    made = []
    real = startup.cached_models
    monkeypatch.setattr(startup, "cached_models", lambda *a, **k: made.append(1) or real(*a, **k))
    capsys.readouterr()
    assert main(args + [str(clip_file), str(broken), str(other), "-o", str(tmp_path / "many")]) == 1
    out, err = capsys.readouterr()
    assert f"promptus: error: {broken}:" in err and "decoded 2 of 3 files" in out and str(broken) in out
    assert made == [1]  # the second good file reused the first one's models and backend
    single = sorted((tmp_path / "single").iterdir())
    for name in ("clip", "second"):
        got = sorted((tmp_path / "many" / name).iterdir())
        assert [p.name for p in got] == [p.name for p in single]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(got, single))
    assert not (tmp_path / "many" / "broken").exists()
    assert main(args + [str(clip_file), str(other), "-o", str(tmp_path / "videos"), "--each", ".mp4"]) == 0
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["clip.mp4", "second.mp4"]
    startup.clear()


def test_several_files_are_checked_before_any_work(clip_file, tmp_path, capsys):
    twin = tmp_path / "elsewhere" / clip_file.name
    twin.parent.mkdir()
    twin.write_bytes(clip_file.read_bytes())
    args = ["decode", "--model", "tiny", "--device", "cpu", str(clip_file)]
    (tmp_path / "afile").write_text("x")
    for extra, message in (([str(twin), "-o", str(tmp_path / "o")], "would both be written to"),
                           ([str(twin), "-o", str(tmp_path / "afile")], "and this is a file"),
                           ([str(twin), "-o", str(tmp_path / "o"), "--each", ".gif"], "--each .gif"),
                           ([str(twin), "-o", str(tmp_path / "o"), "--profile-json", "p.json"], "takes one file"),
                           ([str(tmp_path / "..promptus"), "-o", str(tmp_path / "o")], "gives no output name")):
        assert main(args + extra) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
