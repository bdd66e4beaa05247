"""Hostile inputs (issue 9): each test replays one attack of the audit and asserts a clean
PromptusError, bounded memory and no lost data.

Files are built here from the documented byte layout, so the attacks do not depend on
the writer (which refuses to make most of them).
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import struct
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import promptus
from promptus.backends import make_backend
from promptus.commands.main import main
from promptus.bitstream import (
    MAGIC, Bitstream, ModelIdentity, describe, from_bytes, to_bytes,
)
from promptus.config import CodecConfig, TrainConfig
from promptus.decoder import Decoder
from promptus.encoder import Encoder, checkpoint_paths, frames_digest
from promptus.errors import BitstreamError, PromptusError, VideoError
from promptus.legacy import load_legacy
from promptus.video import FrameWriter, read_frames
from synthetic import synthetic_clip

from bounded import LIMIT_MB, bounded_memory
from hostile import bitstream, head, init_fp16, keyf, record, v1_file
from conftest import make_legacy_folder

def eager(tiny, bs: Bitstream, **kw) -> Decoder:
    """The reference decoder (the eager backend has no fixed batch: it never pads)."""
    backend = make_backend("eager", tiny, "cpu", batch=bs.header.interval, size=bs.header.width)
    return Decoder(backend, tiny.identity(), **kw)


# ------------------------------------------------ bitstream: memory and time


def test_huge_factor_header_is_refused_before_inflating(tiny):
    """Finding 2: rank 256 with 32768×32768 factors, each 72-byte bz2 record inflating to 16 MiB."""
    block = bz2.compress(bytes(256 * 65536), 9)
    data = v1_file(head(rank=256, tokens=32768, embed_dim=32768, interval=1, frame_count=60), init_fp16(),
                   [keyf(i, 3, block) for i in range(60)])
    assert len(data) < 10_000
    with bounded_memory() as m:
        with pytest.raises(BitstreamError, match="tokens"):
            describe(data)
    assert m.peak_mb < LIMIT_MB, m.peak_mb


def test_decompression_bomb_is_refused_in_words_not_called_corruption():
    """Finding 2: a small file whose keyframes (each within the per-record cap) inflate without end."""
    block = bz2.compress(bytes(512 * 2048), 9)  # rank 512 × (1024 + 1024): 1 MiB of codes per keyframe
    data = v1_file(head(rank=512, tokens=1024, embed_dim=1024, interval=1, frame_count=600), init_fp16(),
                   [keyf(i, 3, block) for i in range(600)])
    assert len(data) < 60_000
    with bounded_memory() as m:
        with pytest.raises(BitstreamError, match="decompression bomb") as e:
            from_bytes(data)
    assert "corrupted" not in str(e.value)
    assert m.peak_mb < 100, m.peak_mb


@pytest.mark.parametrize("fields", [
    {"interval": 65535, "frame_count": 3},  # all interpolations built, batch padded to 65535 (4.7 GB)
    {"rank": 1, "tokens": 32768, "embed_dim": 32768},  # a 798-byte file asking for a 4 GB embedding
])
def test_header_fields_beyond_the_limits_never_reach_the_decoder(tiny, fields):
    cfg = dict(rank=2, interval=3, tokens=77, embed_dim=1024, frame_count=7) | fields
    n = cfg["rank"] * (cfg["tokens"] + cfg["embed_dim"])
    count = -(-(cfg["frame_count"] - 1) // cfg["interval"]) + 1
    data = v1_file(head(**cfg), init_fp16(), [keyf(i * cfg["interval"], 3, bz2.compress(bytes(n))) for i in range(count)])
    assert len(data) < 2000
    with bounded_memory() as m:
        with pytest.raises(PromptusError):
            bs = from_bytes(data)
            eager(tiny, bs).decode_all(bs)
    assert m.peak_mb < LIMIT_MB, m.peak_mb


def test_long_interval_short_clip_interpolates_only_its_frames(tiny):
    """Finding 2: interval 256 with 3 frames: only the 2 frames of the segment are interpolated."""
    bs = bitstream(CodecConfig(width=64, height=64, rank=256, interval=256), 3)
    with bounded_memory() as m:
        frames = eager(tiny, bs).decode_all(bs)
    assert frames.shape == (3, 64, 64, 3)
    assert m.peak_mb < 100, m.peak_mb  # the whole interval at rank 256 would be ≈ 370 MB


def test_segments_longer_than_the_batch_give_the_same_frames(tiny):
    bs = bitstream(CodecConfig(width=64, height=64, rank=2, interval=5), 11)
    whole = eager(tiny, bs).decode_all(bs)
    split = eager(tiny, bs, max_batch=2).decode_all(bs)
    # Same z, same prompts: only the float rounding of batch-size-dependent kernels differs.
    diff = (whole.int() - split.int()).abs()
    assert whole.shape == split.shape and diff.max() <= 1 and diff.float().mean() < 1e-3


@pytest.mark.parametrize("fields, word", [
    ({"embed_dim": 1023}, "width 1023"),
    ({"latent_channels": 3}, "3 latent channels"),
    ({"latent_factor": 4}, "4× smaller"),  # 64 px frames from a 16×16 latent: the model would make 128 px
    ({"tokens": 78}, "78 prompt tokens"),
])
def test_header_that_does_not_fit_the_model_is_refused(tiny, fields, word):
    """Findings 3 and 4: torch RuntimeErrors, or frames of another size, before the fix."""
    bs = bitstream(CodecConfig(width=64, height=64, rank=2, interval=3, **fields), 4)
    with pytest.raises(PromptusError, match=word):
        eager(tiny, bs).decode_all(bs)


def test_info_escapes_control_characters_in_the_model_name():
    name = "evil\x1b]0;pwned\x07\x1b[2J\u202e"
    text = describe(to_bytes(bitstream(CodecConfig(width=16, height=16, rank=1, interval=2, tokens=3, embed_dim=4), 3,
                                       model=ModelIdentity(name, bytes(16)))))
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in text


# ------------------------------------------------------- bitstream: integrity


def test_keyframe_spliced_from_another_file_is_caught_by_the_file_digest():
    cfg = CodecConfig(width=16, height=16, rank=1, interval=2, tokens=3, embed_dim=4)
    a, b = to_bytes(bitstream(cfg, 5, seed=1)), to_bytes(bitstream(cfg, 5, seed=2))

    def records(data):
        out, pos = [], 10
        while pos < len(data):
            n = struct.unpack_from("<I", data, pos + 4)[0]
            out.append(data[pos:pos + 12 + n])
            pos += 12 + n
        return out

    ra, rb = records(a), records(b)
    spliced = a[:10] + b"".join(ra[:3] + [rb[3]] + ra[4:])  # keyframe 1 of b, its own CRC intact
    with pytest.raises(BitstreamError, match="digest"):
        from_bytes(spliced)


def test_version_1_files_still_read():
    bs = bitstream(CodecConfig(width=16, height=16, rank=1, interval=2, tokens=3, embed_dim=4), 5)
    v2 = to_bytes(bs)
    assert v2[8:10] == b"\x02\x00"
    end = len(v2) - 12 - 32
    v1 = MAGIC + b"\x01\x00" + v2[10:end] + record(b"END ", b"")
    assert from_bytes(v1) == bs
    assert "format version 1" in describe(v1)


# ------------------------------------------------------------------- legacy


def test_fifo_named_like_a_prompt_does_not_hang(tmp_path):
    folder = tmp_path / "f"
    make_legacy_folder(folder, keyframes=1)
    fifo = folder / "frame_00000.prompt"
    fifo.unlink()
    os.mkfifo(fifo)
    outcome = []

    def run():
        try:
            load_legacy(folder)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    hung = t.is_alive()
    if hung:  # release the blocked open() so that the thread ends
        fd = os.open(fifo, os.O_WRONLY)
        os.close(fd)
        t.join(10)
    assert not hung, "import-legacy blocked on a FIFO"
    assert isinstance(outcome[0], PromptusError) and "not a regular file" in str(outcome[0])


def replace_prompt(folder, index=0, **changes):
    path = folder / f"frame_{index:05d}.prompt"
    d = torch.load(path, weights_only=True)
    d.update(changes)
    torch.save(d, path)


@pytest.mark.parametrize("tensor", [
    lambda: torch.zeros(2, 1, dtype=torch.uint8).expand(2, 1 << 31),  # 5 bytes on disk, 4 GiB materialised
    lambda: torch.zeros(1, 1, dtype=torch.uint8).expand(2, 1024),  # within the shape limits, still a repeat
])
def test_expanded_tensors_are_refused_before_materialising(tmp_path, tensor):
    folder = tmp_path / "f"
    make_legacy_folder(folder, keyframes=1)
    replace_prompt(folder, 0, V=tensor())
    assert (folder / "frame_00000.prompt").stat().st_size < 10_000
    with bounded_memory() as m:
        with pytest.raises(PromptusError, match="frame_00000.prompt: V"):
            load_legacy(folder)
    assert m.peak_mb < LIMIT_MB, m.peak_mb


def test_any_file_named_as_a_prompt_gives_a_clean_error(tmp_path):
    folder = tmp_path / "f"
    make_legacy_folder(folder, keyframes=1)
    (folder / "frame_00000.prompt").write_bytes(b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/:/bin/sh\n")
    with pytest.raises(PromptusError, match="weights_only"):
        load_legacy(folder)


def test_compressed_archive_entries_are_refused(tmp_path):
    """torch.save stores entries; a deflated entry could inflate 1000× (a zip bomb)."""
    folder = tmp_path / "f"
    make_legacy_folder(folder, keyframes=1)
    path = folder / "frame_00000.prompt"
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
    path.write_bytes(buf.getvalue())
    with pytest.raises(PromptusError, match="compressed"):
        load_legacy(folder)


def test_nan_zero_point_is_a_clean_error(tmp_path):
    folder = tmp_path / "f"
    make_legacy_folder(folder, keyframes=1)
    replace_prompt(folder, U_zero_point=torch.tensor(float("nan")))
    with pytest.raises(PromptusError, match="zero point"):
        load_legacy(folder)


def test_three_channel_init_latent_is_refused_at_import(tmp_path):
    folder = tmp_path / "f"
    make_legacy_folder(folder, keyframes=1)
    torch.save(torch.zeros(1, 3, 8, 8), folder / "init.pth")
    with pytest.raises(PromptusError, match="1×4×h×w"):
        load_legacy(folder)


def test_import_never_writes_a_file_that_read_refuses(tmp_path):
    folder = tmp_path / "f"
    make_legacy_folder(folder, keyframes=1)
    replace_prompt(folder, U_scale=torch.tensor(3e38))
    try:
        bs = load_legacy(folder)
        promptus.write(tmp_path / "x.promptus", bs)
    except PromptusError as e:
        assert "scale" in str(e)
    else:
        promptus.read(tmp_path / "x.promptus")  # what was written must read back


# -------------------------------------------------------------------- video


def test_decompression_bomb_png_is_a_video_error(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.new("1", (20000, 20000)).save(folder / "00000.png")  # 400 megapixels in a few hundred KB
    assert (folder / "00000.png").stat().st_size < 1_000_000
    with bounded_memory() as m:
        with pytest.raises(VideoError, match="megapixels|pixels"):
            read_frames(folder, 64, 64)
    assert m.peak_mb < LIMIT_MB, m.peak_mb


@pytest.mark.parametrize("fps", [1e308, 1e-300, float("nan")])
def test_unstorable_fps_is_refused_not_overflowed_or_replaced(tmp_path, fps):
    with pytest.raises(VideoError, match="fps"):
        with FrameWriter(tmp_path / "v.mp4", fps) as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_frames_of_another_size(tmp_path):
    with pytest.raises(VideoError, match="32×32 but the clip is 16×16"):
        with FrameWriter(tmp_path / "f", 30, size=(16, 16)) as w:
            w.write(np.zeros((32, 32, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_read_frames_holds_the_clip_about_once(tmp_path):
    """Finding 4: the encoder held the clip ~3×; reading now peaks near one clip."""
    folder = tmp_path / "clip"
    folder.mkdir()
    frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for i in range(200):
        Image.fromarray(np.roll(frame, i, axis=1)).save(folder / f"{i:05d}.png", compress_level=0)
    clip_mb = 200 * 256 * 256 * 3 / 2**20
    with bounded_memory() as m:
        frames = read_frames(folder, 256, 256)
        digest = frames_digest(frames)
    assert frames.shape == (200, 256, 256, 3) and len(digest) == 32
    print(f"read_frames peak {m.peak_mb:.1f} MB for a {clip_mb:.1f} MB clip")
    assert m.peak_mb < 1.5 * clip_mb, (m.peak_mb, clip_mb)


def test_frames_digest_does_not_copy_the_clip():
    frames = torch.zeros(100, 256, 256, 3, dtype=torch.uint8)  # 19 MiB
    tracemalloc.start()
    try:
        frames_digest(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


# ------------------------------------------------------------------- resume

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


# ----------------------------------------------------------------- commands


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
