"""Frame input and output: folders of images, video files, crop and resize, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from promptus.encoder import frames_digest
from promptus.errors import VideoError
from promptus.video import (
    FrameWriter, center_crop_resize, iter_frames, list_images, read_frames, video_fps, write_frames,
)

from bounded import LIMIT_MB, bounded_memory
from synthetic import synthetic_clip


def save_folder(path, frames, ext="png"):
    path.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(np.asarray(f)).save(path / f"{i:05d}.{ext}")
    return path


def test_center_crop_takes_the_middle_of_the_longer_side():
    img = np.zeros((4, 8, 3), np.uint8)
    img[:, 2:6] = 200  # the central 4×4 square
    out = center_crop_resize(img, 4, 4)
    assert out.shape == (4, 4, 3) and (out == 200).all()
    tall = np.zeros((10, 4, 3), np.uint8)
    tall[3:7] = 99
    assert (center_crop_resize(tall, 4, 4) == 99).all()


def test_resize_to_codec_size():
    img = np.random.RandomState(0).randint(0, 256, (30, 50, 3), dtype=np.uint8)
    assert center_crop_resize(img, 16, 16).shape == (16, 16, 3)


def test_folder_round_trip_in_natural_order(tmp_path):
    clip = synthetic_clip(12, 32, 32)
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, f in enumerate(clip):  # names without zero padding: natural order must still hold
        Image.fromarray(f.numpy()).save(folder / f"frame{i}.png")
    frames = read_frames(folder, 32, 32)
    assert torch.equal(frames, clip)
    assert read_frames(folder, 32, 32, max_frames=5).shape[0] == 5


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(VideoError, match="no images"):
        read_frames(tmp_path)


def test_missing_input(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        read_frames(tmp_path / "nope")
    with pytest.raises(VideoError, match="not a folder"):
        list_images(tmp_path / "nope")


def test_unreadable_file_is_named(tmp_path):
    folder = save_folder(tmp_path / "c", synthetic_clip(2, 16, 16))
    (folder / "00002.png").write_bytes(b"not a png at all")
    with pytest.raises(VideoError, match="00002.png"):
        read_frames(folder, 16, 16)


def test_mixed_sizes_are_rejected(tmp_path):
    folder = save_folder(tmp_path / "c", synthetic_clip(2, 16, 16))
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(folder / "00002.png")
    with pytest.raises(VideoError, match="one size"):
        read_frames(folder, 16, 16)


@pytest.mark.parametrize("mode,word", [("L", "grayscale"), ("RGBA", "alpha")])
def test_grayscale_and_rgba_are_rejected(tmp_path, mode, word):
    tmp_path.joinpath("c").mkdir()
    Image.new(mode, (8, 8)).save(tmp_path / "c" / "00000.png")
    with pytest.raises(VideoError, match=word):
        read_frames(tmp_path / "c", 8, 8)


def test_mp4_write_and_read(tmp_path):
    clip = synthetic_clip(9, 64, 48)
    out = tmp_path / "clip.mp4"
    assert write_frames(clip.numpy(), out, fps=24) == 9
    assert video_fps(out) == pytest.approx(24)
    back = read_frames(out, 48, 48)
    assert back.shape == (9, 48, 48, 3)
    # Lossy but close: the video was centre-cropped 64→48 wide, compare the same crop.
    ref = torch.from_numpy(np.stack([center_crop_resize(f.numpy(), 48, 48) for f in clip]))
    psnr = 10 * np.log10(255**2 / ((back.float() - ref.float()) ** 2).mean().item())
    assert psnr > 25  # yuv420p chroma subsampling of sharp colour edges limits this
    assert not list(tmp_path.glob(".clip*"))  # no temp file left behind


def test_corrupt_video_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(VideoError):
        list(iter_frames(bad, 16, 16))


def test_writer_aborts_cleanly_on_error(tmp_path):
    out = tmp_path / "frames"
    with pytest.raises(RuntimeError):
        with FrameWriter(out, 30) as w:
            w.write(np.zeros((8, 8, 3), np.uint8))
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_writer_replaces_only_its_own_frames_in_an_existing_folder(tmp_path):
    out = tmp_path / "frames"
    write_frames(np.zeros((3, 8, 8, 3), np.uint8), out, 30)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(VideoError, match="--force"):
        write_frames(np.full((2, 8, 8, 3), 7, np.uint8), out, 30)
    write_frames(np.full((2, 8, 8, 3), 7, np.uint8), out, 30, force=True)
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png", "notes.txt"]
    assert (np.asarray(Image.open(files[0])) == 7).all() and (np.asarray(Image.open(files[2])) == 0).all()
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]


# ---- hostile inputs (issue 9 audit): image bombs, unstorable fps, odd frame sizes, memory of a read

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


# ---- a newcomer's first hour on a CPU (issue 25): PNG numbering

def test_frame_writer_numbers_pngs_from_the_first_frame(tmp_path):
    with FrameWriter(tmp_path / "out", 24, first=20) as w:
        w.write_batch(np.zeros((3, 8, 8, 3), np.uint8))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00020.png", "00021.png", "00022.png"]
