"""import-legacy against crafted zip archives (issue 23, finding 1)."""

from __future__ import annotations

import struct

import pytest

from conftest import make_legacy_folder
from promptus.errors import PromptusError
from promptus.legacy import load_legacy


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
