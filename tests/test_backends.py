"""Backends and the pipelined decoder on the CPU with the tiny model."""

import pytest
import torch

from promptus.backends import CompileBackend, TorchBackend, compile_status, make_backend, tensorrt_status
from promptus.bitstream import iter_records, to_bytes
from promptus.decoder import Decoder
from promptus.errors import BitstreamError, PromptusError
from promptus.pipeline import PipelinedDecoder

from test_decoder import make_bitstream


def for_clip(bs):
    """make_backend's clip arguments, from the header."""
    return dict(batch=bs.header.interval, size=bs.header.width)


@pytest.fixture(scope="module")
def clip(tiny):
    return make_bitstream(tiny, frame_count=10, interval=4)  # segments of 1, 4, 4, 1 frames


@pytest.fixture(scope="module")
def reference(tiny, clip):
    return Decoder(make_backend("eager", tiny, "cpu", **for_clip(clip)), tiny.identity()).decode_all(clip)


def test_backend_parity_on_cpu(tiny, clip, reference):
    backends = [
        make_backend("torch", tiny, "cpu", **for_clip(clip)),
        TorchBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, channels_last=True),
        # Padding the short last segment to the fixed batch must not change its frames.
        TorchBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, batch=4),
        # Dynamo tracing with the aot_eager backend: inductor's C++ compile takes minutes on 2 cores.
        CompileBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, compile_backend="aot_eager", batch=4),
    ]
    for b in backends:
        frames = Decoder(b).decode_all(clip)
        diff = (frames.int() - reference.int()).abs()
        assert frames.shape == reference.shape
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, b.describe()


def test_auto_picks_torch_without_cuda_or_tensorrt(tiny):
    ok, why = tensorrt_status(torch.device("cpu"))
    assert not ok and why
    ok, why = compile_status(torch.device("cpu"))
    assert not ok and "CUDA" in why
    assert make_backend("auto", tiny, "cpu", batch=4, size=64).name == "torch"
    with pytest.raises(PromptusError, match="tensorrt backend cannot run here"):
        make_backend("tensorrt", tiny, "cpu", batch=4, size=64)
    with pytest.raises(PromptusError, match="unknown backend"):
        make_backend("fast", tiny, "cpu", batch=4, size=64)


def test_cuda_graphs_fall_back_on_cpu(tiny):
    b = TorchBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, cuda_graph=True)
    assert b.cuda_graph is False


@pytest.mark.parametrize("to_host", [True, False])
def test_pipelined_decoder_matches_plain(tiny, clip, reference, to_host):
    data = to_bytes(clip)
    import io

    got = {}

    def sink(start, frames):
        got[start] = frames.clone()  # buffers are reused after the call

    n = PipelinedDecoder(Decoder(make_backend("torch", tiny, "cpu", **for_clip(clip))), to_host=to_host).run(
        iter_records(io.BytesIO(data), chunk_size=1000), sink)
    assert n == 10 and sorted(got) == [0, 1, 5, 9]
    assert torch.equal(torch.cat([got[k] for k in sorted(got)]), reference)


def test_pipelined_decoder_keeps_intact_frames_then_raises(tiny, clip, reference):
    import io

    data = to_bytes(clip, entropy="none")[:-1000]  # inside the last keyframe record
    got = []
    with pytest.raises(BitstreamError):
        PipelinedDecoder(Decoder(make_backend("torch", tiny, "cpu", **for_clip(clip)))).run(
            iter_records(io.BytesIO(data)), lambda s, f: got.append(f.clone()))
    assert torch.equal(torch.cat(got), reference[:9])


def test_sink_errors_propagate(tiny, clip):
    def sink(start, frames):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        PipelinedDecoder(Decoder(make_backend("torch", tiny, "cpu", **for_clip(clip)))).run(
            [clip.header, clip.init, *clip.keyframes], sink)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: CUDA-graph replay runs only in the GPU benchmark")
def test_cuda_graph_matches_eager_on_gpu(tiny, clip):
    eager = Decoder(make_backend("eager", tiny, "cuda", **for_clip(clip))).decode_all(clip)
    graph = Decoder(make_backend("torch", tiny, "cuda", **for_clip(clip))).decode_all(clip)
    assert (graph.int() - eager.int()).abs().max() <= 2


def test_realtime_demo_published_flags(tiny, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from promptus.legacy import write_legacy

    bs = make_bitstream(tiny, frame_count=9, interval=4)
    folder = tmp_path / "rank2_interval4"
    write_legacy(bs, folder)  # the release's layout
    script = Path(__file__).resolve().parent.parent / "scripts" / "realtime_demo.py"
    r = subprocess.run([sys.executable, str(script), "-prompt_dir", str(folder), "-batch", "4", "-visualize",
                        "--model", "tiny", "--device", "cpu", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "decoded 9 frames" in r.stdout and (folder / "realtime.mp4").stat().st_size > 0
    r = subprocess.run([sys.executable, str(script), "-prompt_dir", str(folder), "-batch", "10", "--model", "tiny",
                        "--device", "cpu", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "use -batch 4" in r.stderr
