"""Resume checkpoints: a malformed or foreign checkpoint is a clean error (issue 9 audit); an intact one resumes."""

from __future__ import annotations

import hashlib
import json

import pytest

import promptus
from promptus.bitstream import to_bytes
from promptus.config import CodecConfig, TrainConfig
from promptus.encoder import Encoder, checkpoint_paths
from promptus.errors import PromptusError

from hostile import bitstream
from synthetic import synthetic_clip


FAST = TrainConfig(iters_first=2, iters=1, patience_first=1, patience=1, perceptual=False, init_latent="taesd")


CODEC = CodecConfig(width=32, height=32, rank=2, interval=3, fps=24.0)


CLIP = synthetic_clip(7, 32, 32)  # keyframes 0, 3, 6


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """(bitstream bytes, JSON text) of an encode stopped after two of its three keyframes (made once)."""
    out = tmp_path_factory.mktemp("ckpt") / "o.promptus"

    def stop(m):
        if m["keyframe"] == 2:
            raise Stop

    with pytest.raises(Stop):
        Encoder(CODEC, FAST, tiny, device="cpu", progress=False, callback=stop).encode(CLIP, out)
    bs_path, js_path = checkpoint_paths(out)
    return bs_path.read_bytes(), js_path.read_text()


def resumable(tiny, tmp_path, checkpoint, *, bitstream_bytes=None, json_text=None):
    """An encoder and an output path whose checkpoint files are ``checkpoint``'s, with changes."""
    out = tmp_path / "o.promptus"
    bs_path, js_path = checkpoint_paths(out)
    bs_path.write_bytes(checkpoint[0] if bitstream_bytes is None else bitstream_bytes)
    js_path.write_text(checkpoint[1] if json_text is None else json_text)
    return Encoder(CODEC, FAST, tiny, device="cpu", progress=False), out


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "\"a string\"", "null", "[" * 100_000],
                         ids=["list", "broken", "string", "null", "deep"])
def test_malformed_checkpoint_json_is_a_clean_error(tiny, tmp_path, checkpoint, text):
    enc, out = resumable(tiny, tmp_path, checkpoint, json_text=text)
    with pytest.raises(PromptusError, match="cannot resume"):
        enc.encode(CLIP, out, resume=True)


@pytest.mark.parametrize("change", [
    {"results": [{"keyframe": 0}]},
    {"results": "x"},
    {"keyframes_done": "2"},
    {"keyframes_done": 99},
    {"results": [{"keyframe": 0, "index": 0, "frames": [0, 0], "iterations": 1, "best_iteration": 0,
                  "best_loss": 1.0, "final_lr": 0.1, "psnr": 1.0, "seconds": 1.0}, {"nested": {"a": [1]}}]},
], ids=["fields", "type", "count-type", "count", "entry"])
def test_checkpoint_json_with_wrong_types_is_a_clean_error(tiny, tmp_path, checkpoint, change):
    enc, out = resumable(tiny, tmp_path, checkpoint, json_text=json.dumps(json.loads(checkpoint[1]) | change))
    with pytest.raises(PromptusError, match="cannot resume"):
        enc.encode(CLIP, out, resume=True)


@pytest.mark.parametrize("other, digest_too", [
    ({"rank": 4}, False), ({"rank": 4}, True),  # a RuntimeError (shapes) before the fix
    ({"interval": 2}, False), ({"interval": 2}, True),  # a bare AssertionError before the fix
    ({}, False),  # same settings, another run's keyframes: silently accepted before the fix
], ids=["rank", "rank-digest-updated", "interval", "interval-digest-updated", "same-settings"])
def test_checkpoint_bitstream_of_another_run_is_refused(tiny, tmp_path, checkpoint, other, digest_too):
    """Another run's checkpoint bitstream (two keyframes, fp16 init latent) put in place of ours;
    with ``digest_too`` the JSON's digest is updated as well, so the header check must catch it."""
    cfg = CODEC.replace(**other)
    theirs = to_bytes(bitstream(cfg, cfg.interval + 1, seed=5, model=tiny.identity()), entropy="none")
    state = json.loads(checkpoint[1])
    if digest_too:
        state["bitstream_sha256"] = hashlib.sha256(theirs).hexdigest()
    enc, out = resumable(tiny, tmp_path, checkpoint, bitstream_bytes=theirs, json_text=json.dumps(state))
    with pytest.raises(PromptusError, match="cannot resume"):
        enc.encode(CLIP, out, resume=True)
    assert not out.exists()


def test_resume_of_an_intact_checkpoint_still_works(tiny, tmp_path, checkpoint):
    enc, out = resumable(tiny, tmp_path, checkpoint)
    res = enc.encode(CLIP, out, resume=True)
    assert [r.keyframe for r in res.keyframes] == [0, 1, 2]
    assert promptus.read(out).complete
