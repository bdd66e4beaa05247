"""Sweeps on long-lived Ray actors (promptus.sweep.executors.RayExecutor): a local Ray cluster that declares two
logical GPUs, actors on the CPU, the tiny model at 32 px. Skipped with the reason where Ray is not installed."""

import argparse
import json
import os

import numpy as np
import pytest

from promptus.commands.sweep import config_from_args
from promptus.commands.sweep import register as add_sweep_parser
from promptus.config import CodecConfig, TrainConfig
from promptus.errors import PromptusError
from promptus.sweep import SweepConfig, TIMING_FIELDS, promptus_spec, run_sweep
from promptus.sweep.clips import prepare_clip
from promptus.sweep.executors import RayExecutor, estimated_seconds
from promptus.video import sky_clip, write_frames

FAST = dict(codec=CodecConfig(width=32, height=32),
            train=TrainConfig(perceptual=False, init_latent="taesd", iters_first=8, iters=4), model="tiny",
            progress=False, baselines=[])


def parse(*argv):
    p = argparse.ArgumentParser()
    add_sweep_parser(p.add_subparsers())
    return config_from_args(p.parse_args(["sweep", "clip", *argv]))


def test_ray_option_takes_an_optional_address_and_gpus_per_point_needs_it():
    assert (parse("--ray").ray, parse("--ray").ray_address) == (True, None)
    cfg = parse("--ray", "ray://head:10001", "--gpus-per-point", "2")
    assert (cfg.ray, cfg.ray_address, cfg.gpus_per_point) == (True, "ray://head:10001", 2)
    assert parse("--ray-address", "ray://h:1").ray_address == "ray://h:1" and not parse().ray
    with pytest.raises(PromptusError, match="--gpus-per-point needs --ray"):
        SweepConfig(clips=[__file__], gpus_per_point=2).validate()


def test_longer_points_are_estimated_longer():
    def spec(interval, frames=41, iters=100):
        return {"inputs": {"codec": "promptus", "frame_count": frames, "interval": interval, "iters_first": 1000,
                           "iters": iters}}

    assert estimated_seconds(spec(4)) > estimated_seconds(spec(10))  # more segments, each with its overhead
    assert estimated_seconds(spec(10, frames=141)) > estimated_seconds(spec(10))
    assert estimated_seconds(spec(10, iters=200)) > estimated_seconds(spec(10))
    assert estimated_seconds({"inputs": {"codec": "x264"}}) == 0


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'promptus[distributed]')")
    ray.init(num_cpus=2, num_gpus=2, object_store_memory=80 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip") / "sky"
    noise = np.random.RandomState(0).randint(-12, 13, size=(9, 32, 32, 3))
    write_frames(np.clip(sky_clip(9, 32).astype(np.int16) + noise, 0, 255).astype(np.uint8), d, 30)
    return d


@pytest.fixture(scope="module")
def sequential(clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    return run_sweep(SweepConfig(clips=[str(clip_dir)], ranks=[1, 2, 3], intervals=[4], out=str(out), **FAST))


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


@pytest.mark.slow  # a Ray cluster and its actor processes
def test_actors_give_the_sequential_results_and_reuse_their_models(ray_cluster, clip_dir, sequential, tmp_path):
    par = run_sweep(SweepConfig(clips=[str(clip_dir)], ranks=[1, 2, 3], intervals=[4], out=str(tmp_path), ray=True,
                                **FAST))
    assert par.failures == [] and par.computed == sequential.computed == 3
    assert strip(par.rows) == strip(sequential.rows)
    workers = []
    for r in sequential.rows:  # the same bytes, not just the same numbers
        assert (sequential.out / "points/sky" / r["file"]).read_bytes() == (tmp_path / "points/sky" / r["file"]).read_bytes()
        local = json.loads((sequential.out / "points/sky" / (r["point"] + ".json")).read_text())["worker"]
        assert local["executor"] == "local" and local["pid"] == os.getpid()
        w = json.loads((tmp_path / "points/sky" / (r["point"] + ".json")).read_text())["worker"]
        assert w["executor"] == "ray-actor" and w["pid"] != os.getpid() and len(w["ray_gpu_ids"]) == 1
        assert 0 <= w["outside_training_s"] <= w["seconds"] and w["attempt"] == 1
        workers.append(w)
    # two actors (one per logical GPU) ran three points: one of them ran two, in the same process
    assert len({w["pid"] for w in workers}) == 2
    assert sorted(w["actor_points"] for w in workers) == [1, 1, 2]


@pytest.mark.slow  # a Ray cluster and its actor processes
def test_a_killed_actors_point_runs_again_elsewhere_longest_first(ray_cluster, clip_dir, sequential, tmp_path):
    cfg = SweepConfig(clips=[str(clip_dir)], ranks=[1, 2], intervals=[4], out=str(sequential.out), **FAST)
    clip = prepare_clip(str(clip_dir), "sky", sequential.out, size=32)
    digest = sequential.rows[0]["model_digest"]
    specs = [promptus_spec(cfg, clip, rank, 4, model_digest=digest) for rank in (1, 2)]
    for s in specs:  # into a fresh folder, so that nothing is reused
        for k, v in s["paths"].items():
            if k != "frames":
                s["paths"][k] = str(tmp_path / os.path.basename(v))
    longer = dict(specs[1], inputs=dict(specs[1]["inputs"], iters=40))  # a point estimated longer
    ex = RayExecutor(gpus_per_point=1, max_actors=1)
    try:
        ex.submit(specs[0])
        ex.submit(longer)
        ex._dispatch()  # the longest point starts first, on the only actor
        (running,) = ex._running.values()
        assert running[0] is longer
        ray_cluster.kill(running[2])  # the actor dies under its point
        results = [ex.next_result() for _ in range(2)]
    finally:
        ex.close()
    by_point = {s["point"]: r for s, r in results}
    assert not any(isinstance(r, BaseException) for r in by_point.values()), by_point
    assert by_point[longer["point"]]["worker"]["attempt"] == 2  # tried once more, on a new actor
    assert by_point[specs[0]["point"]]["worker"]["attempt"] == 1
    ref = {r["point"]: r for r in sequential.rows}[specs[0]["point"]]
    assert (tmp_path / ref["file"]).read_bytes() == (sequential.out / "points/sky" / ref["file"]).read_bytes()


# ------------------------------------------------------------- the compiled trainer on disk


@pytest.mark.slow  # inductor compiles a small graph on the CPU
def test_compiled_trainer_step_is_stored_next_to_the_decoder_and_loaded_by_a_new_process(tmp_path, caplog):
    import logging

    import torch

    from promptus import trainer_cache as tc

    if not tc.mechanism_available():
        pytest.skip(f"torch {torch.__version__} has no torch.compiler.save_cache_artifacts (torch ≥ 2.7)")
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    store = tc.CompiledTrainerStore(tmp_path, [net], size=32, dtype=torch.float32, timestep=999,
                                    device=torch.device("cpu"), options="default,perceptual=off")
    step = torch.compile(lambda x: net(x).square().sum())
    tc._DONE.clear()
    store.before(4, ("unet",))
    x = torch.randn(4, 8, requires_grad=True)
    step(x).backward()
    store.after(4, ("unet",))
    (sidecar,) = (tmp_path / "trainer").glob("*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["kind"] == "compiled_trainer" and meta["key"]["batch"] == 4
    assert meta["key"]["options"] == "default,perceptual=off,checkpoint=unet" and meta["build_s"] >= 0

    tc._DONE.clear()  # as in a new process
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="promptus.trainer_cache"):
        store.before(4, ("unet",))
    assert "loaded the compiled trainer step for 4-frame passes" in caplog.text
    assert store.key(4, ("unet",)) != store.key(5, ("unet",)) != store.key(4, ())  # each shape its own entry

    tc._DONE.clear()  # a damaged artifact is removed and compiled again, never trusted
    artifact = sidecar.with_suffix(".bin")
    artifact.write_bytes(b"x" * artifact.stat().st_size)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        store.before(4, ("unet",))
    assert not artifact.exists() and any(r.levelno == logging.WARNING for r in caplog.records), caplog.text
    assert store._pending  # it will be stored again after the next first iteration
