"""The PyTorch decoder with the tiny model: the method step by step, determinism, streaming."""

import bz2
import math
import warnings

import pytest
import torch

import promptus
from promptus.backends import make_backend
from promptus.bitstream import (
    Bitstream, Header, InitLatent, Keyframe, ModelIdentity, StreamParser, from_bytes, to_bytes,
)
from promptus.config import CodecConfig
from promptus.decoder import Decoder
from promptus.errors import BitstreamError, PromptusError
from promptus.prompts import quantize_tensor
from promptus.schedule import OneStep, make_noise, to_uint8

from bounded import LIMIT_MB, bounded_memory
from hostile import bitstream, head, init_fp16, keyf, v1_file


def make_bitstream(models, *, frame_count=10, interval=4, rank=2, size=64, seed=0):
    cfg = CodecConfig(width=size, height=size, fps=24.0, rank=rank, interval=interval)
    g = torch.Generator().manual_seed(seed)
    kfs = [Keyframe(index=k * interval,
                    U_q=quantize_tensor(torch.randn(77, rank, generator=g)),
                    V_q=quantize_tensor(torch.randn(rank, 1024, generator=g)))
           for k in range(cfg.keyframe_count(frame_count))]
    init = InitLatent.from_array(torch.randn(cfg.latent_shape, generator=g).numpy(), "fp32")
    return Bitstream(Header(cfg, frame_count, models.identity()), init, kfs)


def reference_frames(models, bs):
    """The method written out frame by frame at batch 1, the way the release's generation script runs."""
    cfg, o = bs.header.config, OneStep.at(999)
    eps = make_noise(cfg)
    m = torch.tensor(cfg.mix)
    unet, dec = models.unet, models.taesd.decoder

    def gen(z, c):
        e = unet(z, torch.tensor([999]), encoder_hidden_states=c).sample
        x0 = z / o.c_in + o.c_out * e
        return x0, to_uint8(dec(x0))[0]

    out = []
    with torch.no_grad():
        kf = bs.keyframes
        z = bs.init.to_torch() * m + eps * (1 - m)
        prev, img = gen(z, (kf[0].U @ kf[0].V / math.sqrt(cfg.rank))[None])
        out.append(img)
        for k in range(len(kf) - 1):
            z = prev * m + eps * (1 - m)  # one z for the whole segment
            for s in range(1, cfg.interval + 1):
                if len(out) == bs.header.frame_count:
                    break
                w = s / cfg.interval
                u = (1 - w) * kf[k].U + w * kf[k + 1].U
                v = (1 - w) * kf[k].V + w * kf[k + 1].V
                last, img = gen(z, (u @ v / math.sqrt(cfg.rank))[None])
                out.append(img)
            prev = last
    return torch.stack(out)


@pytest.fixture(scope="module")
def decoder(tiny):
    return Decoder(make_backend("torch", tiny, "cpu", batch=4, size=64), tiny.identity())


def test_decoder_matches_the_frame_by_frame_reference(tiny, decoder):
    bs = make_bitstream(tiny, frame_count=10, interval=4)  # 1 + 4 + 4 + 1 (last segment cut short)
    frames = decoder.decode_all(bs)
    ref = reference_frames(tiny, bs)
    assert frames.shape == (10, 64, 64, 3) and frames.dtype == torch.uint8
    diff = (frames.int() - ref.int()).abs()
    # Batched vs batch-1 kernels may round differently in the last bit of a few pixels.
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert frames.float().std() > 1  # not a constant image


def test_decoding_twice_gives_identical_frames(tiny, decoder):
    bs = make_bitstream(tiny, frame_count=9)
    assert torch.equal(decoder.decode_all(bs), decoder.decode_all(bs))


@pytest.mark.parametrize("frame_count,interval", [(1, 4), (5, 4), (9, 4), (7, 3), (12, 5)])
def test_frame_count_equals_header(tiny, decoder, frame_count, interval):
    bs = make_bitstream(tiny, frame_count=frame_count, interval=interval)
    segs = list(decoder.decode(bs))
    assert sum(s.frames.shape[0] for s in segs) == frame_count
    assert [s.start for s in segs] == [0] + [1 + k * interval for k in range(len(segs) - 1)]
    # Every full segment is one batch of T frames.
    assert all(s.frames.shape[0] == interval for s in segs[1:-1])


def test_frames_depend_on_prompts_and_noise(tiny, decoder):
    a = decoder.decode_all(make_bitstream(tiny, frame_count=5, seed=0))
    b = decoder.decode_all(make_bitstream(tiny, frame_count=5, seed=1))
    assert not torch.equal(a, b)


def test_streaming_chunks_give_the_same_frames(tiny, decoder):
    bs = make_bitstream(tiny, frame_count=9)
    data = to_bytes(bs)
    parser = StreamParser()

    def items():
        for i in range(0, len(data), 333):
            yield from parser.feed(data[i:i + 333])
        parser.close()

    streamed = torch.cat([s.frames for s in decoder.stream(items())])
    assert torch.equal(streamed, decoder.decode_all(bs))


def test_truncated_stream_yields_the_intact_segments_first(tiny, decoder):
    bs = make_bitstream(tiny, frame_count=9)
    data = to_bytes(bs, entropy="none")
    cut = data[: len(data) - 2000]  # inside the last keyframe record
    parser = StreamParser()
    got = []
    with pytest.raises(BitstreamError) as ei:
        def items():
            yield from parser.feed(cut)
            parser.close()
        for seg in decoder.stream(items()):
            got.append(seg.frames)
    assert ei.value.partial is not None and len(ei.value.partial.keyframes) == 2
    assert torch.equal(torch.cat(got), decoder.decode_all(bs)[:5])


def test_model_mismatch_warns_loudly(tiny, decoder):
    bs = make_bitstream(tiny, frame_count=1)
    other = Header(bs.header.config, 1, ModelIdentity("other", b"\x01" * 16))
    with pytest.warns(UserWarning, match="MODEL MISMATCH"):
        decoder.decode_all(Bitstream(other, bs.init, bs.keyframes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoder.decode_all(bs)  # same model: silent


def test_public_decode(tiny, tmp_path):
    bs = make_bitstream(tiny, frame_count=6)
    path = tmp_path / "c.promptus"
    promptus.write(path, bs)
    frames = promptus.decode(path, model="tiny", device="cpu")
    assert frames.shape == (6, 64, 64, 3)
    assert torch.equal(frames, Decoder(make_backend("torch", tiny, "cpu", batch=bs.header.interval, size=bs.header.width)).decode_all(bs))


# ---- hostile inputs (issue 9 audit): headers beyond the limits or the model never reach the decoder;
# short clips

def eager(tiny, bs: Bitstream, **kw) -> Decoder:
    """The reference decoder (the eager backend has no fixed batch: it never pads)."""
    backend = make_backend("eager", tiny, "cpu", batch=bs.header.interval, size=bs.header.width)
    return Decoder(backend, tiny.identity(), **kw)


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
