"""Fuzzing the three parsers of untrusted files: the bitstream, the legacy loader, the checkpoint JSON.

Each property: whatever the bytes, the parser either returns a valid result or raises
a PromptusError (BitstreamError for the bitstream) — never another exception, never a
hang — and memory stays bounded (under 500 MB for these files, all under 1 MB).
Hypothesis drives the mutations with a fixed example budget, so the whole file runs
in seconds on a CPU; failures shrink to a minimal input.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tracemalloc
import zipfile
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptus.bitstream import from_bytes, iter_records, to_bytes
from promptus.config import CodecConfig
from promptus.encoder import KeyframeResult, read_checkpoint
from promptus.errors import BitstreamError, PromptusError
from promptus.legacy import load_legacy

from bounded import LIMIT_MB, bounded_memory
from conftest import make_legacy_folder
from hostile import bitstream, head, init_fp16, keyf, v1_file

def fuzz(examples: int):
    """Deterministic (derandomized) examples, as many as fit a few seconds of CI."""
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])

# ----------------------------------------------------------------- bitstream

SMALL = bitstream(CodecConfig(width=16, height=16, rank=2, interval=3, tokens=5, embed_dim=12), 8)
SEEDS = [to_bytes(SMALL), to_bytes(SMALL, entropy="none"),
         v1_file(head(width=16, height=16, tokens=5, embed_dim=12, frame_count=4), init_fp16(side=2),
                 [keyf(0, 0, bytes(34)), keyf(3, 1, zlib.compress(bytes(34))[2:-4])])]


def records(data: bytes) -> list[list]:
    """[type, payload] of each record of a well-formed file (after its 10-byte prefix)."""
    out, pos = [], 10
    while pos < len(data):
        rtype, n = struct.unpack_from("<4sI", data, pos)
        out.append([rtype, data[pos + 8:pos + 8 + n]])
        pos += 12 + n
    return out


def reframe(prefix: bytes, recs: list[list]) -> bytes:
    """A file of these records with correct CRCs, and in version 2 a correct END digest:
    the damage reaches the payload parsers instead of stopping at a checksum."""
    out = bytearray(prefix)
    for rtype, payload in recs:
        if rtype == b"END " and prefix[8:10] == b"\x02\x00" and len(payload) == 32:
            payload = hashlib.sha256(out).digest()
        out += struct.pack("<4sI", rtype, len(payload)) + payload + struct.pack("<I", zlib.crc32(rtype + payload))
    return bytes(out)


HEAD_FIELDS = [  # (offset in the HEAD payload, struct format) of the numeric header fields
    (0, "<H"), (2, "<H"), (4, "<d"), (12, "<H"), (14, "<H"), (16, "<I"),
]


@st.composite
def mutated_files(draw) -> bytes:
    data = draw(st.sampled_from(SEEDS))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "payload", "header-field", "splice"]))
    if kind == "flip":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(b)
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:]
    recs = records(data)
    if kind == "splice":  # records repeated, dropped or swapped, framing kept valid
        order = draw(st.lists(st.integers(0, len(recs) - 1), min_size=1, max_size=len(recs) + 2))
        return reframe(data[:10], [recs[i] for i in order])
    if kind == "header-field":  # a header number set to anything, e.g. huge sizes, with the CRC fixed
        offset, fmt = draw(st.sampled_from(HEAD_FIELDS))
        payload = bytearray(recs[0][1])
        if fmt == "<d":
            value = draw(st.floats(allow_nan=True, allow_infinity=True))
        else:
            value = draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1))
        struct.pack_into(fmt, payload, offset, value)
        recs[0][1] = bytes(payload)
        return reframe(data[:10], recs)
    i = draw(st.integers(0, len(recs) - 1))  # "payload": one payload rewritten, CRC fixed
    payload = bytearray(recs[i][1]) or bytearray(b"\x00")
    for _ in range(draw(st.integers(1, 4))):
        j = draw(st.integers(0, len(payload) - 1))
        payload[j] = draw(st.integers(0, 255))
    recs[i][1] = bytes(payload)
    return reframe(data[:10], recs)


@fuzz(300)
@given(mutated_files())
def test_fuzz_bitstream_raises_only_bitstream_errors_in_bounded_memory(data):
    tracemalloc.start()
    try:
        try:
            bs = from_bytes(data)
        except BitstreamError:
            bs = None
        try:
            streamed = list(iter_records(io.BytesIO(data), chunk_size=7))
        except BitstreamError:
            streamed = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (bs is None) == (streamed is None)  # the whole-file and the streaming parser agree
    if bs is not None:
        assert bs.complete
        assert from_bytes(to_bytes(bs)) == bs  # what was read can be written and read again
    assert peak < 64 << 20, peak  # a few KB of input never costs more than this


# -------------------------------------------------------------------- legacy


@pytest.fixture(scope="module")
def legacy_seed(tmp_path_factory):
    """(prompt file bytes, init.pth bytes) of a one-keyframe release folder."""
    folder = tmp_path_factory.mktemp("legacy")
    make_legacy_folder(folder, keyframes=1, rank=2, latent=2, tokens=5, dim=12)
    return (folder / "frame_00000.prompt").read_bytes(), (folder / "init.pth").read_bytes()


def rezip(data: bytes, mutate) -> bytes:
    """``data`` (a torch.save zip) with its pickle rewritten by ``mutate``, entries stored as torch does."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, blob in entries:
            z.writestr(name, mutate(blob) if name.endswith("data.pkl") else blob)
    return out.getvalue()


@fuzz(200)
@given(st.data())
def test_fuzz_legacy_loader_raises_only_promptus_errors_in_bounded_memory(legacy_seed, tmp_path_factory, data):
    prompt, init = legacy_seed
    target = data.draw(st.sampled_from(["prompt", "init"]))
    blob = prompt if target == "prompt" else init
    kind = data.draw(st.sampled_from(["flip", "truncate", "pickle", "pickle-truncate"]))
    if kind == "flip":
        b = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 6))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(b)
    elif kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "pickle":  # the unpickler itself sees damage (the audit's IndexError, struct.error, ...)
        edits = data.draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                   min_size=1, max_size=6))

        def damage(p):
            p = bytearray(p)
            for where, v in edits:
                p[int(where * len(p))] = v
            return bytes(p)

        blob = rezip(blob, damage)
    else:  # the pickle cut short anywhere
        where = data.draw(st.floats(0, 1, exclude_max=True))
        blob = rezip(blob, lambda p: p[:int(where * len(p))])
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "frame_00000.prompt").write_bytes(blob if target == "prompt" else prompt)
    (folder / "init.pth").write_bytes(blob if target == "init" else init)
    with bounded_memory() as m:
        try:
            bs = load_legacy(folder, interval=3)
        except PromptusError:
            bs = None
    if bs is not None:  # accepted: then it must write a file that reads back
        assert from_bytes(to_bytes(bs)) == bs
    assert m.peak_mb < LIMIT_MB, m.peak_mb


# --------------------------------------------------------- checkpoint JSON

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory):
    """A consistent checkpoint (bitstream + JSON) of 2 keyframes, its run's meta and header."""
    from promptus.bitstream import Header, ModelIdentity

    cfg = CodecConfig(width=16, height=16, rank=2, interval=3, tokens=5, embed_dim=12)
    model = ModelIdentity("m", bytes(16))
    bs = bitstream(cfg, 4, model=model)
    data = to_bytes(bs, entropy="none")
    meta = {"version": 2, "codec": cfg.to_dict(), "train": {}, "frame_count": 7, "frames": "0" * 32,
            "model": model.hexdigest, "precision": "torch.float32", "device": "cpu"}
    result = {f: 0 for f in KeyframeResult.__dataclass_fields__} | {"frames": [0, 0], "psnr": 30.0}
    state = dict(meta, keyframes_done=2, bitstream_sha256=hashlib.sha256(data).hexdigest(),
                 results=[dict(result, keyframe=0), dict(result, keyframe=1, frames=[1, 3])])
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "c.promptus").write_bytes(data)
    return folder, data, state, meta, Header(cfg, 7, model)


def set_path(state, path, value):
    """``state`` with the value at ``path`` (a list of keys/indices into nested containers) replaced."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(state, dict) and key in state:
        return {**state, key: set_path(state[key], rest, value)}
    if isinstance(state, list) and isinstance(key, int) and key < len(state):
        return state[:key] + [set_path(state[key], rest, value)] + state[key + 1:]
    return state


PATHS = [[], ["keyframes_done"], ["bitstream_sha256"], ["results"], ["results", 0], ["results", 1, "frames"],
         ["results", 0, "psnr"], ["results", 1, "keyframe"], ["codec"], ["codec", "rank"], ["version"]]


@fuzz(150)
@given(st.sampled_from(PATHS), JSON_VALUES, st.booleans())
def test_fuzz_checkpoint_json_raises_only_promptus_errors(valid_checkpoint, path, value, as_text):
    folder, data, state, meta, header = valid_checkpoint
    js = folder / "c.json"
    if as_text:  # arbitrary text where JSON belongs
        js.write_text(json.dumps(value)[: len(json.dumps(value)) // 2 + 1])
    else:
        js.write_text(json.dumps(set_path(state, path, value)))
    try:
        init, keyframes, results = read_checkpoint(folder / "c.promptus", js, meta, header, "fp16")
    except PromptusError:
        return
    assert len(keyframes) == len(results) == 2 and [r.keyframe for r in results] == [0, 1]


def test_the_valid_checkpoint_is_accepted(valid_checkpoint):
    folder, data, state, meta, header = valid_checkpoint
    (folder / "ok.json").write_text(json.dumps(state))
    _, keyframes, results = read_checkpoint(folder / "c.promptus", folder / "ok.json", meta, header, "fp16")
    assert len(keyframes) == 2
