"""Baselines through ffmpeg, the rate–distortion sweep (resume, plots, BD-rate) and its Ray scale-out.

CPU, tiny model at 32–64 px, a few iterations. Tests that run ffmpeg are skipped with
the reason where it is missing; the Ray test where Ray is not installed.
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import promptus.baselines as baselines
import promptus.encoder as encoder_mod
from promptus.baselines import X264, X265, decode_frames, encode_at_bitrate, make_baseline
from promptus.commands.sweep import config_from_args, register as add_sweep_parser
from promptus.config import CodecConfig, TrainConfig
from promptus.errors import PromptusError
from promptus.plots import describe_figure, rd_figure
from promptus.sweep import COLUMNS, SETTINGS_COLUMNS, SweepConfig, TIMING_FIELDS, run_sweep
from promptus.video import sky_clip, write_frames

ROOT = Path(__file__).resolve().parent.parent
FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.ffmpeg  # skipped with its reason where ffmpeg is missing (tests/conftest.py)
FAST = dict(codec=CodecConfig(width=32, height=32),
            train=TrainConfig(perceptual=False, init_latent="taesd", iters_first=12, iters=6), model="tiny",
            progress=False)


def grainy_clip(n, size, seed=0):
    """The sky clip with film grain: hard enough that x264 spends a few hundred kbit/s on it."""
    noise = np.random.RandomState(seed).randint(-12, 13, size=(n, size, size, 3))
    return np.clip(sky_clip(n, size).astype(np.int16) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip") / "grainy"
    write_frames(grainy_clip(13, 32), d, 30)
    return d


def counted(fn):
    """``fn`` wrapped to record each call's keyword arguments in ``wrapper.calls`` (works for methods too)."""

    def wrapper(*args, **kwargs):
        wrapper.calls.append(kwargs)
        return fn(*args, **kwargs)

    wrapper.calls = []
    return wrapper


# -------------------------------------------------------------- baselines


def test_codecs_build_ffmpeg_command_lines():
    cmd = X264(preset="fast").command("frames", 30000 / 1001, "out.mp4", crf=23.5)
    assert cmd[cmd.index("-c:v") + 1] == "libx264" and cmd[cmd.index("-crf") + 1] == "23.500"
    assert cmd[cmd.index("-framerate") + 1] == "30000/1001" and cmd[-1] == "out.mp4"
    assert cmd[cmd.index("-pix_fmt") + 1] == "yuv420p" and cmd[cmd.index("-preset") + 1] == "fast"
    p1 = X265().command("frames", 24, None, kbps=150, pass_number=1, stats="/tmp/s")
    assert p1[p1.index("-c:v") + 1] == "libx265" and "pass=1:stats=/tmp/s:log-level=error" in p1
    assert p1[-3:-1] == ["-f", "null"]
    p2 = X264().command("frames", 24, "o.mp4", kbps=150, pass_number=2, stats="/tmp/s")
    assert p2[p2.index("-b:v") + 1] == "150.000k" and p2[p2.index("-pass") + 1] == "2"
    with pytest.raises(PromptusError, match="unknown baseline"):
        make_baseline("vp9")


@needs_ffmpeg
@pytest.mark.parametrize("codec", ["x264", "x265"])
def test_baseline_lands_within_ten_percent_of_the_target(tmp_path, codec):
    frames = grainy_clip(30, 64)
    write_frames(frames, tmp_path / "f", 30)
    res = encode_at_bitrate(make_baseline(codec), tmp_path / "f", 30.0, 30, 300.0, tmp_path / "o.mp4")
    size = (tmp_path / "o.mp4").stat().st_size
    assert res.bytes == size and res.kbps == pytest.approx(size * 8 / (30 / 30.0) / 1000)  # all bytes, 1 s
    assert res.within_tolerance and abs(res.kbps / 300.0 - 1) <= 0.10, res.attempts
    decoded = decode_frames(tmp_path / "o.mp4", 64, 64)
    assert decoded.shape == (30, 64, 64, 3)
    assert not list(tmp_path.glob(".o.*"))  # the attempts' temporary folder is gone


@needs_ffmpeg
def test_unreachable_target_is_reported_honestly(tmp_path):
    write_frames(sky_clip(10, 32), tmp_path / "f", 30)  # smooth: even CRF 0 stays far below 5 Mbit/s
    res = encode_at_bitrate(make_baseline("x264"), tmp_path / "f", 30.0, 10, 5000.0, tmp_path / "o.mp4")
    assert not res.within_tolerance and res.kbps < 2500
    assert res.kbps == pytest.approx((tmp_path / "o.mp4").stat().st_size * 8 / (10 / 30) / 1000)


def test_missing_ffmpeg_is_a_clear_error_before_any_encoding(clip_dir, tmp_path, monkeypatch):
    enc = counted(encoder_mod.Encoder.encode)
    monkeypatch.setattr(encoder_mod.Encoder, "encode", enc)
    cfg = SweepConfig(clips=[str(clip_dir)], ranks=[1], intervals=[4], out=str(tmp_path / "s"),
                      ffmpeg="no-such-ffmpeg-here", **FAST)
    with pytest.raises(PromptusError, match="ffmpeg was not found"):
        run_sweep(cfg)
    assert enc.calls == [] and not (tmp_path / "s" / "points").exists()


def test_ray_missing_says_how_to_install_it(clip_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    cfg = SweepConfig(clips=[str(clip_dir)], ranks=[1], intervals=[4], baselines=[], out=str(tmp_path / "s"),
                      ray=True, **FAST)
    with pytest.raises(PromptusError, match=r"pip install 'promptus\[distributed\]'"):
        run_sweep(cfg)


def test_sweep_parser_has_the_encoder_options():
    p = argparse.ArgumentParser()
    add_sweep_parser(p.add_subparsers())
    a = p.parse_args(["sweep", "a.mp4", "b", "--model", "tiny", "--perceptual", "off", "--iters", "3"])
    cfg = config_from_args(a)  # the published settings for every option not given
    assert a.clips == ["a.mp4", "b"] and a.ranks == [2, 4, 8, 16] and a.intervals == [5, 10, 20]
    assert a.baselines == ["x264", "x265"] and a.iters == 3 and a.iters_first == 10_000 and a.size == 512
    assert cfg.train.perceptual is False and cfg.model == "tiny" and cfg.device == "auto"
    a = p.parse_args(["sweep", "a.mp4", "--baselines", "--ray-address", "ray://head:10001"])
    assert a.baselines == [] and config_from_args(a).ray_address == "ray://head:10001"


def test_script_has_the_same_options():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bitrate_sweep.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for opt in ("--ranks", "--intervals", "--baselines", "--out", "--iters-first", "--perceptual", "--ray"):
        assert opt in out.stdout


# ------------------------------------------------------------------ sweep


@pytest.fixture(scope="module")
def sweep(clip_dir, tmp_path_factory):
    if FFMPEG is None:
        pytest.skip("ffmpeg is not installed here (CI installs it: apt-get install -y ffmpeg)")
    cfg = SweepConfig(clips=[str(clip_dir)], ranks=[1, 2], intervals=[4, 6], baselines=["x264", "x265"],
                      out=str(tmp_path_factory.mktemp("sweep") / "out"), **FAST)
    return cfg, run_sweep(cfg)


def test_sweep_writes_one_row_per_point(sweep):
    cfg, res = sweep
    out = Path(cfg.out)
    assert res.failures == [] and res.computed == 12
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS + SETTINGS_COLUMNS and len(rows) == 12
    assert sorted((r["codec"], r["rank"], r["interval"]) for r in rows) == sorted(
        (c, str(r), str(t)) for c in ("promptus", "x264", "x265") for r in (1, 2) for t in (4, 6))
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 12 and "lpips" in data["notes"]["unavailable"]
    for r in res.rows:
        path = out / "points" / "grainy" / r["file"]
        assert r["bytes"] == path.stat().st_size  # every byte of the file
        assert r["kbps_all_bytes"] == pytest.approx(8 * r["bytes"] / (13 / 30) / 1000)
        assert 0 < r["ssim"] <= 1 and r["psnr"] > 0 and 0 <= r["severe_psnr_share"] <= 1
        assert r["lpips"] is None and r["severe_lpips_share"] is None
        if r["codec"] == "promptus":
            assert r["closed_loop_identical"] is True and r["target_kbps"] is None
        else:  # matched to the promptus point of the same rank and interval
            match = next(p for p in res.rows if p["point"] == r["matched_point"])
            assert (match["rank"], match["interval"]) == (r["rank"], r["interval"])
            assert r["target_kbps"] == match["kbps_all_bytes"] and r["container"] == "mp4"
            assert (r["iters"], r["size"], r["model"]) == (match["iters"], match["size"], match["model"])


def test_sweep_plots_show_every_curve_and_point(sweep):
    cfg, res = sweep
    for clip in ("grainy", None):
        fig = rd_figure(res.rows, clip)
        panels = describe_figure(fig)
        assert [p["ylabel"] for p in panels] == ["PSNR (dB)", "SSIM", "MS-SSIM"]  # LPIPS: unavailable here
        for p in panels:
            assert [(c["label"], c["points"]) for c in p["curves"]] == [
                ("promptus T=4 (tiny model, random weights)", 2), ("promptus T=6 (tiny model, random weights)", 2),
                ("x264", 4), ("x265", 4)]
        assert "random weights" in fig._suptitle.get_text()  # the tiny model's curve is no real quality
        w, h = (fig.get_size_inches() * fig.dpi).round().astype(int)
        png = Path(cfg.out) / f"rd_{clip or 'mean'}.png"
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (w, h)
            assert np.asarray(im.convert("L")).std() > 5  # not a blank image
    assert [p["panels"] for p in res.plots] == [describe_figure(rd_figure(res.rows, c)) for c in ("grainy", None)]


def test_sweep_bd_rate_is_none_where_curves_do_not_overlap(sweep):
    cfg, res = sweep
    # The tiny random-weight model reconstructs nothing (~10 dB) while the baselines reach > 30 dB.
    assert {(e["baseline"], e["metric"], e["promptus_interval"]) for e in res.bd} == {
        (b, m, t) for b in ("x264", "x265") for m in ("psnr", "ssim") for t in (4, 6)}
    assert all(e["bd_rate_pct"] is None for e in res.bd if e["metric"] == "psnr")
    lines = (Path(cfg.out) / "bd_rate.csv").read_text().splitlines()
    assert lines[0].startswith("clip,promptus_interval,baseline,metric,bd_rate_pct") and len(lines) == 1 + 16


@pytest.mark.slow  # 5 s on 2 cores: full tier
def test_resumed_sweep_skips_finished_points(sweep, monkeypatch):
    cfg, res = sweep
    enc = counted(encoder_mod.Encoder.encode)
    base = counted(baselines.encode_at_bitrate)
    monkeypatch.setattr(encoder_mod.Encoder, "encode", enc)
    monkeypatch.setattr(baselines, "encode_at_bitrate", base)
    again = run_sweep(cfg)
    assert (len(enc.calls), len(base.calls), again.computed) == (0, 0, 0)
    assert again.rows == res.rows

    # As after a kill before the point's JSON was written: that point alone is redone, with resume=True.
    names = {(r["codec"], r["rank"], r["interval"]): r["point"] for r in res.rows}
    (Path(cfg.out) / "points" / "grainy" / f"{names['promptus', 2, 6]}.json").unlink()
    (Path(cfg.out) / "points" / "grainy" / f"{names['x265', 1, 4]}.json").unlink()
    again = run_sweep(cfg)
    assert len(enc.calls) == 1 and enc.calls[0]["resume"] is True and len(base.calls) == 1
    assert again.computed == 2
    strip = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in again.rows]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in res.rows]


# -------------------------------------------------------------------- ray


@pytest.mark.slow  # 20 s on 2 cores: full tier
def test_ray_local_cluster_matches_the_sequential_run(clip_dir, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'promptus[distributed]')")
    common = dict(clips=[str(clip_dir)], ranks=[1, 2], intervals=[4], baselines=[], **FAST)
    seq = run_sweep(SweepConfig(out=str(tmp_path / "seq"), **common))
    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        par = run_sweep(SweepConfig(out=str(tmp_path / "ray"), ray=True, **common))
    finally:
        ray.shutdown()
    assert par.computed == seq.computed == 2 and par.failures == []

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]

    assert strip(par.rows) == strip(seq.rows)
    for r in seq.rows:  # the same bytes, not just the same numbers
        assert (tmp_path / "seq/points/grainy" / r["file"]).read_bytes() == \
               (tmp_path / "ray/points/grainy" / r["file"]).read_bytes()
    # Each job says where it ran: Ray tasks in worker processes with Ray's (here empty) GPU list.
    for r in seq.rows:
        local = json.loads((tmp_path / "seq/points/grainy" / (r["point"] + ".json")).read_text())["worker"]
        remote = json.loads((tmp_path / "ray/points/grainy" / (r["point"] + ".json")).read_text())["worker"]
        assert local["pid"] == os.getpid() and "ray_gpu_ids" not in local
        assert remote["pid"] != os.getpid() and remote["ray_gpu_ids"] == [] and remote["ray_task_id"]


# ------------------------------------------------------- settings and presets


@pytest.mark.slow  # 4 s on 2 cores: full tier
def test_other_settings_add_points_instead_of_replacing_them(clip_dir, tmp_path):
    """Issue 10: a rerun into the same --out with other --iters kept nothing of the first run."""
    out = tmp_path / "s"
    common = dict(clips=[str(clip_dir)], ranks=[1], intervals=[4], baselines=[], out=str(out),
                  codec=CodecConfig(width=32, height=32), model="tiny", progress=False)
    first = run_sweep(SweepConfig(train=TrainConfig(perceptual=False, init_latent="taesd", iters_first=4, iters=2),
                                  **common))
    second = run_sweep(SweepConfig(train=TrainConfig(perceptual=False, init_latent="taesd", iters_first=5, iters=2),
                                   **common))
    assert second.computed == 1  # a new point, not a reuse and not an overwrite
    (a,), (b,) = first.rows, second.rows
    assert a["point"] != b["point"] and a["point"].startswith("promptus_r1_t4_")
    assert (a["iters_first"], b["iters_first"]) == (4, 5) and a["settings"] != b["settings"]
    files = sorted(p.name for p in (out / "points" / "grainy").glob("*.promptus"))
    assert files == sorted([a["file"], b["file"]])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))  # both runs, each with its settings
    assert sorted(r["iters_first"] for r in rows) == ["4", "5"]
    assert {r["model"] for r in rows} == {"tiny"} and {r["size"] for r in rows} == {"32"}
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 2 and data["settings_this_run"] == [b["settings"]]
    assert [r["iters_first"] for r in second.earlier] == [4]
    # The same settings again: both points are reused.
    again = run_sweep(SweepConfig(train=TrainConfig(perceptual=False, init_latent="taesd", iters_first=4, iters=2),
                                  **common))
    assert again.computed == 0 and again.rows[0]["point"] == a["point"]


def test_point_names_change_with_every_setting_that_changes_the_result():
    from promptus.sweep import settings_digest

    base = {"codec": "promptus", "clip": "c", "rank": 2, "interval": 4, "iters_first": 10, "iters": 5, "size": 64,
            "model": "tiny", "model_digest": "ab", "perceptual": False, "seed": 88, "threads": 1, "digest": "x"}
    seen = {settings_digest(base)}
    for key, value in [("iters_first", 11), ("iters", 6), ("size", 32), ("model", "auto"), ("model_digest", "cd"),
                       ("perceptual", True), ("seed", 1), ("threads", 2), ("digest", "y")]:
        seen.add(settings_digest(dict(base, **{key: value})))
    assert len(seen) == 10
    assert settings_digest(dict(base, rank=8, interval=10)) == settings_digest(base)  # the name shows those


def test_preset_quick_fills_what_was_not_given(tmp_path):
    p = argparse.ArgumentParser()
    add_sweep_parser(p.add_subparsers())
    a = p.parse_args(["sweep", "a.mp4", "--preset", "quick", "--ranks", "1", "--checkpoints", str(tmp_path)])
    cfg = config_from_args(a)
    assert cfg.ranks == [1] and cfg.intervals == [5, 10] and cfg.size == 128 and cfg.max_frames == 21
    assert (cfg.train.iters_first, cfg.train.iters, cfg.train.perceptual) == (100, 30, False)
    assert cfg.model == "tiny"  # no SD-Turbo weights in --checkpoints: the tiny model, said in the log
    a = p.parse_args(["sweep", "a.mp4", "--preset", "quick", "--model", "x.safetensors"])
    assert config_from_args(a).model == "x.safetensors"
    out = subprocess.run([sys.executable, "-m", "promptus", "sweep", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    text = " ".join(out.stdout.split())  # the help states the quick values next to the published ones
    from promptus.backends import backend_names

    assert "2 4 8 16; 2 4 8 with --preset quick" in text and f"one of {', '.join(backend_names())}" in text
    assert backend_names()[:4] == ("tensorrt", "aoti", "compile", "torch")  # auto's order first, then the others


# ---- a newcomer's first hour on a CPU (issue 25): the RD plot names random weights

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
