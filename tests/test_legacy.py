"""Import of the public release's prompt folders: validation and bit-exactness."""

import io
import os
import pickle
import struct
import threading
import zipfile

import pytest
import torch

import promptus
from promptus.errors import PromptusError
from promptus.legacy import load_legacy, write_legacy

from bounded import LIMIT_MB, bounded_memory
from conftest import make_legacy_folder, release_dequantize
from hostile import replace_prompt


def test_import_infers_settings_and_is_bit_exact(legacy_folder, tmp_path):
    folder, originals, init = legacy_folder
    bs = load_legacy(folder, fps=25)
    h = bs.header
    assert (h.rank, h.interval, h.frame_count, h.width, h.height, h.fps) == (2, 4, 9, 64, 64, 25)
    assert [kf.index for kf in bs.keyframes] == [0, 4, 8]
    for kf in bs.keyframes:
        d = originals[kf.index]
        for name in ("U", "V"):
            ref = release_dequantize(d, name)
            got = getattr(kf, name)
            assert got.dtype == torch.float32
            assert torch.equal(got, ref), f"keyframe {kf.index} {name} is not bit-exact"
    assert torch.equal(bs.init.to_torch(), init)

    # Through the file and back, still bit-exact.
    path = tmp_path / "x.promptus"
    promptus.write(path, bs)
    back = promptus.read(path)
    for kf, kf2 in zip(bs.keyframes, back.keyframes):
        assert torch.equal(kf.U, kf2.U) and torch.equal(kf.V, kf2.V)
    assert torch.equal(back.init.to_torch(), init)


@pytest.mark.parametrize("precision,tol", [("fp16", 2e-3), ("int8", 0.05)])
def test_lossy_init_precisions(legacy_folder, precision, tol):
    folder, _, init = legacy_folder
    bs = load_legacy(folder, init_precision=precision)
    assert bs.init.precision == precision
    err = (bs.init.to_torch() - init).abs().max().item()
    assert 0 < err <= tol * init.abs().max().item()


def test_write_legacy_round_trip(legacy_folder, tmp_path):
    folder, originals, _ = legacy_folder
    bs = load_legacy(folder)
    out = tmp_path / "exported"
    write_legacy(bs, out)
    again = load_legacy(out)
    for a, b in zip(bs.keyframes, again.keyframes):
        assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    d = torch.load(out / "frame_00004.prompt", weights_only=True)
    assert torch.equal(d["U"], originals[4]["U"])


def test_errors_are_clear(tmp_path):
    with pytest.raises(PromptusError, match="not a folder"):
        load_legacy(tmp_path / "missing")
    with pytest.raises(PromptusError, match="no frame_XXXXX.prompt"):
        load_legacy(tmp_path)

    f = tmp_path / "a"
    make_legacy_folder(f)
    (f / "init.pth").unlink()
    with pytest.raises(PromptusError, match="init.pth"):
        load_legacy(f)

    f = tmp_path / "uneven"
    make_legacy_folder(f, keyframes=4)
    (f / "frame_00008.prompt").unlink()
    with pytest.raises(PromptusError, match="evenly spaced"):
        load_legacy(f)

    f = tmp_path / "start"
    make_legacy_folder(f)
    (f / "frame_00000.prompt").unlink()
    with pytest.raises(PromptusError, match="frame_00000"):
        load_legacy(f)


def test_inconsistent_shapes_and_values(tmp_path):
    f = tmp_path / "rank"
    make_legacy_folder(f)
    d = torch.load(f / "frame_00004.prompt", weights_only=True)
    d["U"] = torch.zeros(77, 3, dtype=torch.uint8)
    torch.save(d, f / "frame_00004.prompt")
    with pytest.raises(PromptusError, match="frame_00004.prompt: U has shape"):
        load_legacy(f)

    f = tmp_path / "dtype"
    make_legacy_folder(f)
    d = torch.load(f / "frame_00000.prompt", weights_only=True)
    d["V"] = d["V"].float()
    torch.save(d, f / "frame_00000.prompt")
    with pytest.raises(PromptusError, match="uint8"):
        load_legacy(f)

    f = tmp_path / "zp"
    make_legacy_folder(f)
    d = torch.load(f / "frame_00000.prompt", weights_only=True)
    d["U_zero_point"] = torch.tensor(12.5)
    torch.save(d, f / "frame_00000.prompt")
    with pytest.raises(PromptusError, match="zero_point"):
        load_legacy(f)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    f = tmp_path / "evil"
    make_legacy_folder(f)
    with open(f / "frame_00004.prompt", "wb") as fh:
        pickle.dump({"U": Evil()}, fh)
    with pytest.raises(PromptusError, match="weights_only"):
        load_legacy(f)
    assert "must never run" not in capsys.readouterr().out


def test_single_keyframe_needs_or_assumes_an_interval(tmp_path):
    f = tmp_path / "one"
    make_legacy_folder(f, keyframes=1)
    assert load_legacy(f, interval=5).header.interval == 5
    assert load_legacy(f).header.frame_count == 1


# ---- hostile legacy archives (zip version needed, import-legacy's one-line errors)

def _set_version_needed(data: bytes, version: int) -> bytes:
    """Every local and central header of a zip claims ``version`` as "version needed to extract"."""
    out = bytearray(data)
    for sig, offset in ((b"PK\x03\x04", 4), (b"PK\x01\x02", 6)):
        i = out.find(sig)
        while i >= 0:
            struct.pack_into("<H", out, i + offset, version)
            i = out.find(sig, i + 4)
    return bytes(out)


def test_an_archive_needing_zip_version_11_3_is_a_clean_error(tmp_path):
    folder = tmp_path / "f"
    make_legacy_folder(folder, keyframes=1)
    path = folder / "frame_00000.prompt"
    path.write_bytes(_set_version_needed(path.read_bytes(), 113))
    with pytest.raises(PromptusError, match="zip"):
        load_legacy(folder)


def test_import_legacy_command_prints_no_traceback(tmp_path, capsys):
    from promptus.commands.main import main

    folder = tmp_path / "f"
    make_legacy_folder(folder, keyframes=2)
    path = folder / "frame_00000.prompt"
    path.write_bytes(_set_version_needed(path.read_bytes(), 113))
    code = main(["import-legacy", str(folder), "-o", str(tmp_path / "out.promptus")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "zip" in err


# ---- hostile inputs (issue 9 audit): prompt files that are fifos, bombs, pickles or bad tensors

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
