"""The entropy-coder registry: one entry per coder, from which ids, ``entropy=`` choices,
command-line choices, messages and docs/format.md's table derive; and the room it has
for coders that carry a context from keyframe to keyframe."""

from __future__ import annotations

import io
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from promptus.bitstream import (
    CODECS, CODERS, ENTROPY_CHOICES, Bitstream, Header, InitLatent, Keyframe, ModelIdentity, StreamParser, describe,
    entropy_code, from_bytes, iter_records, layout, parse_record, split_records, to_bytes,
)
from promptus.bitstream.entropy import StreamCoder
from promptus.config import CodecConfig
from promptus.errors import BitstreamError, PromptusError
from promptus.prompts import QuantizedTensor, quantize_tensor

FORMAT_DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"


class ZlibLevel1(StreamCoder):
    """A stateless coder as a contributor would add it: a class and one registry entry."""

    id, name = 250, "test-zlib1"
    summary = "a raw DEFLATE stream at level 1"

    def compress(self, codes, state=None):
        c = zlib.compressobj(1, zlib.DEFLATED, -15)
        return c.compress(codes) + c.flush()

    def decompressor(self, size, state):
        return zlib.decompressobj(-15)

    def pending_output(self, d):
        return d.decompress(d.unconsumed_tail, 1)

    def leftover(self, d):
        return d.unconsumed_tail or d.unused_data


class ZlibPreviousKeyframe(ZlibLevel1):
    """A stateful coder: DEFLATE primed with the previous keyframe's codes as its dictionary."""

    id, name, auto, stateful = 251, "test-prev", False, True
    summary = "a raw DEFLATE stream whose preset dictionary is the previous keyframe's codes"

    def start(self):
        return b""

    def advance(self, state, codes):
        return bytes(codes)

    def compress(self, codes, state=None):
        c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, **({"zdict": state} if state else {}))
        return c.compress(codes) + c.flush()

    def decompressor(self, size, state):
        return zlib.decompressobj(-15, **({"zdict": state} if state else {}))


def slowly_changing(cfg: CodecConfig, frame_count: int) -> Bitstream:
    """Keyframes whose codes change little from one to the next (what a context can use)."""
    rs = np.random.RandomState(3)
    header = Header(cfg, frame_count, ModelIdentity.unknown())
    U = quantize_tensor(torch.from_numpy(rs.randn(cfg.tokens, cfg.rank).astype(np.float32)))
    V = quantize_tensor(torch.from_numpy(rs.randn(cfg.rank, cfg.embed_dim).astype(np.float32)))
    kfs = []
    for i in range(header.keyframe_count):
        q = V.q.copy()
        q[:, rs.randint(0, cfg.embed_dim, 8)] ^= 1  # a few codes differ from the previous keyframe
        V = QuantizedTensor(q, V.scale, V.zero_point)
        kfs.append(Keyframe(i * cfg.interval, U, V))
    init = InitLatent.from_array(rs.randn(*cfg.latent_shape).astype(np.float32), "fp16")
    return Bitstream(header, init, kfs)


CFG = CodecConfig(width=16, height=16, rank=2, interval=2)
CLIP = slowly_changing(CFG, 7)


def test_names_ids_and_choices_come_from_the_registry():
    assert CODECS == tuple(c.name for c in CODERS)
    # Ids are format: a coder may be added, never renumbered.
    assert [(c.id, c.name) for c in CODERS][:4] == [(0, "raw"), (1, "zlib"), (2, "lzma"), (3, "bz2")]
    assert ENTROPY_CHOICES == ("auto", "none") + CODECS[1:]
    from promptus.commands.main import build_parser

    parser = build_parser()
    for choice in ENTROPY_CHOICES:  # the command line offers every choice...
        assert parser.parse_args(["import-legacy", "f", "-o", "x.promptus", "--entropy", choice]).entropy == choice
    with pytest.raises(SystemExit):  # ...and only those
        parser.parse_args(["import-legacy", "f", "-o", "x.promptus", "--entropy", "raw"])


def test_format_doc_lists_every_coder():
    text = FORMAT_DOC.read_text()
    table = text.split("### Entropy coders", 1)[1].split("\n\n", 2)[1]
    rows = [(int(m[1]), m[2]) for m in re.finditer(r"^\| (\d+) \| (\S+) \|", table, re.M)]
    assert rows == [(c.id, c.name) for c in CODERS], "docs/format.md's coder table differs from the registry"


def test_one_registry_entry_adds_a_coder_everywhere():
    data_before = to_bytes(CLIP)
    with CODERS.registered(ZlibLevel1()):
        assert "test-zlib1" in CODERS.choices and CODERS.names[-1] == "test-zlib1"
        data = to_bytes(CLIP, entropy="test-zlib1")
        assert {r.codec for r in layout(data) if r.codec} == {"test-zlib1"}
        assert from_bytes(data) == CLIP
        assert "test-zlib1 ×4" in describe(data)
        choices = ", ".join(ENTROPY_CHOICES + ("test-zlib1",))
        with pytest.raises(PromptusError, match=re.escape(f"choose one of {choices}")):
            to_bytes(CLIP, entropy="zstd")
        assert to_bytes(CLIP) != data  # level 9 (zlib) beats level 1, so "auto" keeps its choice...
        assert to_bytes(CLIP) == data_before  # ...and files written before the coder existed are unchanged
    # Once it is gone, its files are refused with the list of what this promptus knows.
    assert CODERS.known_ids().startswith("0 raw, 1 zlib, 2 lzma, 3 bz2")
    with pytest.raises(BitstreamError, match=re.escape(f"unknown entropy codec id 250 (this promptus knows "
                                                       f"{CODERS.known_ids()}) — a newer promptus may have "
                                                       "written it (upgrade promptus to read it)")):
        from_bytes(data)
    assert CODERS.names == CODECS


def test_registry_refuses_clashing_entries():
    class Clash(ZlibLevel1):
        id = 1

    class Auto(ZlibLevel1):
        name = "auto"

    class Wide(ZlibLevel1):
        id = 256

    for coder, words in ((Clash(), "id 1 is taken by 'zlib'"), (Auto(), "name 'auto' is taken"),
                         (Wide(), "must be a byte")):
        with pytest.raises(PromptusError, match=re.escape(words)):
            CODERS.add(coder)
    assert CODERS.names == CODECS


def test_a_stateful_coder_carries_its_context_from_keyframe_to_keyframe():
    with CODERS.registered(ZlibPreviousKeyframe()):
        data = to_bytes(CLIP, entropy="test-prev")
        coders = [r.codec for r in layout(data) if r.codec]
        # Keyframe 0 has no previous codes (plain DEFLATE); later ones are primed with the one before.
        assert coders == ["test-prev"] * 4
        stateless = [r.payload for r in layout(to_bytes(CLIP, entropy="zlib")) if r.codec]
        primed = [r.payload for r in layout(data) if r.codec]
        assert all(p < s / 4 for p, s in zip(primed[1:], stateless[1:]))  # the context is what makes it small
        # Every reader advances the same context: whole file, byte by byte, StreamParser.
        assert from_bytes(data) == CLIP
        items = list(iter_records(io.BytesIO(data), chunk_size=1))
        assert items[2:] == CLIP.keyframes
        parser = StreamParser()
        for i in range(0, len(data), 100):
            parser.feed(data[i:i + 100])
        assert parser.close() == CLIP
        # A record on its own has no context: its keyframe is refused in words, not mis-decoded.
        pieces, error = split_records(data)
        assert error is None
        header = parse_record(pieces[0])
        parse_record(pieces[1], header)
        with pytest.raises(BitstreamError, match="needs the keyframes before it; parse the stream in order"):
            parse_record(pieces[3], header)
        # "auto" does not try a coder that is not marked for it.
        assert to_bytes(CLIP) == to_bytes(CLIP, entropy="auto")
        assert "test-prev" not in {r.codec for r in layout(to_bytes(CLIP))}


def test_entropy_code_without_a_context_starts_a_stream():
    codes = b"\x80" * 500
    with CODERS.registered(ZlibPreviousKeyframe()):
        codec, block = entropy_code(codes, "test-prev")
        assert codec == "test-prev" and zlib.decompress(block, -15) == codes  # unprimed: plain DEFLATE

