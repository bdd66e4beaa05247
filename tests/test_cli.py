"""The promptus command end to end: import-legacy → info → decode, errors, demo."""

import argparse
import bz2
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptus
from promptus import startup
from promptus.bench import random_bitstream
from promptus.commands import common, demo as demo_cmd, encode as encode_cmd, play as play_cmd
from promptus.commands.encode import run_encode
from promptus.commands.main import build_parser, main
from promptus.config import CPU_ITERS, CPU_ITERS_FIRST, CodecConfig, SLOW_ENCODE_WARNING_S, THREADS_ENV, TINY_SIZE
from promptus.errors import PromptusError
from promptus.video import read_frames

from bounded import LIMIT_MB, bounded_memory
from conftest import make_legacy_folder
from hostile import bitstream, head, init_fp16, keyf, replace_prompt, v1_file
from netutil import free_port
from synthetic import synthetic_clip


@pytest.fixture
def imported(tmp_path):
    folder = tmp_path / "results" / "rank2_interval4"
    make_legacy_folder(folder, keyframes=3, interval=4)
    out = tmp_path / "clip.promptus"
    assert main(["-q", "import-legacy", str(folder), "-o", str(out), "--fps", "24", "--init-precision", "fp16"]) == 0
    return out


def test_import_then_decode_png_produces_every_frame(imported, tmp_path, capsys):
    out = tmp_path / "frames"
    assert main(["decode", str(imported), "-o", f"{out}/", "--model", "tiny", "--device", "cpu"]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(9)]
    assert Image.open(files[0]).size == (64, 64)
    assert "wrote 9 frames" in capsys.readouterr().out


def test_decode_to_mp4_matches_pngs(imported, tmp_path):
    assert main(["-q", "decode", str(imported), "-o", str(tmp_path / "v.mp4"), "--model", "tiny"]) == 0
    assert main(["-q", "decode", str(imported), "-o", f"{tmp_path / 'p'}/", "--model", "tiny"]) == 0
    video = read_frames(tmp_path / "v.mp4", 64, 64)
    pngs = read_frames(tmp_path / "p", 64, 64)
    assert video.shape == pngs.shape == (9, 64, 64, 3)


def test_info_reports_sizes_and_kbps(imported, capsys):
    assert main(["info", str(imported)]) == 0
    text = capsys.readouterr().out
    size = imported.stat().st_size
    assert str(size) in text.replace(",", "")
    # 9 frames at 24 fps: all bytes over 0.375 s.
    assert f"{size * 8 / (9 / 24) / 1000:.2f} kbit/s (all bytes)" in text


def test_import_legacy_prints_layout(tmp_path, capsys):
    folder = tmp_path / "f"
    make_legacy_folder(folder)
    assert main(["import-legacy", str(folder), "-o", str(tmp_path / "o.promptus")]) == 0
    assert "kbit/s" in capsys.readouterr().out


def test_errors_exit_nonzero_with_a_message(tmp_path, capsys):
    assert main(["decode", str(tmp_path / "nope.promptus"), "-o", str(tmp_path / "o"), "--model", "tiny"]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.promptus"
    bad.write_bytes(b"GIF89a" + b"\x00" * 100)
    assert main(["decode", str(bad), "-o", str(tmp_path / "o"), "--model", "tiny"]) == 1
    assert "promptus: error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["import-legacy", str(tmp_path), "-o", str(tmp_path / "x.promptus")]) == 1
    assert not (tmp_path / "x.promptus").exists()


def test_missing_weights_say_where_they_go(imported, tmp_path, capsys):
    rc = main(["decode", str(imported), "-o", f"{tmp_path / 'o'}/", "--checkpoints", str(tmp_path / "ckpt")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "sd_turbo.safetensors" in err and "--model tiny" in err


def test_truncated_file_fails_unless_partial_allowed(imported, tmp_path, capsys):
    data = imported.read_bytes()
    cut = tmp_path / "cut.promptus"
    cut.write_bytes(data[:-300])  # inside the last keyframe record
    out = tmp_path / "o"
    assert main(["decode", str(cut), "-o", f"{out}/", "--model", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "keyframe" in err and "--allow-partial" in err  # the command's option, not only the Python attribute
    assert not out.exists()  # nothing half-written
    assert main(["decode", str(cut), "-o", f"{out}/", "--model", "tiny", "--allow-partial"]) == 0
    assert len(list(out.iterdir())) == 5  # frame 0 + the first segment


def test_demo_runs_with_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    clip = tmp_path / "clip"
    clip.mkdir()
    for i, f in enumerate(synthetic_clip(7, 32, 32)):
        Image.fromarray(f.numpy()).save(clip / f"{i:05d}.png")
    assert main(["demo", "--out", str(out), "--checkpoints", str(tmp_path / "none"), "--device", "cpu",
                 "--clip", str(clip), "--size", "32", "--rank", "2", "--interval", "3", "--max-frames", "7",
                 "--iters-first", "5", "--iters", "3"]) == 0
    text = capsys.readouterr().out
    assert "tiny" in text and "decoded 7 frames" in text
    assert "closed loop inf dB" in text  # the decoder reproduced the encoder exactly
    assert "kbit/s" in text and "PSNR" in text
    assert len(list((out / "decoded").glob("*.png"))) == 7
    assert (out / "decoded.mp4").stat().st_size > 0
    assert promptus.read(out / "demo.promptus").header.frame_count == 7


@pytest.mark.slow  # 4 s on 2 cores: full tier
def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "promptus", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("decode", "info", "import-legacy", "demo"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "promptus", "decode", "--help"], capture_output=True, text=True, timeout=120)
    assert "--allow-partial" in r.stdout and "--model" in r.stdout


# ---- hostile inputs (issue 9 audit): commands refuse in one line, keep files, lock their output

CLIP = synthetic_clip(7, 32, 32)  # keyframes 0, 3, 6


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A small valid .promptus file (64×64, 7 frames) for the command tests."""
    path = tmp_path_factory.mktemp("clip") / "clip.promptus"
    promptus.write(path, bitstream(CodecConfig(width=64, height=64, rank=2, interval=3), 7))
    return path


def decode(args, capsys):
    rc = main(["-q", "decode", *map(str, args), "--model", "tiny", "--device", "cpu", "--backend", "eager"])
    return rc, capsys.readouterr().err


def test_decode_into_a_folder_holding_files_is_refused_and_force_keeps_them(clip_file, tmp_path, capsys):
    """Finding 1: the folder and everything in it used to be deleted."""
    out = tmp_path / "frames"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "00000.png").write_bytes(b"old frame")
    rc, err = decode([clip_file, "-o", out], capsys)
    assert rc == 1 and err.startswith("promptus: error:") and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "keep.txt"]
    assert (out / "00000.png").read_bytes() == b"old frame"
    rc, err = decode([clip_file, "-o", out, "--force"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(7)] + ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]  # no temporary or ".old" folder left


def test_decode_to_dot_is_refused_cleanly_or_works(clip_file, tmp_path, capsys, monkeypatch):
    """Finding 1: ``-o .`` failed with 'Device or resource busy' and left a '..old.*' folder."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    rc, err = decode([clip_file, "-o", "."], capsys)
    assert rc == 1 and "--force" in err and "Traceback" not in err
    rc, err = decode([clip_file, "-o", ".", "--force"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in work.iterdir()) == [f"{i:05d}.png" for i in range(7)] + ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_second_encode_to_the_same_output_is_refused_naming_the_other_pid(tmp_path, capsys):
    """Finding 1: two encodes with one -o both reported success; one silently replaced the other."""
    import subprocess
    import sys

    out = tmp_path / "clip.promptus"
    # Another process holds the output's lock as documented: flock on NAME.lock holding its pid.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out) + '.lock'!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        frames = tmp_path / "frames"
        frames.mkdir()
        for i, f in enumerate(CLIP):
            Image.fromarray(f.numpy()).save(frames / f"{i:05d}.png")
        rc = main(["-q", "encode", str(frames), "-o", str(out), "--model", "tiny", "--device", "cpu", "--size", "32",
                   "--rank", "2", "--interval", "3", "--iters-first", "1", "--iters", "1", "--perceptual", "off",
                   "--init-latent", "taesd"])
        err = capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert rc == 1 and f"pid {holder.pid}" in err and not out.exists()


def test_the_lock_is_released_and_removed_after_a_run(tmp_path):
    from promptus.files import OutputLock

    out = tmp_path / "clip.promptus"
    with OutputLock(out):
        with pytest.raises(PromptusError, match=f"pid {os.getpid()}"):
            OutputLock(out).acquire()
    assert list(tmp_path.iterdir()) == []
    with OutputLock(out):  # free again
        pass


def hostile_inputs(tmp_path):
    """(name, argv) of inputs that once ended in a traceback, a hang or a lost file."""
    fifo = tmp_path / "fifo.promptus"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.promptus"
    huge.write_bytes(v1_file(head(rank=256, tokens=32768, embed_dim=32768, interval=1, frame_count=3), init_fp16(),
                             [keyf(i, 3, bz2.compress(bytes(256 * 65536))) for i in range(3)]))
    wide = tmp_path / "wide.promptus"
    promptus.write(wide, bitstream(CodecConfig(width=64, height=64, rank=2, interval=3, embed_dim=1023), 4))
    ch3 = tmp_path / "ch3.promptus"
    promptus.write(ch3, bitstream(CodecConfig(width=64, height=64, rank=2, interval=3, latent_channels=3), 4))
    passwd = tmp_path / "passwd"
    make_legacy_folder(passwd, keyframes=1)
    (passwd / "frame_00000.prompt").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    fifo_folder = tmp_path / "fifo_folder"
    make_legacy_folder(fifo_folder, keyframes=1)
    (fifo_folder / "frame_00000.prompt").unlink()
    os.mkfifo(fifo_folder / "frame_00000.prompt")
    scale = tmp_path / "scale"
    make_legacy_folder(scale, keyframes=1)
    replace_prompt(scale, U_scale=torch.tensor(3e38))
    out = tmp_path / "o.promptus"
    model = ["--model", "tiny", "--device", "cpu", "--backend", "eager"]
    return [
        ("info on a FIFO", ["info", str(fifo)]),
        ("info on /dev/zero", ["info", "/dev/zero"]),
        ("info on a folder", ["info", str(tmp_path)]),
        ("info on a huge header", ["info", str(huge)]),
        ("decode embedding 1023", ["decode", str(wide), "-o", str(tmp_path / "w"), *model]),
        ("decode 3 latent channels", ["decode", str(ch3), "-o", str(tmp_path / "c"), *model]),
        ("decode a FIFO", ["decode", str(fifo), "-o", str(tmp_path / "f"), *model]),
        ("import /etc/passwd as a prompt", ["import-legacy", str(passwd), "-o", str(out)]),
        ("import a FIFO prompt", ["import-legacy", str(fifo_folder), "-o", str(out)]),
        ("import scale 3e38", ["import-legacy", str(scale), "-o", str(out)]),
        ("import with fps 1e308", ["import-legacy", str(scale), "-o", str(out), "--fps", "1e308"]),
    ]


def test_every_hostile_input_is_one_error_line_and_exit_status_1(tmp_path, capsys):
    """Finding 3: tracebacks (and a hang) from inputs; each now ends in 'promptus: error: …', status 1."""
    for name, argv in hostile_inputs(tmp_path):
        with bounded_memory() as m:
            rc = main(["-q", *argv])
        err = capsys.readouterr().err
        assert rc == 1, name
        assert err.startswith("promptus: error: ") and "Traceback" not in err, (name, err)
        assert m.peak_mb < LIMIT_MB, (name, m.peak_mb)
    assert not (tmp_path / "o.promptus").exists()


def test_an_internal_bug_still_shows_its_traceback(monkeypatch):
    """Only what input can cause becomes a one-line error; a bug in promptus is not hidden."""
    from promptus.commands import info

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(info, "run", bug)
    with pytest.raises(ZeroDivisionError):
        main(["info", "x"])


def test_decode_of_a_long_interval_short_clip_is_not_padded_to_the_interval(tmp_path, capsys):
    """Finding 2: interval 256 with 3 frames ran one batch padded to 256 frames; now batch 2."""
    path = tmp_path / "long.promptus"
    promptus.write(path, bitstream(CodecConfig(width=64, height=64, rank=2, interval=256), 3))
    with bounded_memory() as m:
        rc = main(["-q", "decode", str(path), "-o", str(tmp_path / "f") + "/", "--model", "tiny", "--device", "cpu",
                   "--backend", "torch"])
    assert rc == 0, capsys.readouterr().err
    assert len(list((tmp_path / "f").iterdir())) == 3
    assert m.peak_mb < 150, m.peak_mb


# ---- a newcomer's first hour (issue 25): outputs checked before any work, the file's model, modes, rates,
# help texts

@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny):
    """A 9-frame 32 px file whose header names the built-in tiny model."""
    cfg = promptus.CodecConfig(width=32, height=32, rank=2, interval=4, fps=24)
    path = tmp_path_factory.mktemp("clip") / "clip.promptus"
    promptus.write(path, random_bitstream(cfg, 3, identity=tiny.identity()))
    return path


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: the command must refuse before any work."""
    def refuse(*a, **k):
        raise AssertionError("the command loaded a model before checking its output")

    monkeypatch.setattr(encode_cmd, "load_models", refuse)
    monkeypatch.setattr(startup, "cached_models", refuse)  # where decode loads its models


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("promptus: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("output, says", [
    ("/proc/o.mp4", "does not accept new files"),
    ("{file}/frames/", "is a file, not a folder"),
    ("{file}/sub/o.mp4", "is a file, not a folder"),
    ("{tmp}/out.gif", "cannot write a .gif file"),
    ("{tmp}/out.png", "cannot write a single image"),
    ("{tmp}/noext", "add a video suffix"),
])
def test_decode_refuses_an_output_it_cannot_write_before_loading_the_model(tiny_file, tmp_path, capsys, no_models,
                                                                         output, says):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    out = output.format(file=a_file, tmp=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["decode", str(tiny_file), "-o", out, "--device", "cpu"]) == 1
    assert says in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder named out.gif, noext, ...
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("suffix", [".webm", ".mkv", ".mov"])
def test_decode_writes_every_video_container_it_accepts(tiny_file, tmp_path, suffix):
    out = tmp_path / f"v{suffix}"
    assert main(["-q", "decode", str(tiny_file), "-o", str(out), "--model", "tiny", "--device", "cpu"]) == 0
    assert read_frames(out, 32, 32).shape == (9, 32, 32, 3)


def test_decode_makes_a_folder_only_when_asked(tiny_file, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    for out in (f"{tmp_path / 'new'}/", str(existing)):
        assert main(["-q", "decode", str(tiny_file), "-o", out, "--model", "tiny", "--device", "cpu"]) == 0
        assert len(list(Path(out).glob("*.png"))) == 9


def test_encode_refuses_an_unwritable_output_before_loading_the_model(tmp_path, capsys, no_models):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    clip = tmp_path / "clip"
    clip.mkdir()
    Image.new("RGB", (32, 32)).save(clip / "00000.png")
    assert main(["encode", str(clip), "-o", str(a_file / "sub" / "x.promptus"), "--model", "tiny"]) == 1
    assert "is a file, not a folder" in one_line_error(capsys)
    assert main(["encode", str(clip), "-o", str(tmp_path), "--model", "tiny"]) == 1
    assert "is a folder" in one_line_error(capsys)


def test_eval_refuses_an_unwritable_json_before_measuring(tmp_path, capsys, monkeypatch):
    import promptus.metrics

    monkeypatch.setattr(promptus.metrics, "compare_sources",
                        lambda *a, **k: pytest.fail("eval measured before checking --json"))
    assert main(["eval", str(tmp_path), str(tmp_path), "--json", "/proc/q.json"]) == 1
    assert "/proc" in one_line_error(capsys)


def test_decode_takes_the_built_in_model_its_header_names(tiny_file, tmp_path, caplog):
    """Issue 10: decoding the demo's file asked for --model tiny although its header names it."""
    out = tmp_path / "o.mp4"
    with caplog.at_level("INFO", logger="promptus"):
        rc = main(["decode", str(tiny_file), "-o", str(out), "--checkpoints", str(tmp_path / "none"),
                   "--device", "cpu"])
    assert rc == 0 and read_frames(out, 32, 32).shape[0] == 9
    assert "made with the built-in tiny model" in caplog.text
    assert "MODEL MISMATCH" not in caplog.text


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_umask_permissions(tiny_file, tmp_path, umask):
    """Issue 10: videos came out 0600 and PNG folders 0700 (a temporary file's mode leaked through)."""
    old = os.umask(umask)
    try:
        assert main(["-q", "decode", str(tiny_file), "-o", str(tmp_path / "v.mp4"), "--model", "tiny"]) == 0
        assert main(["-q", "decode", str(tiny_file), "-o", f"{tmp_path / 'frames'}/", "--model", "tiny"]) == 0
        promptus.write(tmp_path / "copy.promptus", promptus.read(tiny_file))
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "v.mp4") == mode(tmp_path / "copy.promptus") == 0o666 & ~umask
    assert mode(tmp_path / "frames") == 0o777 & ~umask
    assert {mode(p) for p in (tmp_path / "frames").iterdir()} == {0o666 & ~umask}


def test_info_and_encode_print_the_same_rates(tmp_path, capsys):
    """Issue 10: info said 261.77 kbit/s "factors only", the encode summary 262.3 for the same file."""
    clip = tmp_path / "clip"
    clip.mkdir()
    for i, f in enumerate(synthetic_clip(5, 32, 32)):
        Image.fromarray(f.numpy()).save(clip / f"{i:05d}.png")
    out = tmp_path / "c.promptus"
    assert main(["-q", "encode", str(clip), "-o", str(out), "--model", "tiny", "--device", "cpu", "--size", "32",
                 "--rank", "2", "--interval", "4", "--iters-first", "2", "--iters", "2", "--perceptual", "off",
                 "--init-latent", "taesd"]) == 0
    encode_text = capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info_text = capsys.readouterr().out
    rate = promptus.bitstream.file_rate(out.read_bytes())
    assert rate.describe() in encode_text and rate.describe() in info_text
    assert rate.total_kbps == pytest.approx(promptus.prompts.kbps(out.stat().st_size, 5 / 30))
    assert 0 < rate.factor_bytes <= 2 * 2 * (77 + 1024)  # two rank-2 keyframes' codes, as stored (entropy-coded)


def subparsers() -> dict:
    return next(a for a in build_parser()._actions if a.dest == "command").choices


def help_of(command: str) -> str:
    return " ".join(subparsers()[command].format_help().split())


def test_demo_help_states_the_values_it_uses():
    text = help_of("demo")
    assert f"{demo_cmd.TINY_SIZE} with the tiny model" in text and "(default: 512)" not in text
    assert "--full" in text and f"{demo_cmd.QUICK['iters_first']}; 10000 with --full" in text


@pytest.mark.parametrize("full, frames", [(False, demo_cmd.QUICK["max_frames"]), (True, demo_cmd.SAMPLE_FRAMES)])
def test_demo_settings_follow_full_and_the_model(full, frames):
    args = build_parser().parse_args(["demo"] + (["--full"] if full else []))
    demo_cmd.resolve_settings(args, tiny=True)
    assert (args.max_frames, args.size, args.init_latent) == (frames, demo_cmd.TINY_SIZE, "taesd")
    args = build_parser().parse_args(["demo", "--size", "64", "--iters", "7"])
    demo_cmd.resolve_settings(args, tiny=False)
    assert (args.size, args.iters, args.iters_first, args.init_latent) == (64, 7, demo_cmd.QUICK["iters_first"], "vae")


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {a.option_strings[0]}" for name, p in subparsers().items() for a in p._actions
               if a.option_strings and not a.help]
    assert missing == []


def test_decode_help_lists_its_backends_and_containers():
    text = help_of("decode")
    from promptus.backends import BACKENDS

    assert f"one of {', '.join(BACKENDS)}" in text
    assert ".webm" in text and "ending in /" in text


# ---- a newcomer's first hour on a CPU (issue 25): CPU-sized defaults, the projected time, perceptual
# auto, determinism, play, Ctrl-C, log noise

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for i, f in enumerate(synthetic_clip(9, 32, 32).numpy()):
        Image.fromarray(f).save(folder / f"{i:05d}.png")
    return folder


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


def test_play_refuses_a_url_without_a_clip_and_a_missing_server_before_loading_a_model(monkeypatch, capsys):
    monkeypatch.setattr(play_cmd, "load_models", lambda *a, **k: pytest.fail("loaded the model first"))
    for url in ("http://127.0.0.1:8000/", "ws://127.0.0.1:8000/ws/prompts/", "http://127.0.0.1:8000"):
        assert main(["play", url]) == 1
        assert "names no clip" in capsys.readouterr().err
    port = free_port()
    t0 = time.monotonic()
    assert main(["play", f"ws://127.0.0.1:{port}/ws/prompts/demo.promptus"]) == 1
    err = capsys.readouterr().err
    assert f"no server at 127.0.0.1:{port}" in err and time.monotonic() - t0 < 10, err


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
