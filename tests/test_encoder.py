"""The inversion trainer with the tiny model on CPU (32–64 px)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptus
from promptus.backends import make_backend
from promptus.config import CodecConfig, TrainConfig
from promptus.decoder import Decoder
from promptus.encoder import Encoder, checkpoint_paths, frames_digest
from promptus.errors import EncodeAborted, PromptusError, VideoError
from promptus.metrics import clip_psnr as psnr_uint8
from promptus.prompts import embedding
from promptus.schedule import OneStep, make_noise, mix_latent, to_model_range

from synthetic import synthetic_clip

ROOT = Path(__file__).resolve().parent.parent
FAST = TrainConfig(iters_first=12, iters=6, patience_first=4, patience=3, perceptual=False, init_latent="taesd")


def codec(size=32, **kw):
    return CodecConfig(**dict(dict(width=size, height=size, rank=2, interval=3, fps=24.0), **kw))


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(8, 32, 32)  # keyframes 0, 3, 6; the last segment is cut to 1 frame... 7 = 6+1


@pytest.fixture(scope="module")
def encoded(tiny, clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "clip.promptus"
    metrics = []
    res = Encoder(codec(), FAST, tiny, device="cpu", callback=metrics.append, progress=False).encode(clip, out)
    return res, metrics


def test_loss_falls_within_n_iterations(tiny, clip):
    """On the moving synthetic clip keyframe 0's loss falls by ≥ 20 % within 60 iterations."""
    metrics = []
    enc = Encoder(codec(), TrainConfig(iters_first=60, iters=1, patience_first=20, perceptual=False,
                                       init_latent="taesd"), tiny, device="cpu", callback=metrics.append,
                  progress=False)
    frames = enc.load_frames(clip)
    init = enc.init_latent(frames[0])
    z = mix_latent(init.to_torch(), make_noise(enc.codec), enc.codec.mix)
    enc.train_keyframe(0, z, to_model_range(frames[:1]), None, OneStep.at(999))
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 60
    assert min(losses) <= 0.8 * losses[0], (losses[0], min(losses))


def test_every_frame_and_keyframe_is_written(encoded, clip):
    res, metrics = encoded
    bs = promptus.read(res.path)
    assert bs.header.frame_count == 8 and [k.index for k in bs.keyframes] == [0, 3, 6, 9]
    assert res.reconstruction.shape == (8, 32, 32, 3)
    assert [r.frames for r in res.keyframes] == [(0, 0), (1, 3), (4, 6), (7, 7)]
    assert {m["keyframe"] for m in metrics} == {0, 1, 2, 3}
    log = [json.loads(line) for line in Path(str(res.path) + ".log.jsonl").read_text().splitlines()]
    assert [e["keyframe"] for e in log] == [0, 1, 2, 3] and all("psnr" in e for e in log)
    assert not any(p.exists() for p in checkpoint_paths(res.path))  # removed at the end
    assert res.bytes == res.path.stat().st_size and res.kbps > 0


def test_written_prompt_is_the_best_quantized_iterate(tiny, encoded, clip):
    """Keyframe 0's loss recomputed from the *transmitted* prompt equals the best loss the trainer saw."""
    res, metrics = encoded
    bs = promptus.read(res.path)
    kf = bs.keyframes[0]
    o = OneStep.at(999)
    z = mix_latent(bs.init.to_torch(), make_noise(bs.header.config), 0.05)
    with torch.no_grad():
        eps = tiny.unet(z, torch.tensor([999]), encoder_hidden_states=embedding(kf.U, kf.V)[None]).sample
        image = tiny.taesd.decoder(o.x0(z, eps))
    target = to_model_range(clip[:1])
    loss = 0.8 * (image - target).pow(2).mean() + 0.1 * embedding(kf.U, kf.V).abs().mean()
    k0 = [m["loss"] for m in metrics if m["keyframe"] == 0]
    assert res.keyframes[0].best_loss == pytest.approx(min(k0))
    assert loss.item() == pytest.approx(min(k0), rel=1e-4)


def test_closed_loop_decoder_reproduces_the_encoder(tiny, encoded):
    res, _ = encoded
    bs = promptus.read(res.path)
    backend = make_backend("torch", tiny, "cpu", batch=bs.header.interval, size=bs.header.width)
    decoded = Decoder(backend, tiny.identity()).decode_all(bs)
    assert psnr_uint8(decoded, res.reconstruction) >= 50


def test_perceptual_loss_on_runs(tiny, clip, tmp_path):
    from promptus.losses import random_vgg19

    tc = FAST.replace(perceptual=True, iters_first=3, iters=2)
    res = Encoder(codec(), tc, tiny, device="cpu", vgg=random_vgg19(), progress=False).encode(
        clip[:4], tmp_path / "p.promptus")
    assert len(res.keyframes) == 2 and math.isfinite(res.keyframes[0].best_loss)


def test_vae_init_latent(tiny, clip, tmp_path):
    res = Encoder(codec(), FAST.replace(init_latent="vae", iters_first=2, iters=2), tiny, device="cpu",
                  progress=False).encode(clip[:4], tmp_path / "v.promptus")
    assert promptus.read(res.path).init.precision == "fp16"


def test_bad_input_gives_clear_errors_and_no_files(tiny, clip, tmp_path):
    out = tmp_path / "x.promptus"
    enc = Encoder(codec(), FAST, tiny, device="cpu", progress=False)
    with pytest.raises(VideoError, match="needs at least 4"):
        enc.encode(clip[:3], out)
    with pytest.raises(VideoError, match="32×32"):
        enc.encode(synthetic_clip(8, 48, 48), out)
    with pytest.raises(PromptusError, match="rank"):
        codec(rank=0)
    with pytest.raises(PromptusError, match="multiple of 8"):
        codec(size=30)
    gray = tmp_path / "gray"
    gray.mkdir()
    for i in range(5):
        Image.new("L", (32, 32)).save(gray / f"{i:05d}.png")
    with pytest.raises(VideoError, match="grayscale"):
        enc.encode(gray, out)
    assert list(tmp_path.glob("x.promptus*")) == []


# ------------------------------------------------------------- processes

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def save_clip(folder: Path, frames) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f.numpy()).save(folder / f"{i:05d}.png")
    return folder


def encode_cmd(src, out, *extra):
    return [sys.executable, "-m", "promptus", "-q", "encode", str(src), "-o", str(out), "--model", "tiny",
            "--device", "cpu", "--size", "32", "--rank", "2", "--interval", "3", "--iters-first", "40",
            "--iters", "40", "--perceptual", "off", "--init-latent", "taesd", *extra]


@pytest.mark.slow  # 24 s on 2 cores: full tier
def test_resume_after_kill_is_byte_identical(tmp_path):
    src = save_clip(tmp_path / "clip", synthetic_clip(13, 32, 32))  # keyframes 0,3,6,9,12
    ref = tmp_path / "ref.promptus"
    subprocess.run(encode_cmd(src, ref), check=True, env=ENV, timeout=600)

    out = tmp_path / "out.promptus"
    _, ckpt_json = checkpoint_paths(out)
    proc = subprocess.Popen(encode_cmd(src, out), env=ENV)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # kill it once the second keyframe (index 1) is checkpointed
            if ckpt_json.exists():
                try:
                    if json.loads(ckpt_json.read_text())["keyframes_done"] >= 2:
                        break
                except ValueError:
                    pass
            assert proc.poll() is None, "the encoder finished before it could be killed; give it more work"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    done = json.loads(ckpt_json.read_text())["keyframes_done"]
    assert 2 <= done < 5
    subprocess.run(encode_cmd(src, out, "--resume"), check=True, env=ENV, timeout=600)
    assert out.read_bytes() == ref.read_bytes()


def test_resume_refuses_other_options(tiny, tmp_path):
    clip = synthetic_clip(7, 32, 32)
    out = tmp_path / "o.promptus"
    enc = Encoder(codec(), FAST, tiny, device="cpu", progress=False)
    bs_path, js_path = checkpoint_paths(out)

    class Stop(Exception):
        pass

    def stop_after_two(m):
        if m["keyframe"] == 2:
            raise Stop

    enc.callback = stop_after_two
    with pytest.raises(Stop):
        enc.encode(clip, out)
    assert js_path.exists() and not out.exists()
    other = Encoder(codec(rank=3), FAST, tiny, device="cpu", progress=False)
    with pytest.raises(PromptusError, match="different codec"):
        other.encode(clip, out, resume=True)
    enc.callback = None
    res = enc.encode(clip, out, resume=True)
    assert [r.keyframe for r in res.keyframes] == [0, 1, 2]


def test_should_stop_aborts_at_once_keeps_keyframes_and_resumes(tiny, tmp_path):
    clip = synthetic_clip(10, 32, 32)  # keyframes 0, 3, 6, 9
    ref = tmp_path / "ref.promptus"
    Encoder(codec(), FAST, tiny, device="cpu", progress=False).encode(clip, ref)
    out = tmp_path / "out.promptus"
    seen = []
    enc = Encoder(codec(), FAST, tiny, device="cpu", progress=False, callback=seen.append,
                  should_stop=lambda: seen[-1]["keyframe"] == 2 and seen[-1]["iteration"] == 1)
    with pytest.raises(EncodeAborted, match="resume") as e:
        enc.encode(clip, out)
    assert e.value.keyframes_done == 2
    assert (seen[-1]["keyframe"], seen[-1]["iteration"]) == (2, 1)  # stopped at the first poll that said so
    assert tuple(seen[-1]["frames"].shape) == (3, 3, 32, 32)  # the segment's frames, for a preview
    assert not out.exists()
    assert json.loads(checkpoint_paths(out)[1].read_text())["keyframes_done"] == 2
    enc.should_stop = None
    res = enc.encode(clip, out, resume=True)
    assert [r.keyframe for r in res.keyframes] == [0, 1, 2, 3]
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.slow  # 13 s on 2 cores: full tier
def test_published_script_flags(tmp_path):
    src = save_clip(tmp_path / "sky", synthetic_clip(10, 32, 32))
    common = ["--model", "tiny", "--device", "cpu", "-q"]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "inversion.py"), "-frame_path", str(src),
                        "-max_id", "9", "-rank", "2", "-interval", "4", "--size", "32", "--iters-first", "3",
                        "--iters", "2", "--perceptual", "off", "--init-latent", "taesd", *common],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    res_dir = src / "results" / "rank2_interval4"
    bs = promptus.read(res_dir / "prompts.promptus")
    assert bs.header.frame_count == 9 and [k.index for k in bs.keyframes] == [0, 4, 8]  # keyframes below 9
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generation.py"), "-frame_path", str(src),
                        "-rank", "2", "-interval", "4", *common], capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "mean psnr" in r.stdout
    assert len(list((res_dir / "frames").glob("*.png"))) == 9
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "inversion.py"), "-frame_path", str(src),
                        "-max_id", "40", "-rank", "2", "-interval", "4", *common], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == 1 and "has 10 frames" in r.stderr


def test_unwritable_output_fails_before_training(tiny, clip, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    metrics = []
    enc = Encoder(codec(), FAST, tiny, device="cpu", callback=metrics.append, progress=False)
    with pytest.raises(PromptusError, match="cannot write"):
        enc.encode(clip, blocker / "out.promptus")  # a folder that cannot be made
    assert metrics == []


# ---- hostile inputs (issue 9 audit): memory of the clip digest

def test_frames_digest_does_not_copy_the_clip():
    frames = torch.zeros(100, 256, 256, 3, dtype=torch.uint8)  # 19 MiB
    tracemalloc.start()
    try:
        frames_digest(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
