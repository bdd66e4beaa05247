"""Encoding schedules: the stop rules as pure objects, and both schedules in the encoder (tiny model, CPU)."""

import argparse
import math
import hashlib
import json
import random

import pytest
import torch
from tqdm import tqdm

from promptus.bitstream import read
from promptus.commands.common import add_encode_args, train_from_args
from promptus.config import FAST_SCHEDULE_FIELDS, CodecConfig, TrainConfig
from promptus.encoder import Encoder, checkpoint_paths
from promptus.encoding_schedules import FixedCount, PlateauStop, Schedule, random_factors
from promptus.errors import EncodeAborted, PromptusError
from promptus.schedule import OneStep, make_noise, mix_latent, to_model_range
from promptus.video import synthetic_clip

import repo_scripts

# The published schedule's bytes for this encode, computed with the tree before schedules existed
# (commit a3b70fe, torch 2.13 CPU): the published schedule must stay byte-identical to it.
PUBLISHED_DIGEST = "e0213734061acfd2e002ffbbfa5c952c47c8779e752afe31eb6823c3cf09f599"
SMALL = TrainConfig(iters_first=12, iters=6, patience_first=4, patience=3, perceptual=False, init_latent="taesd")
FAST = SMALL.replace(schedule="fast", iters_first=40, iters=30, min_iters_first=5, min_iters=3,
                     plateau_window_first=4, plateau_window=3, plateau_tolerance=0.01)


def codec(size=32, **kw):
    return CodecConfig(**dict(dict(width=size, height=size, rank=2, interval=3, fps=24.0), **kw))


def plateau_reference(rule: PlateauStop, losses: list[float]) -> str | None:
    """The rule's formula read off the docstring, over the whole history (quadratic, for checking)."""
    n, w = len(losses), rule.window
    if n >= rule.max_iters:
        return "max"
    if n < rule.min_iters or n <= w:
        return None
    before, recent = min(losses[:-w]), min(losses[-w:])
    return "plateau" if before - recent <= rule.tolerance * abs(before) else None


def first_stop(rule, losses):
    s = rule.stopper()
    for i, loss in enumerate(losses, 1):
        reason = s.observe(loss)
        if reason is not None:
            return i, reason
    return None, None


def test_plateau_stop_matches_its_formula_on_random_histories():
    rng = random.Random(0)
    for trial in range(300):
        rule = PlateauStop(min_iters=rng.randint(1, 30), max_iters=rng.randint(30, 80), window=rng.randint(1, 12),
                           tolerance=rng.choice([0.0, 1e-3, 0.05]))
        level, losses = 1.0, []
        for _ in range(rule.max_iters):
            level *= 1 - rng.choice([0.0, 0.0, 1e-4, 0.01, 0.1])  # stretches of progress and of none
            losses.append(level * (1 + rng.uniform(0, 0.2)))
        s = rule.stopper()
        for i in range(1, len(losses) + 1):
            got, want = s.observe(losses[i - 1]), plateau_reference(rule, losses[:i])
            assert (got is None) == (want is None), (trial, i, rule, got, want)
            if got is not None:
                assert got.startswith("maximum" if want == "max" else "plateau")
                break


def test_plateau_stop_bounds():
    rule = PlateauStop(min_iters=10, max_iters=50, window=4, tolerance=1e-3)
    assert first_stop(rule, [1.0] * 100)[0] == 10  # flat from the start: stops at the minimum, not before
    assert first_stop(rule, [1.0 / (i + 1) for i in range(100)]) == (50, "maximum (50)")  # always improving
    rule = PlateauStop(min_iters=1, max_iters=50, window=4, tolerance=1e-3)
    assert first_stop(rule, [1.0] * 100)[0] == 5  # needs a history longer than the window
    falls_then_flat = [1.0 - 0.1 * i for i in range(8)] + [0.3] * 20
    assert first_stop(rule, falls_then_flat)[0] == 8 + 4  # the window after the last improvement
    assert first_stop(FixedCount(7), [1.0] * 20) == (7, "published count (7)")
    with pytest.raises(PromptusError, match="minimum"):
        PlateauStop(min_iters=60, max_iters=50, window=4, tolerance=0)


def test_schedule_config_validation_and_result_settings():
    with pytest.raises(PromptusError, match="schedule='slow'.*published, fast"):
        TrainConfig(schedule="slow")
    with pytest.raises(PromptusError, match="plateau_window"):
        TrainConfig(plateau_window=0)
    with pytest.raises(PromptusError, match="warm_lr"):
        TrainConfig(warm_lr=1e-5)
    # published: no schedule field in the settings that decide a result (older checkpoints still resume)
    published = TrainConfig().result_dict()
    assert "schedule" not in published and not set(FAST_SCHEDULE_FIELDS) & set(published)
    fast = TrainConfig(schedule="fast").result_dict()
    assert fast["schedule"] == "fast" and set(FAST_SCHEDULE_FIELDS) <= set(fast)


def test_initial_factors_published_random_fast_warm():
    c = codec()
    prev_U, prev_V = torch.full((77, 2), 0.25), torch.full((2, 1024), -0.5)
    U, V, warm = Schedule.of(TrainConfig()).initial_factors(c, 3, prev_U, prev_V)
    assert not warm and torch.equal(U, random_factors(c, 0, 3)[0]) and torch.equal(V, random_factors(c, 0, 3)[1])
    U, V, warm = Schedule.of(TrainConfig(schedule="fast")).initial_factors(c, 3, prev_U, prev_V)
    assert warm and torch.equal(U, prev_U) and torch.equal(V, prev_V)
    U[0, 0] = 9.0
    assert prev_U[0, 0] == 0.25  # a copy: training it leaves the transmitted keyframe alone
    U, V, warm = Schedule.of(TrainConfig(schedule="fast")).initial_factors(c, 0)
    assert not warm and torch.equal(U, random_factors(c, 0, 0)[0])


def test_published_encode_is_byte_identical_to_before(tiny, tmp_path):
    out = tmp_path / "c.promptus"
    # The digest was taken on one CPU thread: CPU results are identical for one thread count
    # (docs/determinism.md), and the machine running the tests may have any number of cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Encoder(codec(), SMALL, tiny, device="cpu", progress=False).encode(synthetic_clip(8, 32, 32), out)
    finally:
        torch.set_num_threads(threads)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == PUBLISHED_DIGEST
    log = [json.loads(line) for line in out.with_name(out.name + ".log.jsonl").read_text().splitlines()]
    assert [r["iterations"] for r in log] == [12, 6, 6, 6]
    assert [r["stop"] for r in log] == ["published count (12)"] + ["published count (6)"] * 3


def test_fast_encode_warm_starts_and_stops_early(tiny, tmp_path):
    clip = synthetic_clip(10, 32, 32)
    out = tmp_path / "f.promptus"
    seen = []
    enc = Encoder(codec(), FAST, tiny, device="cpu", progress=False, callback=seen.append)
    starts = []
    init = enc._init_factors

    def spy(k, prev=None):
        U, V, warm = init(k, prev)
        starts.append((k, warm, prev, U.detach().clone(), V.detach().clone()))
        return U, V, warm

    enc._init_factors = spy
    res = enc.encode(clip, out)
    assert [(k, warm) for k, warm, *_ in starts] == [(0, False), (1, True), (2, True), (3, True)]
    for k, _, prev, U, V in starts[1:]:  # from the previous keyframe's transmitted factors, exactly
        assert torch.equal(U, prev.U) and torch.equal(V, prev.V)
        assert prev == res_keyframes(out)[k - 1]
    log = [json.loads(line) for line in out.with_name(out.name + ".log.jsonl").read_text().splitlines()]
    used = [r["iterations"] for r in log]
    assert used == [r.iterations for r in res.keyframes]
    assert used == [sum(1 for m in seen if m["keyframe"] == k) for k in range(4)]
    assert 5 <= used[0] <= 40 and all(3 <= u <= 30 for u in used[1:])
    assert any(r["stop"].startswith("plateau") for r in log), log  # the plateau rule did fire somewhere
    assert sum(used) < 40 + 3 * 30


def res_keyframes(path):
    return read(path).keyframes


def test_fast_resume_after_abort_is_byte_identical(tiny, tmp_path):
    clip = synthetic_clip(10, 32, 32)
    ref = tmp_path / "ref.promptus"
    Encoder(codec(), FAST, tiny, device="cpu", progress=False).encode(clip, ref)
    out = tmp_path / "out.promptus"
    seen = []
    enc = Encoder(codec(), FAST, tiny, device="cpu", progress=False, callback=seen.append,
                  should_stop=lambda: seen[-1]["keyframe"] == 2 and seen[-1]["iteration"] == 1)
    with pytest.raises(EncodeAborted):
        enc.encode(clip, out)
    ckpt = json.loads(checkpoint_paths(out)[1].read_text())
    assert ckpt["train"]["schedule"] == "fast" and ckpt["keyframes_done"] == 2
    published = Encoder(codec(), SMALL, tiny, device="cpu", progress=False)
    with pytest.raises(PromptusError, match="different train"):  # another schedule cannot continue it
        published.encode(clip, out, resume=True)
    enc.should_stop = None
    res = enc.encode(clip, out, resume=True)
    assert [r.keyframe for r in res.keyframes] == [0, 1, 2, 3]
    assert out.read_bytes() == ref.read_bytes()


def test_progress_bar_shows_the_stop_reason(tiny):
    enc = Encoder(codec(), FAST, tiny, device="cpu", progress=False)
    frames = enc.load_frames(synthetic_clip(8, 32, 32))
    z = mix_latent(enc.init_latent(frames[0]).to_torch(), make_noise(enc.codec), enc.codec.mix)
    with tqdm(total=FAST.iters_first, disable=False, file=open("/dev/null", "w")) as bar:
        _, stats = enc.train_keyframe(0, z, to_model_range(frames[:1]), None, OneStep.at(999), bar)
        assert bar.n == bar.total == stats["iterations"]
        assert bar.postfix and f"stop={stats['stop']}" in bar.postfix


def test_cli_schedule_option():
    p = argparse.ArgumentParser()
    add_encode_args(p)
    assert train_from_args(p.parse_args([])).schedule == "published"
    assert train_from_args(p.parse_args(["--schedule", "fast"])).schedule == "fast"
    with pytest.raises(SystemExit):
        p.parse_args(["--schedule", "slow"])


def test_iteration_study_end_to_end_on_the_tiny_model(tmp_path, capsys):
    """scripts/iteration_study.py: both schedules, curves with LPIPS probes, closed-loop scores, JSON and plot."""
    from promptus.metrics import LPIPSNet
    from promptus.video import write_frames

    study = repo_scripts.load("scripts/iteration_study.py")

    clip = tmp_path / "clip"
    write_frames((f.numpy() for f in synthetic_clip(7, 32, 32)), clip, 24.0)
    torch.manual_seed(0)  # LPIPS' backbone with random weights: the real ones can't be downloaded here
    alexnet = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in LPIPSNet().features.state_dict().items()}, alexnet)
    out = tmp_path / "study"
    argv = [str(clip), "--out", str(out), "--model", "tiny", "--device", "cpu", "--size", "32", "--rank", "2",
            "--interval", "3", "--iters-first", "10", "--iters", "6", "--perceptual", "off", "--init-latent", "taesd",
            "--probe-every", "3", "--lpips-weights", str(alexnet), "-q"]
    assert study.main(argv) == 0
    data = json.loads((out / "study.json").read_text())
    assert data["lpips_unavailable"] is None
    by = {r["schedule"]: r for r in data["results"]}
    assert set(by) == {"published", "fast"}
    assert by["published"]["iterations"] == 10 + 2 * 6  # keyframes 0, 3, 6
    assert by["fast"]["iterations"] <= 10 + 2 * 6
    for r in by.values():
        curve = r["curve"]
        assert [p["step"] for p in curve] == list(range(1, len(curve) + 1))
        assert all(b["seconds"] >= a["seconds"] for a, b in zip(curve, curve[1:]))
        probes = [p for p in curve if "lpips" in p]
        assert [p["iteration"] % 3 for p in probes] == [0] * len(probes) and len(probes) >= 3
        assert all(p["lpips"] >= 0 for p in probes)
        assert r["closed_loop"]["psnr_clip"] > 5 and r["closed_loop"]["lpips"] is not None
        assert sum(k["iterations"] for k in r["keyframes"]) == r["iterations"]
    png = (out / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "clip.fast.promptus").exists() and (out / "clip.published.promptus").exists()
    printed = capsys.readouterr().out
    assert "published" in printed and "fast" in printed and "study.png" in printed
    # a rerun with the same options reuses both encodes
    before = (out / "clip.fast.promptus").stat().st_mtime_ns
    assert study.main(argv) == 0
    assert (out / "clip.fast.promptus").stat().st_mtime_ns == before
    assert study.main(argv + ["--schedules", "slow"]) == 1
    assert "not a schedule" in capsys.readouterr().err


@pytest.mark.slow  # spawns worker processes (torch + diffusers imports)
def test_fast_schedule_on_two_cpu_processes_is_byte_identical_to_one_process(tiny, tmp_path):
    """Every process takes the same stop decisions (they read the same all-reduced losses) and warm starts."""
    from promptus.memory import MemoryPlan

    c = CodecConfig(width=32, height=32, rank=2, interval=4, fps=24.0)
    clip = synthetic_clip(12, 32, 32)
    one, two = tmp_path / "one.promptus", tmp_path / "two.promptus"
    res1 = Encoder(c, FAST, tiny, device="cpu", progress=False,
                   plan=MemoryPlan(micro_batch=2, cache_targets=False)).encode(clip, one)
    res2 = Encoder(c, FAST, tiny, devices=["cpu", "cpu"], progress=False).encode(clip, two)
    assert two.read_bytes() == one.read_bytes()
    assert [r.iterations for r in res2.keyframes] == [r.iterations for r in res1.keyframes]
    assert [r.stop for r in res2.keyframes] == [r.stop for r in res1.keyframes]
    assert any(r.stop.startswith("plateau") for r in res1.keyframes)


def test_convergence_benchmark_runs_at_a_tiny_size(tmp_path, capsys):
    """benchmarks/convergence.py, the GPU command's options at a CPU size: table, projection and JSON."""
    bench = repo_scripts.load("benchmarks/convergence.py")
    out = tmp_path / "c.json"
    assert bench.main(["--model", "tiny", "--device", "cpu", "--size", "32", "--keyframes", "3", "--interval", "3",
                       "--iters-first", "20", "--iters", "8", "--fast", "min_iters_first=5,plateau_window_first=4,"
                       "min_iters=3,plateau_window=3", "--timing-model", "tiny", "--timing-size", "32",
                       "--timing-iters", "4", "--timing-perceptual", "off", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    pub, fast = d["runs"]["published"], d["runs"]["fast"]
    assert pub["iterations"] == 20 + 2 * 8 and fast["iterations"] <= pub["iterations"]
    assert d["prompt_dependence"]["random_prompts_mean_abs_diff"] > 1  # the tiny model's frames follow the prompt
    for r in (pub, fast):
        assert 0 < r["iterations_to_99"] <= r["iterations"] or not r["reached_99_every_keyframe"]
        assert math.isfinite(r["psnr"]) and r["seconds_to_99"] > 0
    assert pub["iterations_to_99"] <= pub["iterations"] and pub["reached_99_every_keyframe"]
    assert set(d["projection"]) == {"published on tiny", "fast on tiny", "published counts on tiny"}
    full = d["projection"]["published counts on tiny"]
    assert (full["keyframe0_iterations"], full["segment_iterations_mean"], full["segments"]) == (10_000, 1_500, 14)
    assert d["timing"]["segment_ms_per_iteration"] > 0
    assert "target: fast within 0.1 dB" in capsys.readouterr().out
