"""Builders of hostile .promptus files, written from the documented byte layout
(the writer refuses to make most of them), shared by the hardening and fuzz tests."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from promptus.bitstream import Bitstream, Header, InitLatent, Keyframe, MAGIC, ModelIdentity
from promptus.config import CodecConfig
from promptus.prompts import quantize_tensor


def record(rtype: bytes, payload: bytes) -> bytes:
    return struct.pack("<4sI", rtype, len(payload)) + payload + struct.pack("<I", zlib.crc32(rtype + payload))


def head(width=64, height=64, fps=30.0, rank=2, interval=3, seed=88, tokens=77, embed_dim=1024, channels=4,
         factor=8, frame_count=7, model=b"m") -> bytes:
    gen = b"numpy.random.RandomState.randn"
    return (struct.pack("<HHdHHI", width, height, fps, rank, interval, seed) + struct.pack("<H", len(gen)) + gen
            + struct.pack("<dBHHHBBI", 0.05, 8, tokens, embed_dim, 999, channels, factor, frame_count)
            + struct.pack("<H", len(model)) + model + bytes(16))


def init_fp16(channels=4, side=8) -> bytes:
    return b"\x01" + np.zeros((1, channels, side, side), "<f2").tobytes()


def keyf(index: int, codec: int, block: bytes) -> bytes:
    return struct.pack("<IBfBfB", index, codec, 0.01, 0, 0.01, 0) + block


def v1_file(header: bytes, init: bytes, keyframes: list[bytes]) -> bytes:
    """A version-1 file (empty END record): still read, so still a way in for an attacker."""
    return (MAGIC + b"\x01\x00" + record(b"HEAD", header) + record(b"INIT", init)
            + b"".join(record(b"KEYF", k) for k in keyframes) + record(b"END ", b""))


def bitstream(cfg: CodecConfig, frame_count: int, seed: int = 0, model: ModelIdentity | None = None) -> Bitstream:
    g = torch.Generator().manual_seed(seed)
    header = Header(cfg, frame_count, model or ModelIdentity.unknown())
    init = InitLatent.from_array(torch.randn(cfg.latent_shape, generator=g).numpy(), "fp16")
    kfs = [Keyframe(i * cfg.interval, quantize_tensor(torch.randn(cfg.tokens, cfg.rank, generator=g)),
                    quantize_tensor(torch.randn(cfg.rank, cfg.embed_dim, generator=g)))
           for i in range(header.keyframe_count)]
    return Bitstream(header, init, kfs)


# ---- a legacy prompt file with changed entries

def replace_prompt(folder, index=0, **changes):
    path = folder / f"frame_{index:05d}.prompt"
    d = torch.load(path, weights_only=True)
    d.update(changes)
    torch.save(d, path)
