"""The .promptus conformance vectors (tests/data/): how they are made and what they must give.

Two small files, one per format version, built from fixed inputs with the tiny
random-weight model's identity in their header:

* ``conformance-v1.promptus`` — format version 1 (empty END record), fp32 init latent,
  keyframe codes stored raw;
* ``conformance-v2.promptus`` — format version 2 (SHA-256 in the END record), int8 init
  latent, one keyframe per entropy coder: raw, zlib, lzma, bz2.

``conformance.json`` holds, for each file, its SHA-256, its header fields, the coder of
each keyframe, the **content digest** (docs/format.md, "Conformance vectors": SHA-256 of
the dequantized float32 init latent and factors) and the **decode digest**: SHA-256 of
the frames (uint8 N×H×W×3) that ``promptus.decode(..., model="tiny", device="cpu",
backend="torch")`` produces with ``torch.set_num_threads(1)`` — on the CPU the frames can
differ by ±1 with the thread count, so the digest is defined for one thread.

Regenerate (only when the format or the decoder's numerics change on purpose)::

    python tests/conformance.py            # writes tests/data/conformance-v{1,2}.promptus + conformance.json
"""

from __future__ import annotations

import hashlib
import struct
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from promptus.bitstream import (
    MAGIC, Bitstream, Header, InitLatent, Keyframe, ModelIdentity, from_bytes, layout, to_bytes,
)
from promptus.config import CodecConfig
from promptus.prompts import quantize_tensor

DATA = Path(__file__).resolve().parent / "data"
EXPECTED = DATA / "conformance.json"

#: name → (format version, frame size, rank, interval, frame count, init precision, coder per keyframe, seed)
VECTORS = {
    "conformance-v1.promptus": dict(version=1, size=16, rank=2, interval=3, frame_count=4, precision="fp32",
                                    coders=("none", "none"), seed=1),
    "conformance-v2.promptus": dict(version=2, size=16, rank=2, interval=2, frame_count=7, precision="int8",
                                    coders=("none", "zlib", "lzma", "bz2"), seed=2),
}
#: How the decode digest is computed (docs/format.md).
DECODE = dict(model="tiny", device="cpu", backend="torch", torch_threads=1)


def make_bitstream(spec: dict, model: ModelIdentity) -> Bitstream:
    """The vector's content from numpy's legacy generator (its stream is stable across numpy versions).

    Factors are Laplace-distributed, peaked like trained factors, so every coder beats raw.
    """
    rs = np.random.RandomState(spec["seed"])
    cfg = CodecConfig(width=spec["size"], height=spec["size"], fps=24.0, rank=spec["rank"],
                      interval=spec["interval"])
    header = Header(cfg, spec["frame_count"], model)
    init = InitLatent.from_array(rs.randn(*cfg.latent_shape).astype(np.float32), spec["precision"])
    kfs = [Keyframe(i * cfg.interval,
                    quantize_tensor(torch.from_numpy(rs.laplace(0, 1, (cfg.tokens, cfg.rank)).astype(np.float32))),
                    quantize_tensor(torch.from_numpy(rs.laplace(0, 1, (cfg.rank, cfg.embed_dim)).astype(np.float32))))
           for i in range(header.keyframe_count)]
    return Bitstream(header, init, kfs)


def _framed(rtype: bytes, payload: bytes) -> bytes:
    return struct.pack("<4sI", rtype, len(payload)) + payload + struct.pack("<I", zlib.crc32(rtype + payload))


def vector_bytes(spec: dict, model: ModelIdentity) -> bytes:
    """The vector's bytes: keyframe i stored with ``spec["coders"][i]`` (as ``to_bytes(entropy=...)``
    stores it), the END record per the version. Built from the documented layout."""
    bs = make_bitstream(spec, model)
    assert len(spec["coders"]) == len(bs.keyframes)
    files = {c: to_bytes(bs, entropy=c) for c in set(spec["coders"])}
    parts = {c: layout(data) for c, data in files.items()}
    first = parts[spec["coders"][0]]
    data = files[spec["coders"][0]]
    out = bytearray(MAGIC + struct.pack("<H", spec["version"]))
    out += data[first[1].offset:first[2].offset + first[2].size]  # header and init latent records
    for i, coder in enumerate(spec["coders"]):
        rec = parts[coder][3 + i]  # magic+version, header, init latent, then the keyframes
        out += files[coder][rec.offset:rec.offset + rec.size]
    out += _framed(b"END ", hashlib.sha256(out).digest() if spec["version"] >= 2 else b"")
    return bytes(out)


def content_digest(bs: Bitstream) -> str:
    """SHA-256 of the dequantized content: the init latent as float32 little-endian in C order,
    then per keyframe its u32 index, U (tokens×r) and V (r×dim) as float32 little-endian, row-major."""
    h = hashlib.sha256(np.ascontiguousarray(bs.init.latent, "<f4").tobytes())
    for kf in bs.keyframes:
        h.update(struct.pack("<I", kf.index))
        h.update(np.ascontiguousarray(kf.U.numpy(), "<f4").tobytes())
        h.update(np.ascontiguousarray(kf.V.numpy(), "<f4").tobytes())
    return h.hexdigest()


@contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` inside the block, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode_digest(data: bytes, models=None) -> tuple[str, list[int]]:
    """(SHA-256 of the decoded uint8 frames, their shape) under :data:`DECODE`.

    ``models``: the tiny models already built (tests pass their fixture); None loads them
    as ``promptus.decode`` does.
    """
    import promptus
    from promptus.backends import backend_for_clip, clip_batch
    from promptus.decoder import Decoder

    with torch_threads(DECODE["torch_threads"]):
        if models is None:
            frames = promptus.decode(data, model=DECODE["model"], device=DECODE["device"], backend=DECODE["backend"])
        else:  # what promptus.decode does after loading the models
            bs = from_bytes(data)
            backend = backend_for_clip(bs.header, models, name=DECODE["backend"], device=DECODE["device"])
            frames = Decoder(backend, models.identity(), max_batch=clip_batch(bs.header)).decode_all(bs)
    frames = frames.contiguous().numpy()
    return hashlib.sha256(frames.tobytes()).hexdigest(), list(frames.shape)


def describe_vector(data: bytes, models=None) -> dict:
    """What conformance.json records about one vector."""
    bs = from_bytes(data)
    cfg = bs.header.config
    frames_sha256, shape = decode_digest(data, models)
    return {
        "version": struct.unpack_from("<H", data, len(MAGIC))[0],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "header": {**cfg.to_dict(), "frame_count": bs.header.frame_count, "model_name": bs.header.model.name,
                   "model_digest": bs.header.model.hexdigest},
        "init_precision": bs.init.precision,
        "coders": [r.codec for r in layout(data) if r.codec is not None],
        "content_sha256": content_digest(bs),
        "frames_sha256": frames_sha256,
        "frames_shape": shape,
    }


def main() -> int:
    from promptus.files import atomic_write, write_json_atomic
    from promptus.models import tiny_models

    models = tiny_models()
    expected = {"decode": DECODE, "zlib_runtime": zlib.ZLIB_RUNTIME_VERSION, "vectors": {}}
    for name, spec in VECTORS.items():
        data = vector_bytes(spec, models.identity())
        atomic_write(DATA / name, data)
        expected["vectors"][name] = describe_vector(data, models)
        print(f"{name}: {len(data)} bytes, coders {expected['vectors'][name]['coders']}")
    write_json_atomic(EXPECTED, expected)
    print(f"wrote {EXPECTED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
