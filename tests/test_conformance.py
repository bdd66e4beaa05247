"""The committed conformance vectors (tests/data/conformance-v{1,2}.promptus) against their
expected digests in tests/data/conformance.json: the bytes, the parsed and dequantized
content, the writer that made them, and the frames the tiny model decodes from them
(one CPU thread; see tests/conformance.py and docs/format.md)."""

from __future__ import annotations

import hashlib
import io
import json
import zlib

import pytest
import torch

from promptus.bitstream import (
    ModelIdentity, StreamParser, from_bytes, iter_records, layout, parse_record, split_records,
)

from conformance import DATA, DECODE, EXPECTED, VECTORS, content_digest, decode_digest, vector_bytes

EXPECT = json.loads(EXPECTED.read_text())
NAMES = sorted(VECTORS)


def vector(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_every_vector_has_its_expectations():
    assert sorted(EXPECT["vectors"]) == NAMES
    assert EXPECT["decode"] == DECODE
    assert {EXPECT["vectors"][n]["version"] for n in NAMES} == {1, 2}  # both format versions are covered
    coders = {c for n in NAMES for c in EXPECT["vectors"][n]["coders"]}
    assert coders == {"raw", "zlib", "lzma", "bz2"}  # and every entropy coder


@pytest.mark.parametrize("name", NAMES)
def test_vector_bytes_are_the_committed_ones(name):
    data = vector(name)
    want = EXPECT["vectors"][name]
    assert len(data) == want["bytes"] and hashlib.sha256(data).hexdigest() == want["sha256"]


@pytest.mark.parametrize("name", NAMES)
def test_vector_parses_to_the_expected_content(name):
    data, want = vector(name), EXPECT["vectors"][name]
    parser = StreamParser()
    parser.feed(data)
    bs = parser.close()
    assert parser.version == want["version"]
    h = bs.header
    assert {**h.config.to_dict(), "frame_count": h.frame_count, "model_name": h.model.name,
            "model_digest": h.model.hexdigest} == want["header"]
    assert bs.init.precision == want["init_precision"]
    assert [r.codec for r in layout(data) if r.codec is not None] == want["coders"]
    assert content_digest(bs) == want["content_sha256"]
    # The same content through the incremental reader (byte by byte) and as a stream's pieces.
    items = list(iter_records(io.BytesIO(data), chunk_size=1))
    assert content_digest(type(bs)(items[0], items[1], items[2:])) == want["content_sha256"]
    pieces, error = split_records(data)
    assert error is None
    header = parse_record(pieces[0])
    parsed = [parse_record(p, header) for p in pieces[1:]]
    assert parsed[-1] is None  # the end record
    assert content_digest(type(bs)(header, parsed[0], parsed[1:-1])) == want["content_sha256"]


@pytest.mark.parametrize("name", NAMES)
def test_writer_reproduces_the_vector(name):
    """The writer of this tree makes the committed bytes from the generator's inputs."""
    want = EXPECT["vectors"][name]
    if set(want["coders"]) - {"raw"} and zlib.ZLIB_RUNTIME_VERSION != EXPECT["zlib_runtime"]:
        pytest.skip(f"the vector was compressed with zlib {EXPECT['zlib_runtime']}, this Python runs zlib "
                    f"{zlib.ZLIB_RUNTIME_VERSION}: its DEFLATE output may differ byte for byte")
    model = ModelIdentity(want["header"]["model_name"], bytes.fromhex(want["header"]["model_digest"]))
    assert vector_bytes(VECTORS[name], model) == vector(name)


@pytest.mark.parametrize("name", NAMES)
def test_vector_decodes_to_the_expected_frames(name, tiny):
    """Decode digest with the tiny model on the CPU, one torch thread (frames can differ by ±1
    with the thread count); the caller's thread count is restored."""
    data, want = vector(name), EXPECT["vectors"][name]
    assert tiny.identity() == from_bytes(data).header.model, "the tiny model changed: regenerate the vectors"
    threads = torch.get_num_threads()
    digest, shape = decode_digest(data, tiny)
    assert torch.get_num_threads() == threads
    assert shape == want["frames_shape"]
    assert digest == want["frames_sha256"]
