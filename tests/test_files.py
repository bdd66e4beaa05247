"""Output files: the writability probe and its lock (issue 9 audit); check_output_path."""

from __future__ import annotations

import threading

import pytest

from promptus.config import CodecConfig, TrainConfig
from promptus.encoder import Encoder
from promptus.errors import PromptusError, VideoError
from promptus.files import check_output_path


FAST = TrainConfig(iters_first=2, iters=1, patience_first=1, patience=1, perceptual=False, init_latent="taesd")


CODEC = CodecConfig(width=32, height=32, rank=2, interval=3, fps=24.0)


def test_writability_probe_never_follows_a_planted_symlink(tiny, tmp_path):
    """Finding 1: the probe's fixed name '.NAME.probe' followed a symlink and truncated its target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out" / "clip.promptus"
    out.parent.mkdir()
    (out.parent / ".clip.promptus.probe").symlink_to(victim)
    enc = Encoder(CODEC, FAST, tiny, device="cpu", progress=False)
    with pytest.raises(VideoError):  # the probe runs first, then the missing input is reported
        enc.encode(tmp_path / "missing", out)
    assert victim.read_text() == "precious"


def test_concurrent_runs_on_one_output_never_get_a_false_cannot_write(tiny, tmp_path):
    """Finding 1: two runs probing one output got false 'cannot write' errors; now each either
    proceeds (here: to the missing input) or is refused by the output's lock, in words."""
    enc = Encoder(CODEC, FAST, tiny, device="cpu", progress=False)
    out = tmp_path / "clip.promptus"
    wrong = []

    def run():
        for _ in range(100):
            try:
                enc.encode(tmp_path / "missing", out)
            except VideoError:
                pass
            except PromptusError as e:
                if "being written by another process" not in str(e):
                    wrong.append(str(e))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [] and list(tmp_path.iterdir()) == []


# ---- a newcomer's first hour (issue 25): the output check leaves nothing behind

def test_check_output_path_leaves_nothing_behind(tmp_path):
    assert check_output_path(tmp_path / "a" / "b" / "c.mp4", "file") == tmp_path / "a" / "b" / "c.mp4"
    assert list(tmp_path.iterdir()) == []  # the probe is gone and no folder was made yet
