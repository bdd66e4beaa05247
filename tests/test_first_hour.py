"""Issue 10, the first hour of a new user: commands that guess right and fail early in one line.

Each case of the issue is reproduced here: outputs checked before any work, the model
a file's header names, file modes from the umask, one rate definition, help texts that
state the values used, and a README that stands alone.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest
from PIL import Image

import promptus
from promptus import startup
from promptus.bench import random_bitstream
from promptus.commands import bench as bench_cmd
from promptus.commands import demo as demo_cmd
from promptus.commands import encode as encode_cmd
from promptus.commands.main import build_parser, main
from promptus.files import check_output_path
from promptus.video import read_frames
from synthetic import synthetic_clip

ROOT = Path(__file__).resolve().parent.parent


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


# ------------------------------------------------------------ outputs, before any work


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


def test_check_output_path_leaves_nothing_behind(tmp_path):
    assert check_output_path(tmp_path / "a" / "b" / "c.mp4", "file") == tmp_path / "a" / "b" / "c.mp4"
    assert list(tmp_path.iterdir()) == []  # the probe is gone and no folder was made yet


# ------------------------------------------------------------------ the model of the file


def test_decode_takes_the_built_in_model_its_header_names(tiny_file, tmp_path, caplog):
    """Issue 10: decoding the demo's file asked for --model tiny although its header names it."""
    out = tmp_path / "o.mp4"
    with caplog.at_level("INFO", logger="promptus"):
        rc = main(["decode", str(tiny_file), "-o", str(out), "--checkpoints", str(tmp_path / "none"),
                   "--device", "cpu"])
    assert rc == 0 and read_frames(out, 32, 32).shape[0] == 9
    assert "made with the built-in tiny model" in caplog.text
    assert "MODEL MISMATCH" not in caplog.text


# ------------------------------------------------------------------------------ modes


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


# ------------------------------------------------------------------------------ rates


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


# ------------------------------------------------------------------------- help texts


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


def test_bench_on_the_cpu_picks_a_small_workload_and_says_so():
    args = build_parser().parse_args(["bench", "--device", "cpu", "--keyframes", "2"])
    chosen = bench_cmd.resolve_defaults(args, "cpu")
    assert (args.model, args.size, args.keyframes, args.backends) == ("tiny", 64, 2, ["eager", "torch"])
    assert chosen == ["--model tiny", "--size 64", "--backends eager torch"]  # --keyframes was given
    args = build_parser().parse_args(["bench"])
    bench_cmd.resolve_defaults(args, "cuda")
    assert (args.model, args.size, args.keyframes) == ("random", 512, 31) and "compile" in args.backends


# ----------------------------------------------------------------------- the README


def test_readme_stands_alone_in_a_clone():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert not target.startswith(("http", "/", "..")), f"README links outside the repository: {target}"
        path = target.split("#")[0]
        assert not path or (ROOT / path).exists(), f"README links a missing file: {target}"
    assert "huggingface-cli" not in text and "hf download" in text


def test_pyproject_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
