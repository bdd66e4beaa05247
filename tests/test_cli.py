"""The promptus command end to end: import-legacy → info → decode, errors, demo."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import promptus
from promptus.commands.main import main
from promptus.video import read_frames
from synthetic import synthetic_clip

from conftest import make_legacy_folder


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
