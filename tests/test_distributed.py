"""One clip on several devices (promptus.distributed): two CPU processes with gloo, the tiny model, 32 px.

The tests that start worker processes are in the full tier (PROMPTUS_TESTS=full).
"""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptus.checkpoint import checkpoint_paths, log_path
from promptus.commands.main import main
from promptus.config import CodecConfig, TrainConfig
from promptus.distributed import ModelSource, parse_devices, runs_distributed, shard_bounds
from promptus.encoder import Encoder
from promptus.errors import EncodeAborted, PromptusError
from promptus.memory import MemoryPlan
from synthetic import synthetic_clip
import repo_scripts

# 12 frames at interval 4: segments of 1 (keyframe 0), 4, 4 and 3 frames; two processes run 2+2 and 2+1,
# which the plan below reproduces in one process.
CODEC = CodecConfig(width=32, height=32, rank=2, interval=4, fps=24.0)
# the command's defaults (no plateau within 6/4 iterations), and a schedule whose rate halves along the way
TRAIN = TrainConfig(iters_first=6, iters=4, perceptual=False, init_latent="taesd")
PLATEAU = TRAIN.replace(patience_first=4, patience=2)
SAME_SPLIT = MemoryPlan(micro_batch=2, cache_targets=False)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """CPU bytes are identical for one thread count (docs/determinism.md): every encode here, the command's
    (--threads 1), the API's and the references, runs on one thread, whatever the machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(12, 32, 32)


def one_process(tiny, clip, train, folder):
    """The one-process encode whose memory plan splits every segment's frames as two processes do."""
    out = folder / "ref.promptus"
    res = Encoder(CODEC, train, tiny, device="cpu", progress=False, plan=SAME_SPLIT).encode(clip, out)
    return out.read_bytes(), res


def _no_workers_left():
    """No worker process is left, and this process's group is closed (the next encode can start one)."""
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not multiprocessing.active_children() and not torch.distributed.is_initialized()


def test_devices_parse_and_bad_lists_are_refused():
    assert parse_devices("cpu,cpu") == [torch.device("cpu")] * 2
    assert parse_devices(["cpu", "cpu", "cpu"]) == [torch.device("cpu")] * 3
    bad = ["", "tpu:0,cpu", "nonsense"]
    if not torch.cuda.is_available():
        bad += ["cuda:0,cuda:1", "all"]
    for spec in bad:
        with pytest.raises(PromptusError, match="--devices"):
            parse_devices(spec)


def test_frames_are_shared_out_as_a_memory_plan_splits_them():
    for n in range(1, 12):
        for world in (2, 3, 4):
            parts = [shard_bounds(n, world, r) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a <= b and b == c for (a, b), (c, _) in zip(parts, parts[1:]))  # contiguous, in order
            mb = MemoryPlan(micro_batch=-(-n // world)).micro(n)
            assert [b - a for a, b in parts if b > a] == [min(mb, n - i) for i in range(0, n, mb)]
    assert not runs_distributed(1, 2) and runs_distributed(2, 2) and not runs_distributed(5, 1)


@pytest.mark.slow  # spawns worker processes (torch + diffusers imports)
def test_encode_on_two_cpu_processes_is_byte_identical_to_one_process(tiny, clip, tmp_path):
    """`promptus encode --devices cpu,cpu` writes the bytes of a one-process encode whose plan splits the frames
    the same way; the JSON log and the checkpoint's removal work as on one device."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(clip.numpy()):
        Image.fromarray(f).save(folder / f"{i:05d}.png")
    out = tmp_path / "two.promptus"
    rc = main(["-q", "encode", str(folder), "-o", str(out), "--devices", "cpu,cpu", "--model", "tiny",
               "--size", "32", "--rank", "2", "--interval", "4", "--fps", "24", "--iters-first", "6", "--iters", "4",
               "--perceptual", "off", "--init-latent", "taesd", "--threads", "1"])
    assert rc == 0
    assert out.read_bytes() == one_process(tiny, clip, TRAIN, tmp_path)[0]
    entries = [json.loads(line) for line in log_path(out).read_text().splitlines()]
    assert [e["keyframe"] for e in entries] == [0, 1, 2, 3]
    assert not any(p.exists() for p in checkpoint_paths(out))
    assert _no_workers_left()


@pytest.mark.slow  # spawns worker processes (torch + diffusers imports)
def test_killed_worker_is_an_error_then_abort_and_resume_give_the_same_bytes(tiny, clip, tmp_path):
    out = tmp_path / "two.promptus"
    seen = []

    def kill_worker_in_keyframe_2(m):
        seen.append(m)
        if m["keyframe"] == 2 and m["iteration"] == 1:
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

    enc = Encoder(CODEC, PLATEAU, tiny, devices=["cpu", "cpu"], progress=False, callback=kill_worker_in_keyframe_2)
    t0 = time.monotonic()
    with pytest.raises(PromptusError, match="worker on cpu .*(stopped|failed)") as e:
        enc.encode(clip, out)
    assert time.monotonic() - t0 < 120, "a dead worker must end the encode at once, not after a timeout"
    assert "resume" in str(e.value)
    assert _no_workers_left()
    assert json.loads(checkpoint_paths(out)[1].read_text())["keyframes_done"] == 2
    # the preview frames of a distributed step are gathered from both processes
    frames = next(m["frames"] for m in seen if m["keyframe"] == 1)
    assert frames.shape[0] == 4 and all(frames[i].abs().sum() > 0 for i in range(4))

    enc = Encoder(CODEC, PLATEAU, tiny, devices=["cpu", "cpu"], progress=False,
                  should_stop=lambda: len(log_path(out).read_text().splitlines()) >= 3)
    with pytest.raises(EncodeAborted):
        enc.encode(clip, out, resume=True)
    assert _no_workers_left()
    assert json.loads(checkpoint_paths(out)[1].read_text())["keyframes_done"] == 3

    enc = Encoder(CODEC, PLATEAU, tiny, devices="cpu,cpu", progress=False)
    res = enc.encode(clip, out, resume=True)
    data, ref = one_process(tiny, clip, PLATEAU, tmp_path)
    assert out.read_bytes() == data
    assert [(r.best_iteration, r.best_loss, r.final_lr) for r in res.keyframes] == \
        [(r.best_iteration, r.best_loss, r.final_lr) for r in ref.keyframes]
    assert res.reconstruction.shape == clip.shape


@pytest.mark.slow  # spawns worker processes (torch + diffusers imports)
def test_a_worker_that_cannot_load_the_model_is_a_clear_error(tiny, clip, tmp_path):
    out = tmp_path / "x.promptus"
    enc = Encoder(CODEC, TRAIN, tiny, devices="cpu,cpu", progress=False,
                  worker_models=ModelSource(str(tmp_path / "missing.safetensors")))
    with pytest.raises(PromptusError, match=r"worker on cpu failed while loading the models: .*missing\.safetensors"):
        enc.encode(clip, out)
    assert not out.exists()
    assert _no_workers_left()


@pytest.mark.slow  # worker processes, a Ray cluster and a stream server, at a tiny size
def test_scale_bench_runs_every_part_on_two_cpu_devices(tmp_path):
    """scripts/scale_bench.py at a tiny size: every part measured for N = 1 and N = 2 (or said not measured)."""
    bench = repo_scripts.load("scripts/scale_bench.py")
    out = tmp_path / "scale.json"
    assert bench.main(["--model", "tiny", "--size", "32", "--devices", "cpu,cpu", "--interval", "4", "--rank", "2",
                       "--iters-first", "3", "--iters", "2", "--perceptual", "off", "--sweep-points", "2",
                       "--sweep-frames", "9", "--sweep-iters-first", "3", "--sweep-iters", "2",
                       "--stream-seconds", "1.5", "--stream-counts", "1", "--work", str(tmp_path / "w"),
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    enc = r["encode"]["columns"]
    assert set(enc) == {"1", "2"} and all(c["ms_per_iteration_segment"] > 0 for c in enc.values())
    assert 0 < enc["2"]["serial_share"] < 1 and enc["2"]["devices"] == ["cpu", "cpu"]
    sweep = r["sweep"]["columns"]
    assert sweep["1"]["computed"] == 2 and sweep["1"]["failures"] == 0
    assert "not_measured" in sweep["2"] or sweep["2"]["computed"] == 2
    streams = r["streams"]["columns"]
    assert streams["1"]["capacity_fps"] > 0 and ("not_measured" in streams["2"] or streams["2"]["capacity_fps"] > 0)
