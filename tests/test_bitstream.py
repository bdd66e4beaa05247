"""The .promptus container: round trips, entropy coding, atomic writes, streaming, damage.

The record layout is re-implemented here from the documented format (struct +
zlib.crc32) so that the tests check the bytes on disk, not the module against itself.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import tracemalloc
import zlib

import bz2
import lzma
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from promptus.bitstream import (
    MAGIC, VERSION, Bitstream, Header, InitLatent, Keyframe, ModelIdentity, RecordInfo, StreamParser, describe,
    from_bytes, iter_records, layout, read, to_bytes, write,
)
from promptus.config import CodecConfig
from promptus.errors import BitstreamError, PromptusError
from promptus.prompts import QuantizedTensor, init_latent_bytes, quant_params, quantize_tensor

from bounded import LIMIT_MB, bounded_memory
from hostile import bitstream, head, init_fp16, keyf, record, v1_file
import repo_scripts

# ------------------------------------------------------------------ helpers

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def small_config(**kw) -> CodecConfig:
    """Full-width embeddings (77×1024), rank 2, interval 3."""
    return CodecConfig(width=64, height=64, rank=2, interval=3, **kw)


def tiny_config(**kw) -> CodecConfig:
    """A few dozen code bytes per keyframe: for tests that parse every prefix of a file."""
    return CodecConfig(width=16, height=16, rank=2, interval=3, tokens=5, embed_dim=12, **kw)


def make_keyframes(cfg: CodecConfig, count: int, kind: str = "randn", seed: int = 0) -> list[Keyframe]:
    gen = torch.Generator().manual_seed(seed)
    draw = {"randn": torch.randn, "rand": torch.rand}[kind]
    return [Keyframe(index=i * cfg.interval,
                     U_q=quantize_tensor(draw(cfg.tokens, cfg.rank, generator=gen)),
                     V_q=quantize_tensor(draw(cfg.rank, cfg.embed_dim, generator=gen)))
            for i in range(count)]


def make_latent(cfg: CodecConfig, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(cfg.latent_shape).astype(np.float32)


def make_bitstream(cfg: CodecConfig | None = None, frame_count: int = 7, precision: str = "fp16",
                   kind: str = "randn", model: ModelIdentity | None = None) -> Bitstream:
    cfg = cfg or small_config()
    header = Header(cfg, frame_count, model or ModelIdentity("tiny-test", bytes(range(16))))
    return Bitstream(header, InitLatent.from_array(make_latent(cfg), precision),
                     make_keyframes(cfg, header.keyframe_count, kind))


def frame(rtype: bytes, payload: bytes, crc: int | None = None) -> bytes:
    """One record, framed as documented: type, u32 length, payload, u32 CRC-32 of type+payload."""
    crc = zlib.crc32(rtype + payload) if crc is None else crc
    return struct.pack("<4sI", rtype, len(payload)) + payload + struct.pack("<I", crc)


def split(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, payload, offset) of each record of a well-formed file."""
    out, pos = [], 10
    while pos < len(data):
        rtype, n = struct.unpack_from("<4sI", data, pos)
        out.append((rtype, data[pos + 8:pos + 8 + n], pos))
        pos += 12 + n
    assert pos == len(data)
    return out


V1, V2 = MAGIC + b"\x01\x00", MAGIC + b"\x02\x00"


def join(records: list[tuple[bytes, bytes]], prefix: bytes = V2) -> bytes:
    """A file of ``records``. In version 2 an END payload of 0 or 32 bytes is replaced by
    the SHA-256 of every byte before the END record (any other length is left, to test it)."""
    out = bytearray(prefix)
    for t, p in records:
        if t == b"END " and prefix == V2 and len(p) in (0, 32):
            p = hashlib.sha256(out).digest()
        out += frame(t, p)
    return bytes(out)


def records_of(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(t, p) for t, p, _ in split(data)]


def pack_head(width=64, height=64, fps=30.0, rank=2, interval=3, seed=88,
              generator="numpy.random.RandomState.randn", mix=0.05, quant_bits=8, tokens=77, embed_dim=1024,
              timestep=999, channels=4, factor=8, frame_count=7, model="tiny-test", digest=bytes(range(16))) -> bytes:
    """A HEAD payload written from the documented layout."""
    g, m = generator.encode(), model.encode() if isinstance(model, str) else model
    return (struct.pack("<HHdHHI", width, height, fps, rank, interval, seed) + struct.pack("<H", len(g)) + g
            + struct.pack("<dBHHHBBI", mix, quant_bits, tokens, embed_dim, timestep, channels, factor, frame_count)
            + struct.pack("<H", len(m)) + m + digest)


def with_record(data: bytes, i: int, payload: bytes) -> bytes:
    """``data`` with record i's payload replaced (and its CRC recomputed)."""
    recs = records_of(data)
    recs[i] = (recs[i][0], payload)
    return join(recs)


def assert_prefix(partial: Bitstream | None, original: Bitstream) -> None:
    """A partial result holds the original header and init and a prefix of its keyframes."""
    if partial is None:
        return
    assert partial.header == original.header
    assert partial.init == original.init
    assert partial.keyframes == original.keyframes[:len(partial.keyframes)]


def deflate_raw(b: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(b) + c.flush()


# Built once: every test below reads these and never changes them.
SMALL = make_bitstream()
SMALL_BYTES = to_bytes(SMALL)
TINY = make_bitstream(tiny_config(), frame_count=8, precision="int8")
TINY_BYTES = to_bytes(TINY)


# --------------------------------------------------------------- the format


def test_file_starts_with_magic_and_version_then_records_in_order():
    assert MAGIC == b"\x89PRM\r\n\x1a\n" and VERSION == 2
    data = SMALL_BYTES
    assert data[:8] == MAGIC and data[8:10] == b"\x02\x00"
    recs = split(data)
    assert [t for t, _, _ in recs] == [b"HEAD", b"INIT", b"KEYF", b"KEYF", b"KEYF", b"END "]
    assert recs[-1][1] == hashlib.sha256(data[:recs[-1][2]]).digest()  # the whole-file digest
    for rtype, payload, offset in recs:
        crc, = struct.unpack_from("<I", data, offset + 8 + len(payload))
        assert crc == zlib.crc32(rtype + payload)


def test_header_payload_follows_the_documented_layout():
    assert records_of(SMALL_BYTES)[0][1] == pack_head()


def test_keyframe_payload_follows_the_documented_layout():
    data = to_bytes(SMALL, entropy="none")
    cfg = SMALL.header.config
    for i, (rtype, payload) in enumerate(records_of(data)[2:-1]):
        kf = SMALL.keyframes[i]
        index, codec, us, uz, vs, vz = struct.unpack_from("<IBfBfB", payload)
        assert (index, codec, uz, vz) == (3 * i, 0, kf.U_q.zero_point, kf.V_q.zero_point)
        assert (us, vs) == (np.float32(kf.U_q.scale), np.float32(kf.V_q.scale))
        codes = payload[15:]
        assert len(codes) == cfg.rank * (cfg.tokens + cfg.embed_dim)
        assert codes == kf.U_q.q.tobytes() + kf.V_q.q.tobytes()


def test_init_payload_is_a_precision_byte_then_the_latent():
    x = make_latent(small_config())
    for pid, precision, dtype in ((0, "fp32", "<f4"), (1, "fp16", "<f2")):
        bs = Bitstream(SMALL.header, InitLatent.from_array(x, precision), SMALL.keyframes)
        payload = records_of(to_bytes(bs))[1][1]
        assert payload[0] == pid and payload[1:] == x.astype(dtype).tobytes()


# ---------------------------------------------------------------- round trips


def test_round_trip_keeps_everything():
    cfg = CodecConfig(width=48, height=32, fps=29.97, rank=3, interval=4, seed=12345, mix=0.1, timestep=500,
                      tokens=9, embed_dim=20, latent_channels=3)
    bs = make_bitstream(cfg, frame_count=10, model=ModelIdentity("sd-turbo ✓", bytes(range(100, 116))))
    back = from_bytes(to_bytes(bs))
    assert back == bs
    assert back.header.config == cfg and back.header.frame_count == 10
    assert back.header.model == ModelIdentity("sd-turbo ✓", bytes(range(100, 116)))
    assert back.complete and len(back.keyframes) == 4
    for a, b in zip(back.keyframes, bs.keyframes):
        assert np.array_equal(a.U_q.q, b.U_q.q) and np.array_equal(a.V_q.q, b.V_q.q)
        assert (a.U_q.scale, a.U_q.zero_point, a.V_q.scale, a.V_q.zero_point) == \
               (b.U_q.scale, b.U_q.zero_point, b.V_q.scale, b.V_q.zero_point)
        assert torch.equal(a.U, b.U_q.to_torch()) and a.U.dtype == torch.float32
        assert a.U.shape == (9, 3) and a.V.shape == (3, 20)


@pytest.mark.parametrize("entropy", ["auto", "none", "zlib", "lzma", "bz2"])
def test_every_entropy_choice_round_trips(entropy):
    assert from_bytes(to_bytes(SMALL, entropy=entropy)) == SMALL


def test_header_properties_delegate_to_the_config():
    h = SMALL.header
    assert (h.width, h.height, h.fps, h.rank, h.interval, h.seed, h.mix) == (64, 64, 30.0, 2, 3, 88, 0.05)
    assert h.keyframe_count == 3  # frames 0..6 at interval 3: keyframes 0, 3, 6
    assert Header(small_config(), 8).keyframe_count == 4  # frame 7 needs keyframe 9
    assert Header(small_config(), 1).keyframe_count == 1


def test_keyframes_compare_codes_scales_and_zero_points():
    kf = SMALL.keyframes[0]
    assert kf == Keyframe(0, kf.U_q, QuantizedTensor(kf.V_q.q.copy(), kf.V_q.scale, kf.V_q.zero_point))
    assert kf != Keyframe(3, kf.U_q, kf.V_q)
    assert kf != Keyframe(0, kf.U_q, QuantizedTensor(kf.V_q.q, kf.V_q.scale * 2, kf.V_q.zero_point))
    assert kf != Keyframe(0, kf.U_q, QuantizedTensor(kf.V_q.q, kf.V_q.scale, (kf.V_q.zero_point + 1) % 256))
    other = kf.V_q.q.copy()
    other[1, 5] ^= 1
    assert kf != Keyframe(0, kf.U_q, QuantizedTensor(other, kf.V_q.scale, kf.V_q.zero_point))
    with pytest.raises(PromptusError, match="rank"):
        Keyframe(0, kf.U_q, quantize_tensor(torch.randn(3, 1024)))


def test_bytes_like_inputs_are_accepted():
    assert from_bytes(bytearray(TINY_BYTES)) == from_bytes(memoryview(TINY_BYTES)) == TINY


def test_model_identity():
    assert ModelIdentity.unknown() == ModelIdentity("unknown", bytes(16))
    assert Header(small_config(), 7).model == ModelIdentity.unknown()
    with pytest.raises(PromptusError, match="16 bytes"):
        ModelIdentity("x", b"short")


def test_fp32_init_latent_is_bit_exact():
    x = make_latent(small_config())
    x[0, 0, 0, :3] = [1e-40, -0.0, 3.4e38]  # subnormal, negative zero, near float32 max
    init = InitLatent.from_array(x, "fp32")
    back = from_bytes(to_bytes(Bitstream(SMALL.header, init, SMALL.keyframes))).init
    assert back.precision == "fp32" and back.latent.tobytes() == x.tobytes()
    assert back.to_torch().dtype == torch.float32 and torch.equal(back.to_torch(), torch.from_numpy(x))


def test_fp16_init_latent_is_within_half_precision():
    x = make_latent(small_config())
    init = from_bytes(to_bytes(Bitstream(SMALL.header, InitLatent.from_array(x, "fp16"), SMALL.keyframes))).init
    y = init.latent
    assert init.precision == "fp16" and y.dtype == np.float32 and y.shape == x.shape
    eps16 = np.finfo(np.float16).eps  # 2^-10: rounding error is at most half of it, relative
    assert np.all(np.abs(y - x) <= np.abs(x) * eps16 / 2 + 2.0**-25)
    assert not np.array_equal(y, x)  # it is lossy


def test_int8_init_latent_is_within_half_a_step_per_channel():
    x = make_latent(small_config()) * np.array([1, 5, 0.1, 30], np.float32).reshape(1, 4, 1, 1)
    x[0, 2] = 0  # an all-zero channel stays exact
    init = from_bytes(to_bytes(Bitstream(SMALL.header, InitLatent.from_array(x, "int8"), SMALL.keyframes))).init
    y = init.latent
    for c in range(4):
        scale, _ = quant_params(float(x[0, c].min()), float(x[0, c].max()))
        assert np.abs(y[0, c] - x[0, c]).max() <= scale / 2 * (1 + 1e-5)
    assert np.array_equal(y[0, 2], np.zeros_like(y[0, 2]))
    assert np.abs(y[0, 3] - x[0, 3]).max() > np.abs(y[0, 0] - x[0, 0]).max()  # steps are per channel


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_init_latent_size_matches_the_rate_estimate(precision):
    cfg = small_config()
    init = InitLatent.from_array(make_latent(cfg), precision)
    assert init.nbytes == init_latent_bytes(cfg, precision)
    assert init.shape == cfg.latent_shape


def test_init_latent_rejects_bad_input():
    x = make_latent(small_config())
    with pytest.raises(PromptusError, match="precision"):
        InitLatent.from_array(x, "bf16")
    with pytest.raises(PromptusError, match="shape"):
        InitLatent.from_array(x[0], "fp32")
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(PromptusError, match="NaN"):
        InitLatent.from_array(bad, "fp16")
    with pytest.raises(PromptusError, match="float16 range"):
        InitLatent.from_array(x * 1e6, "fp16")


# ---------------------------------------------------------- entropy coding


def codecs_of(data: bytes) -> list[str]:
    return [r.codec for r in layout(data) if r.codec is not None]


def redundant_bitstream() -> Bitstream:
    """Keyframes whose codes are almost all one value: every entropy codec wins."""
    cfg = small_config()
    kfs = []
    for i in range(3):
        U = torch.zeros(cfg.tokens, cfg.rank)
        V = torch.zeros(cfg.rank, cfg.embed_dim)
        U[0, 0], V[0, :8] = 1.0, torch.linspace(-1, 1, 8)
        kfs.append(Keyframe(3 * i, quantize_tensor(U), quantize_tensor(V)))
    return Bitstream(SMALL.header, SMALL.init, kfs)


def uniform_code_bitstream() -> Bitstream:
    """Codes drawn uniformly from 0..255: nothing compresses them."""
    cfg, rng = small_config(), np.random.default_rng(1)
    kfs = [Keyframe(3 * i, QuantizedTensor(rng.integers(0, 256, (cfg.tokens, cfg.rank), dtype=np.uint8), 0.01, 128),
                    QuantizedTensor(rng.integers(0, 256, (cfg.rank, cfg.embed_dim), dtype=np.uint8), 0.02, 7))
           for i in range(3)]
    return Bitstream(SMALL.header, SMALL.init, kfs)


def test_entropy_coding_is_used_when_it_wins():
    bs = redundant_bitstream()
    auto, raw = to_bytes(bs), to_bytes(bs, entropy="none")
    assert "raw" not in codecs_of(auto)
    assert codecs_of(raw) == ["raw"] * 3
    assert len(auto) < len(raw) - 3 * 2000  # 2202 code bytes per keyframe shrink to a few dozen
    assert from_bytes(auto) == bs


@pytest.mark.parametrize("codec", ["zlib", "lzma", "bz2"])
def test_a_chosen_codec_is_used_when_it_wins(codec):
    bs = redundant_bitstream()
    data = to_bytes(bs, entropy=codec)
    assert codecs_of(data) == [codec] * 3
    assert from_bytes(data) == bs


def test_raw_is_kept_when_no_codec_wins():
    bs = uniform_code_bitstream()
    data = to_bytes(bs)
    assert codecs_of(data) == ["raw"] * 3
    assert data == to_bytes(bs, entropy="none")
    assert codecs_of(to_bytes(bs, entropy="bz2")) == ["raw"] * 3
    assert from_bytes(data) == bs


def test_auto_keeps_the_smallest_codec():
    bs = redundant_bitstream()
    sizes = {c: len(to_bytes(bs, entropy=c)) for c in ("zlib", "lzma", "bz2")}
    assert len(to_bytes(bs)) <= min(sizes.values())


def test_unknown_entropy_choice_is_refused():
    with pytest.raises(PromptusError, match="entropy"):
        to_bytes(SMALL, entropy="brotli")


# ------------------------------------------------------- validation, write


def test_incomplete_or_inconsistent_bitstreams_are_refused(tmp_path):
    h, init, kfs = SMALL.header, SMALL.init, SMALL.keyframes
    short = Bitstream(h, init, kfs[:2])
    assert not short.complete
    short.validate()  # fewer keyframes is a valid state
    with pytest.raises(PromptusError, match="2 of its 3 keyframes"):
        to_bytes(short)
    with pytest.raises(PromptusError, match="index"):
        Bitstream(h, init, [kfs[0], kfs[2], kfs[1]]).validate()
    with pytest.raises(PromptusError, match="need only 3"):
        Bitstream(h, init, kfs + make_keyframes(small_config(), 4)[3:]).validate()
    with pytest.raises(PromptusError, match="init latent"):
        Bitstream(h, InitLatent.from_array(np.zeros((1, 4, 4, 4), np.float32), "fp32"), kfs).validate()
    wrong_rank = make_keyframes(small_config().replace(rank=3), 3)
    with pytest.raises(PromptusError, match="header needs"):
        Bitstream(h, init, wrong_rank).validate()
    with pytest.raises(PromptusError):
        write(tmp_path / "x.promptus", short)
    assert os.listdir(tmp_path) == []


def test_header_values_beyond_the_format_are_refused():
    with pytest.raises(PromptusError, match="width"):
        Header(CodecConfig(width=70000), 10)
    with pytest.raises(PromptusError, match="frame_count"):
        Header(small_config(), 0)
    with pytest.raises(PromptusError, match="fps"):
        Header(small_config(fps=math.inf), 10)


def test_write_is_atomic_and_read_gets_it_back(tmp_path):
    path = tmp_path / "clip.promptus"
    n = write(path, SMALL)
    assert n == path.stat().st_size == len(SMALL_BYTES)
    assert os.listdir(tmp_path) == ["clip.promptus"]  # no temporary left behind
    assert read(path) == SMALL
    n2 = write(str(path), TINY)  # replaces the old file
    assert read(path) == TINY and n2 == len(TINY_BYTES)


@pytest.mark.parametrize("failing", ["replace", "fsync", "write"])
def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "clip.promptus"
    path.write_bytes(b"old contents")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(PromptusError, match="could not write"):
        write(path, SMALL)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["clip.promptus"]
    assert path.read_bytes() == b"old contents"
    path.unlink()
    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(PromptusError):
        write(path, SMALL)
    assert os.listdir(tmp_path) == []


def test_write_and_read_explain_bad_paths(tmp_path):
    with pytest.raises(PromptusError, match="folder"):
        write(tmp_path, SMALL)
    with pytest.raises(PromptusError, match="does not exist"):
        write(tmp_path / "missing" / "x.promptus", SMALL)
    with pytest.raises(PromptusError, match="no such file"):
        read(tmp_path / "nope.promptus")
    with pytest.raises(PromptusError, match="folder"):
        read(tmp_path)


def test_read_names_the_file_and_the_bad_record(tmp_path):
    data = bytearray(SMALL_BYTES)
    data[split(SMALL_BYTES)[3][2] + 30] ^= 1  # inside keyframe record 1
    path = tmp_path / "bad.promptus"
    path.write_bytes(bytes(data))
    with pytest.raises(BitstreamError) as e:
        read(path)
    assert str(path) in str(e.value) and "keyframe record 1" in str(e.value)
    assert e.value.partial.keyframes == SMALL.keyframes[:1]


# ------------------------------------------------------------- streaming


def test_stream_parser_fed_byte_by_byte_matches_from_bytes():
    parser, items = StreamParser(), []
    for i in range(len(TINY_BYTES)):
        assert not parser.done
        items += parser.feed(TINY_BYTES[i:i + 1])
    assert parser.done
    assert [type(x) for x in items] == [Header, InitLatent] + [Keyframe] * 4  # 8 frames: keyframes 0, 3, 6, 9
    assert items[0] == TINY.header and items[1] == TINY.init and items[2:] == TINY.keyframes
    assert parser.header == TINY.header and parser.keyframes == TINY.keyframes
    assert parser.close() == from_bytes(TINY_BYTES) == TINY


def test_stream_parser_yields_items_as_soon_as_their_record_ends():
    recs = split(SMALL_BYTES)
    parser = StreamParser()
    end_of_init = recs[2][2]
    assert parser.feed(SMALL_BYTES[:end_of_init - 1]) == [SMALL.header]
    assert parser.feed(SMALL_BYTES[end_of_init - 1:end_of_init]) == [SMALL.init]
    assert parser.feed(SMALL_BYTES[end_of_init:recs[3][2]]) == SMALL.keyframes[:1]
    assert len(parser.keyframes) == 1 and parser.init == SMALL.init


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 65536])
def test_iter_records_reads_a_file_object(chunk_size):
    items = list(iter_records(io.BytesIO(SMALL_BYTES), chunk_size=chunk_size))
    assert items == [SMALL.header, SMALL.init, *SMALL.keyframes]


def test_iter_records_raises_at_the_end_of_an_incomplete_stream():
    cut = split(SMALL_BYTES)[4][2] + 5  # inside keyframe record 2
    got = []
    with pytest.raises(BitstreamError, match="keyframe record 2") as e:
        for item in iter_records(io.BytesIO(SMALL_BYTES[:cut]), chunk_size=100):
            got.append(item)
    assert got == [SMALL.header, SMALL.init, *SMALL.keyframes[:2]]
    assert e.value.partial.keyframes == SMALL.keyframes[:2]


def test_a_failed_parser_keeps_failing():
    parser = StreamParser()
    with pytest.raises(BitstreamError):
        parser.feed(b"nonsense!!")
    with pytest.raises(BitstreamError):
        parser.feed(MAGIC)
    with pytest.raises(BitstreamError):
        parser.close()


def test_text_is_refused_with_a_hint():
    with pytest.raises(PromptusError, match="binary"):
        from_bytes("\x89PRM")


# ------------------------------------------------------ layout and describe


def test_layout_covers_every_byte():
    data = to_bytes(redundant_bitstream())
    recs = layout(data)
    assert all(isinstance(r, RecordInfo) for r in recs)
    assert sum(r.size for r in recs) == len(data)
    assert [r.offset for r in recs] == [0] + [o for _, _, o in split(data)]
    assert [r.name for r in recs] == ["magic+version", "header", "init latent (fp16)", "keyframe 0 (index 0)",
                                      "keyframe 1 (index 3)", "keyframe 2 (index 6)", "end"]
    assert all(r.size == r.payload + 12 for r in recs[1:])
    assert [r.raw_codes for r in recs[3:6]] == [2202] * 3
    assert all(r.payload - 15 < 100 for r in recs[3:6])


@pytest.mark.parametrize("bs", [SMALL, redundant_bitstream()], ids=["gaussian", "redundant"])
def test_describe_reports_bytes_and_kbps_of_every_byte(bs):
    data = to_bytes(bs)
    text = describe(data)
    seconds = 7 / 30.0
    code_bytes = sum(len(p) - 15 for t, p in records_of(data) if t == b"KEYF")
    raw = 3 * 2 * (77 + 1024)
    assert f"{8 * len(data) / seconds / 1000:.2f} kbit/s" in text
    assert f"{8 * code_bytes / seconds / 1000:.2f} kbit/s" in text
    assert f"{100 * (raw - code_bytes) / raw:.2f}%" in text
    for needle in ("64×64", "seed 88", "numpy.random.RandomState.randn", "tiny-test", bytes(range(16)).hex(),
                   f"{len(data)}", "init latent (fp16)", "keyframes (3)"):
        assert needle in text
    framing = 6 * 12
    assert f"{'framing (6 records)':<28}{framing:>10}" in text


# -------------------------------------------------- damage: what is named


@pytest.mark.parametrize("data", [TINY_BYTES, to_bytes(TINY, entropy="none")], ids=["auto", "raw"])
def test_truncation_at_every_offset_names_the_record_and_keeps_a_prefix(data):
    recs = split(data)
    ends = [o + 12 + len(p) for _, p, o in recs]  # file offset where each record ends
    names = ["header record", "init latent record"] + [f"keyframe record {i}" for i in range(4)] + ["end record"]
    for n in range(len(data)):
        with pytest.raises(BitstreamError) as e:
            from_bytes(data[:n])
        complete = sum(end <= n for end in ends)  # records entirely present
        expected = "magic" if n < 10 else names[complete]
        assert e.value.record == expected, n
        assert "truncated" in str(e.value) or n < 10
        partial = e.value.partial
        if complete < 2:
            assert partial is None
        else:
            assert_prefix(partial, TINY)
            assert len(partial.keyframes) == min(complete - 2, 4)


def test_corrupted_keyframe_is_named_with_its_offset():
    recs = split(SMALL_BYTES)
    offset = recs[5 - 1][2]  # keyframe record 2
    data = bytearray(SMALL_BYTES)
    data[offset + 40] ^= 0x10
    with pytest.raises(BitstreamError) as e:
        from_bytes(bytes(data))
    msg = str(e.value)
    assert e.value.record == "keyframe record 2"
    assert f"byte offset {offset}" in msg and "checksum" in msg and "2 keyframes before it are intact" in msg
    assert e.value.partial.keyframes == SMALL.keyframes[:2] and e.value.partial.header == SMALL.header


def test_corrupted_header_leaves_nothing():
    data = bytearray(SMALL_BYTES)
    data[20] ^= 0xFF
    with pytest.raises(BitstreamError) as e:
        from_bytes(bytes(data))
    assert e.value.record == "header record" and e.value.partial is None


def test_wrong_magic():
    with pytest.raises(BitstreamError, match="not a .promptus file") as e:
        from_bytes(b"GIF89a" + SMALL_BYTES[6:])
    assert e.value.record == "magic" and e.value.partial is None
    with pytest.raises(BitstreamError, match="legacy"):
        from_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(BitstreamError, match="line endings"):
        from_bytes(SMALL_BYTES.replace(b"\r\n", b"\n", 1))
    with pytest.raises(BitstreamError, match="line endings"):
        from_bytes(SMALL_BYTES[:8].replace(b"\n", b"\r\n") + SMALL_BYTES[8:])
    # A wrong signature is reported as soon as its first byte arrives.
    with pytest.raises(BitstreamError):
        StreamParser().feed(b"\x00")


@pytest.mark.parametrize("version", [3, 7, 65535])
def test_future_version_asks_for_an_upgrade(version):
    data = MAGIC + struct.pack("<H", version) + SMALL_BYTES[10:]
    with pytest.raises(BitstreamError, match="newer promptus.*upgrade") as e:
        from_bytes(data)
    assert e.value.record == "version"


def test_version_zero_is_corrupt():
    with pytest.raises(BitstreamError, match="version 0"):
        from_bytes(MAGIC + b"\x00\x00" + SMALL_BYTES[10:])


def test_trailing_garbage_after_the_end_record():
    with pytest.raises(BitstreamError, match="after the end record") as e:
        from_bytes(SMALL_BYTES + b"\x00")
    assert e.value.partial == SMALL and e.value.partial.complete
    with pytest.raises(BitstreamError):
        from_bytes(SMALL_BYTES + SMALL_BYTES)


def test_duplicate_header():
    recs = records_of(SMALL_BYTES)
    with pytest.raises(BitstreamError, match="second header") as e:
        from_bytes(join([recs[0]] + recs))
    assert e.value.record == "init latent record" and e.value.partial is None


def test_records_out_of_order():
    recs = records_of(SMALL_BYTES)
    with pytest.raises(BitstreamError, match="out of order") as e:
        from_bytes(join([recs[0], recs[2], recs[1]] + recs[3:]))
    assert e.value.record == "init latent record"
    with pytest.raises(BitstreamError, match="out of order"):
        from_bytes(join(recs[1:]))


def test_unknown_record_type():
    recs = records_of(SMALL_BYTES)
    with pytest.raises(BitstreamError, match="unknown record type") as e:
        from_bytes(join(recs[:2] + [(b"XTRA", b"hello")] + recs[2:]))
    assert e.value.record == "keyframe record 0" and e.value.partial.keyframes == []


def test_end_record_before_the_last_keyframe_is_truncation():
    recs = records_of(SMALL_BYTES)
    with pytest.raises(BitstreamError, match="truncated.*2 of the 3 keyframes") as e:
        from_bytes(join(recs[:4] + recs[5:]))
    assert e.value.record == "keyframe record 2" and e.value.partial.keyframes == SMALL.keyframes[:2]


def test_end_record_must_be_empty_and_last():
    recs = records_of(SMALL_BYTES)
    with pytest.raises(BitstreamError, match="end record"):
        from_bytes(join(recs[:-1] + [(b"END ", b"x")]))
    extra = bytearray(recs[4][1])
    extra[:4] = struct.pack("<I", 9)  # keyframe 3 would sit at frame 9
    with pytest.raises(BitstreamError, match="need only 3 keyframes") as e:
        from_bytes(join(recs[:5] + [(b"KEYF", bytes(extra))] + recs[5:]))
    assert e.value.record == "end record" and e.value.partial == SMALL


def test_wrong_keyframe_index():
    payload = bytearray(records_of(SMALL_BYTES)[3][1])
    payload[:4] = struct.pack("<I", 4)
    with pytest.raises(BitstreamError, match="index 4.*frame 3") as e:
        from_bytes(with_record(SMALL_BYTES, 3, bytes(payload)))
    assert e.value.record == "keyframe record 1" and e.value.partial.keyframes == SMALL.keyframes[:1]


def test_unknown_codec_id():
    payload = bytearray(records_of(SMALL_BYTES)[2][1])
    payload[4] = 9
    with pytest.raises(BitstreamError, match="unknown entropy codec id 9") as e:
        from_bytes(with_record(SMALL_BYTES, 2, bytes(payload)))
    assert e.value.record == "keyframe record 0"


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf, 3e38])
def test_bad_quantizer_scale(scale):
    payload = bytearray(records_of(SMALL_BYTES)[2][1])
    payload[5:9] = struct.pack("<f", scale)
    with pytest.raises(BitstreamError, match="scale"):
        from_bytes(with_record(SMALL_BYTES, 2, bytes(payload)))


def keyframe_with_block(codec_id: int, block: bytes, index: int = 0) -> bytes:
    kf = SMALL.keyframes[0]
    return struct.pack("<IBfBfB", index, codec_id, kf.U_q.scale, kf.U_q.zero_point, kf.V_q.scale,
                       kf.V_q.zero_point) + block


def test_compressed_codes_of_the_wrong_size_are_refused():
    codes = SMALL.keyframes[0].U_q.q.tobytes() + SMALL.keyframes[0].V_q.q.tobytes()
    assert from_bytes(with_record(SMALL_BYTES, 2, keyframe_with_block(1, deflate_raw(codes)))) == SMALL
    for bad, why in ((codes[:-1], "decompress to 2201 bytes"), (codes + b"\x00", "more than"),
                     (codes[:-1] + b"\x00\x00", "more than")):
        with pytest.raises(BitstreamError, match=why):
            from_bytes(with_record(SMALL_BYTES, 2, keyframe_with_block(1, deflate_raw(bad))))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    unterminated = c.compress(codes) + c.flush(zlib.Z_SYNC_FLUSH)  # every code byte, but no final block
    with pytest.raises(BitstreamError, match="not terminated"):
        from_bytes(with_record(SMALL_BYTES, 2, keyframe_with_block(1, unterminated)))
    with pytest.raises(BitstreamError, match="stray bytes"):
        from_bytes(with_record(SMALL_BYTES, 2, keyframe_with_block(1, deflate_raw(codes) + b"xx")))
    with pytest.raises(BitstreamError, match="cannot be decompressed"):
        from_bytes(with_record(SMALL_BYTES, 2, keyframe_with_block(2, b"\xff" * 100)))
    with pytest.raises(BitstreamError, match="raw codes are 100 bytes"):
        from_bytes(with_record(SMALL_BYTES, 2, keyframe_with_block(0, codes[:100])))


@pytest.mark.parametrize("codec_id, compress, size", [
    (1, deflate_raw, 2_000_000),
    (2, lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 4096}]),
     10_000_000),
    (3, lambda b: bz2.compress(b, 9), 50_000_000),
], ids=["zlib", "lzma", "bz2"])
def test_a_decompression_bomb_is_stopped_at_the_expected_size(codec_id, compress, size):
    block = compress(bytes(size))  # megabytes of zeros in a block smaller than the 2202 raw code bytes
    assert len(block) < 2202
    data = with_record(SMALL_BYTES, 2, keyframe_with_block(codec_id, block))
    tracemalloc.start()
    try:
        with pytest.raises(BitstreamError, match="more than the 2202 bytes"):
            from_bytes(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


def test_impossible_lengths_fail_before_the_payload_arrives():
    recs = split(SMALL_BYTES)
    start_kf0 = recs[2][2]
    parser = StreamParser()
    parser.feed(SMALL_BYTES[:start_kf0])
    with pytest.raises(BitstreamError, match="payload length 4294967295 is impossible") as e:
        parser.feed(struct.pack("<4sI", b"KEYF", 0xFFFFFFFF))
    assert e.value.record == "keyframe record 0" and e.value.partial.init == SMALL.init
    for rtype in (b"HEAD", b"INIT", b"END "):
        with pytest.raises(BitstreamError, match="impossible"):
            p = StreamParser()
            p.feed(SMALL_BYTES[:{b"HEAD": 10, b"INIT": recs[1][2], b"END ": recs[-1][2]}[rtype]])
            p.feed(struct.pack("<4sI", rtype, 1 << 31))


@pytest.mark.parametrize("fields, why", [
    ({"rank": 0}, "rank"),
    ({"interval": 0}, "interval"),
    ({"width": 60}, "width"),
    ({"fps": math.nan}, "fps"),
    ({"fps": math.inf}, "fps"),
    ({"mix": 2.0}, "mix"),
    ({"quant_bits": 4}, "quant_bits"),
    ({"generator": "torch.randn"}, "noise generator"),
    ({"factor": 0}, "latent factor"),
    ({"frame_count": 0}, "frame"),
    ({"timestep": 1000}, "timestep"),
    ({"tokens": 0}, "tokens"),
    ({"model": b"\xff\xfe"}, "UTF-8"),
    ({"rank": 60000}, r"rank=60000.*1\.\.512"),
    ({"rank": 512, "tokens": 1024, "embed_dim": 4096}, "lower the rank"),
    ({"interval": 65535}, r"interval.*1\.\.256"),
    ({"tokens": 32768, "embed_dim": 32768}, r"tokens.*1\.\.1024"),
    ({"width": 65528}, "at most 4096"),
    ({"frame_count": 1 << 30}, "frame_count"),
    ({"fps": 1e308}, "fps"),
    ({"fps": 1e-300}, "fps"),
])
def test_bad_header_values_are_named(fields, why):
    data = with_record(SMALL_BYTES, 0, pack_head(**fields))
    with pytest.raises(BitstreamError, match=why) as e:
        from_bytes(data)
    assert e.value.record == "header record" and e.value.partial is None
    assert "byte offset 10" in str(e.value)


def test_header_with_extra_bytes_is_refused():
    with pytest.raises(BitstreamError, match="unexpected bytes"):
        from_bytes(with_record(SMALL_BYTES, 0, pack_head() + b"\x00"))


def test_bad_init_latent_payloads():
    payload = records_of(SMALL_BYTES)[1][1]
    with pytest.raises(BitstreamError, match="precision id") as e:
        from_bytes(with_record(SMALL_BYTES, 1, b"\x07" + payload[1:]))
    assert e.value.record == "init latent record" and e.value.partial is None
    with pytest.raises(BitstreamError, match="NaN"):
        from_bytes(with_record(SMALL_BYTES, 1, b"\x01" + np.full(256, np.nan, "<f2").tobytes()))
    with pytest.raises(BitstreamError, match="fp16 init latent .* takes 513"):  # an fp32 size with the fp16 tag
        from_bytes(with_record(SMALL_BYTES, 1, b"\x01" + bytes(1024)))


# ------------------------------------------------------------ fuzzing


def mutate(data: bytes, draw) -> bytes:
    """One random damage: flip, truncate, insert, delete or overwrite."""
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
    n = len(data)
    if kind == "flip":
        i = draw(st.integers(0, n - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if kind == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    if kind == "insert":
        i = draw(st.integers(0, n))
        return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
    if kind == "delete":
        i = draw(st.integers(0, n - 1))
        return data[:i] + data[i + draw(st.integers(1, 16)):]
    i = draw(st.integers(0, n - 1))
    junk = draw(st.binary(min_size=1, max_size=16))
    out = data[:i] + junk + data[i + len(junk):]
    return out if out != data else data[:i]


@FUZZ
@given(st.data())
def test_fuzz_damage_always_raises_bitstream_error_with_a_prefix(data):
    original = data.draw(st.sampled_from([TINY_BYTES, to_bytes(TINY, entropy="none"), SMALL_BYTES]))
    bs = TINY if original is not SMALL_BYTES else SMALL
    damaged = original
    for _ in range(data.draw(st.integers(1, 3))):
        damaged = mutate(damaged, data.draw) if damaged else damaged
    assume(damaged != original)  # two flips of one byte cancel out
    # Every change to framed, checksummed bytes is caught (CRC-32 catches any burst ≤ 32 bits).
    with pytest.raises(BitstreamError) as e:
        from_bytes(damaged)
    assert_prefix(e.value.partial, bs)
    assert e.value.record


@FUZZ
@given(st.data())
def test_fuzz_rechecksummed_payloads_raise_only_bitstream_error(data):
    # Damage inside a payload with a fixed-up CRC reaches the payload parsers themselves.
    original = data.draw(st.sampled_from([TINY_BYTES, to_bytes(TINY, entropy="none"), to_bytes(redundant_bitstream())]))
    recs = records_of(original)
    i = data.draw(st.integers(0, len(recs) - 1))
    rtype, payload = recs[i]
    new = mutate(payload, data.draw) if payload else data.draw(st.binary(min_size=1, max_size=8))
    recs[i] = (rtype, new)
    try:
        bs = from_bytes(join(recs))
    except BitstreamError as e:
        if e.partial is not None:
            ref = from_bytes(original)
            assert e.partial.keyframes == ref.keyframes[:len(e.partial.keyframes)]
            if i >= 2:  # the damaged record is keyframe i − 2: everything before it survives
                assert len(e.partial.keyframes) == i - 2
    else:
        assert bs.complete  # e.g. a flipped code byte in a raw keyframe is a valid, different file


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_arbitrary_bytes_raise_only_bitstream_error(blob, with_magic):
    data = (V2 + blob) if with_magic else blob
    with pytest.raises(BitstreamError):
        from_bytes(data)
    with pytest.raises(BitstreamError):
        list(iter_records(io.BytesIO(data), chunk_size=7))


def test_entropy_gain_script_writes_its_table(tmp_path, capsys):
    import json

    mod = repo_scripts.load("scripts/entropy_gain.py")
    out = tmp_path / "gain.json"
    assert mod.main(["--keyframes", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["factors"] for r in rows] == ["gaussian", "uniform"]
    assert all(r["raw_bytes"] == 8 * (77 + 1024) for r in rows)
    assert rows[0]["best_mean_bytes"] < rows[0]["raw_bytes"]  # gaussian codes are not uniform: they compress
    assert rows[1]["winners"] == {"raw": 2}  # uniform codes do not
    assert "gaussian" in capsys.readouterr().out


# ---- hostile inputs (issue 9 audit): bombs and limits refused in words, in bounded memory; integrity

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


def test_info_escapes_control_characters_in_the_model_name():
    name = "evil\x1b]0;pwned\x07\x1b[2J\u202e"
    text = describe(to_bytes(bitstream(CodecConfig(width=16, height=16, rank=1, interval=2, tokens=3, embed_dim=4), 3,
                                       model=ModelIdentity(name, bytes(16)))))
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in text


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
