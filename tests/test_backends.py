"""Backends and the pipelined decoder on the CPU with the tiny model."""

import pytest
import torch

from promptus.backends import CompileBackend, TorchBackend, clip_batch, compile_status, make_backend, tensorrt_status
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


@pytest.mark.slow  # 6 s on 2 cores: full tier
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


@pytest.mark.gpu  # CUDA-graph replay; skipped with its reason where PyTorch sees no CUDA GPU
def test_cuda_graph_matches_eager_on_gpu(tiny, clip):
    eager = Decoder(make_backend("eager", tiny, "cuda", **for_clip(clip))).decode_all(clip)
    graph = Decoder(make_backend("torch", tiny, "cuda", **for_clip(clip))).decode_all(clip)
    assert (graph.int() - eager.int()).abs().max() <= 2


@pytest.mark.slow  # 9 s on 2 cores: full tier
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


# ----------------------------------------------------------------- registry and the clip → backend function


def test_registry_gives_every_list_and_choice():
    from promptus import backends
    from promptus.commands import bench as bench_cmd
    from promptus.commands.encode import CLOSED_LOOP_BACKENDS
    from promptus.studio.settings import STUDIO_BACKENDS

    names = backends.backend_names()
    assert backends.BACKENDS == ("auto", *names)
    assert [e.name for e in backends.auto_order()] == ["tensorrt", "aoti", "compile", "torch"]
    assert STUDIO_BACKENDS == CLOSED_LOOP_BACKENDS == tuple(reversed(names)) and STUDIO_BACKENDS[0] == "eager"
    assert list(bench_cmd.BENCH_BACKENDS) == backends.bench_defaults("cuda") == ["eager", "torch", "compile", "aoti",
                                                                                "tensorrt"]
    assert bench_cmd.CPU_DEFAULTS["backends"] == ["eager", "torch"]
    assert backends.quick_backends("cuda") == ["torch", "compile"] and backends.quick_backends("cpu") == ["torch"]
    assert {e.name for e in backends.backend_entries() if e.keeps_artifacts} == {"tensorrt", "compile", "aoti"}
    aoti = backends.backend_entry("aoti")  # auto uses it on CUDA alone, where it pays for its build
    assert aoti.auto_available(torch.device("cpu"))[0] is False
    assert aoti.auto_available(torch.device("cuda")) == aoti.available(torch.device("cuda"))
    with pytest.raises(PromptusError, match="unknown backend 'fast'.*auto, tensorrt"):
        backends.backend_entry("fast")


def test_a_registered_backend_is_one_entry_away(tiny, clip, reference, monkeypatch):
    """One entry: make_backend, auto, the bench's defaults and the commands' choices all see it."""
    from promptus import backends
    from promptus.backends import registry
    from promptus.commands.main import build_parser

    made = []

    def factory(models, device, dtype, *, batch, size, engine_dir, offload_models, auto):
        made.append((batch, size, auto))
        b = TorchBackend(models.unet, models.taesd.decoder, device, dtype)
        b.name = "plain"
        return b

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    backends.register_backend(backends.BackendEntry("plain", factory, auto_priority=-1, bench_cpu=True))
    with pytest.raises(PromptusError, match="already registered"):
        backends.register_backend(backends.BackendEntry("plain", factory))
    assert backends.backend_names(auto=True)[:2] == ("auto", "plain")
    assert "plain" in backends.bench_defaults("cpu")
    frames = Decoder(backends.backend_for_clip(clip, tiny, name="plain", device="cpu")).decode_all(clip)
    assert torch.equal(frames, reference)
    assert backends.make_backend("auto", tiny, "cpu", batch=4, size=64).name == "plain"
    assert made == [(4, 64, False), (4, 64, True)]
    args = build_parser().parse_args(["decode", "x.promptus", "-o", "out", "--backend", "plain"])
    assert args.backend == "plain"


def test_auto_skips_an_entry_that_declines(tiny, monkeypatch, caplog):
    import logging

    from promptus import backends
    from promptus.backends import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    backends.register_backend(backends.BackendEntry("declines", lambda *a, **kw: None, auto_priority=-2))
    backends.register_backend(backends.BackendEntry(
        "absent", lambda *a, **kw: pytest.fail("never built"), auto_priority=-3,
        available=lambda device: (False, "not installed here")))
    with caplog.at_level(logging.INFO, logger="promptus.backends"):
        assert backends.make_backend("auto", tiny, "cpu", batch=4, size=64).name == "torch"
    assert "not absent (not installed here)" in caplog.text
    with pytest.raises(PromptusError, match="absent backend cannot run here: not installed here; use --backend"):
        backends.make_backend("absent", tiny, "cpu", batch=4, size=64)


def test_one_batch_formula_for_every_clip():
    from promptus.backends import clip_batch
    from promptus.bitstream import Header
    from promptus.config import CodecConfig, ModelIdentity

    cfg = CodecConfig(interval=100)  # 512 px: MAX_BATCH_PIXELS allows 64 frames
    assert clip_batch(cfg) == cfg.segment_batch() == 64
    assert clip_batch(Header(cfg, 1001, ModelIdentity.unknown())) == 64
    assert clip_batch(Header(CodecConfig(), 4, ModelIdentity.unknown())) == 3  # a 4-frame clip: segments of 3
    assert clip_batch(CodecConfig()) == 10
    with pytest.raises(PromptusError, match="header"):
        clip_batch("clip.promptus")


def test_torch_backend_on_cuda_is_prepared_for_the_capped_batch(tiny, monkeypatch):
    """Interval 100 at 512 px: the CUDA torch backend pads to 64, the memory cap, not back up to 100."""
    from promptus import backends
    from promptus.bitstream import Header
    from promptus.config import CodecConfig, ModelIdentity

    seen = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

        def describe(self):
            return "recorder"

    monkeypatch.setattr(backends, "TorchBackend", Recorder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve_device; nothing runs on the device
    header = Header(CodecConfig(interval=100), 1001, ModelIdentity.unknown())
    backends.backend_for_clip(header, tiny, name="torch", device="cuda")
    assert seen["batch"] == 64 and seen["cuda_graph"] is True


def test_memory_cap_holds_for_every_backend_call(tiny, monkeypatch):
    """Every call the padding backend makes stays within MAX_BATCH_PIXELS when prepared by backend_for_clip;
    prepared for the interval (the old call sites) it padded the capped batches back up."""
    import promptus.config
    from promptus.backends import clip_batch

    from test_decoder import make_bitstream

    monkeypatch.setattr(promptus.config, "MAX_BATCH_PIXELS", 3 * 64 * 64)  # 3 frames of 64 px per batch
    bs = make_bitstream(tiny, frame_count=17, interval=8)
    assert clip_batch(bs) == 3
    reference = Decoder(make_backend("eager", tiny, "cpu", batch=8, size=64)).decode_all(bs)

    def calls(batch):
        b = TorchBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, batch=batch)  # pads as on CUDA
        shapes = []
        run = b._run_segment
        monkeypatch.setattr(b, "_run_segment", lambda zp, n, m, c, o: shapes.append(c.shape[0]) or run(zp, n, m, c, o))
        frames = Decoder(b).decode_all(bs)
        return shapes, frames

    shapes, frames = calls(clip_batch(bs))
    assert max(shapes) == 3 and shapes.count(3) == len(shapes) - 1  # frame 0 alone, then padded batches of 3
    diff = (frames.int() - reference.int()).abs()
    assert frames.shape == reference.shape and diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    old, _ = calls(bs.header.interval)
    assert max(old) == 8  # what backend_for_clip prevents


@pytest.mark.slow  # one AOTInductor build of the tiny step: ~30-40 s on 2 cores
def test_aoti_backend_builds_stores_and_reloads_the_step(tiny, clip, reference, tmp_path, caplog):
    """The aoti backend: exported and compiled once, stored in the engine folder, loaded by torch's C++ loader
    in a new backend without building again; the frames within rounding of the eager decoder's, and identical
    from one backend to the next (what a closed loop on one backend needs)."""
    import logging

    from promptus.backends.aoti_backend import AOTI_DECODER, aoti_problem
    from promptus.backends.artifact_cache import list_artifacts

    why = aoti_problem(torch.device("cpu"))
    if why:
        pytest.skip(f"the aoti backend cannot run here: {why}")
    engines = str(tmp_path / "engines")
    first = make_backend("aoti", tiny, "cpu", engine_dir=engines, **for_clip(clip))
    frames = Decoder(first, tiny.identity()).decode_all(clip)
    assert first.prepared[0] == "built" and len(first._mixes) == 1  # the mix weight made once, not per segment
    diff = (frames.int() - reference.int()).abs()
    assert frames.shape == reference.shape and diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    entries = [e for e in list_artifacts(engines) if e.kind is AOTI_DECODER]
    assert len(entries) == 1 and entries[0].key.mechanism == "aoti"
    with caplog.at_level(logging.INFO, logger="promptus"):
        again = make_backend("aoti", tiny, "cpu", engine_dir=engines, **for_clip(clip))
        assert torch.equal(Decoder(again, tiny.identity()).decode_all(clip), frames)
    assert again.prepared[0] == "loaded" and "compiling" not in caplog.text
    from promptus.schedule import OneStep

    with pytest.raises(PromptusError, match="prepared for 4"):
        again.segment(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), 0.1, torch.zeros(5, 77, 1024), OneStep.at(999))


@pytest.mark.slow  # one AOTInductor build of the tiny step
def test_engines_build_aoti_then_list(tmp_path, capsys):
    from promptus.backends.aoti_backend import aoti_problem
    from promptus.commands.main import main

    why = aoti_problem(torch.device("cpu"))
    if why:
        pytest.skip(f"the aoti backend cannot run here: {why}")
    args = ["engines", "build", "--backend", "aoti", "--model", "tiny", "--device", "cpu", "--size", "64",
            "--batch", "3", "--engine-dir", str(tmp_path)]
    assert main(args) == 0
    assert "(built," in capsys.readouterr().out
    assert main(args) == 0
    assert "loaded (already built)" in capsys.readouterr().out
    assert main(["engines", "list", "--engine-dir", str(tmp_path)]) == 0
    assert "AOTInductor decoder" in capsys.readouterr().out


def test_aoti_direct_start_falls_back_on_a_package_that_does_not_load(tmp_path, caplog):
    """A stored entry whose bytes pass the cache's checksum but are no package: no direct start (the networks'
    path then loads, evicts and rebuilds it), a warning, no traceback."""
    import logging

    from promptus.backends.aoti_backend import AOTI_DECODER, MECHANISM, AotiBackend, aoti_problem
    from promptus.backends.artifact_cache import ArtifactCache
    from promptus.backends.compile_cache import CompileOptions, make_key, resolve_options

    if aoti_problem(torch.device("cpu")) and not hasattr(torch._C, "_aoti"):
        pytest.skip("this torch has no AOTInductor loader")
    options = resolve_options(CompileOptions(), None, "cpu", announce=False)
    key = make_key("ab" * 8, batch=4, size=64, dtype=torch.float32, timestep=999, device=torch.device("cpu"),
                   mechanism=MECHANISM, options=options, kind=AOTI_DECODER)
    ArtifactCache(AOTI_DECODER, tmp_path).store(key, b"PK\x03\x04 not a package")
    (tmp_path / "u.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="promptus"):
        got = AotiBackend.from_files(architecture="ab" * 8, prefix_problem=None, unet_file=tmp_path / "u.safetensors",
                                     taesd_file=tmp_path / "u.safetensors", device="cpu", dtype=torch.float32,
                                     batch=4, size=64, timestep=999, engine_dir=str(tmp_path))
    assert got is None and "did not load" in caplog.text
    assert AotiBackend.from_files(architecture="cd" * 8, prefix_problem=None, unet_file=tmp_path / "u.safetensors",
                                  taesd_file=tmp_path / "u.safetensors", device="cpu", dtype=torch.float32, batch=4,
                                  size=64, timestep=999, engine_dir=str(tmp_path)) is None  # nothing stored


def _fake_compiler(folder, name: str, source: str):
    """A 'compiler' that builds ``source`` (C++) into whatever library it is asked for, with the real g++."""
    import shutil
    import stat

    real = shutil.which("g++") or shutil.which("c++")
    if real is None:
        pytest.skip("no C++ compiler on PATH: the compiler probe cannot be tried here")
    (folder / f"{name}.cpp").write_text(source)
    script = folder / name
    script.write_text(f'#!/bin/sh\nout=""\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                      f'exec {real} -shared -fPIC "{folder / name}.cpp" -o "$out"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.mark.slow  # a few compiles and fresh Pythons that import torch: ~20 s on 2 cores
def test_aoti_compiler_probe_passes_over_a_compiler_whose_libraries_crash(tmp_path, monkeypatch, caplog):
    """The H100 host's failure, made here: a compiler whose libraries crash the process that loads them. The probe
    says so (in a child process: this one lives on), the next compiler is used with a warning, and where no compiler
    passes, the build stops with an error that says what to do, before anything is exported."""
    import logging

    import torch._inductor.cpp_builder as cpp_builder

    from promptus.backends import aoti_backend
    from promptus.backends.aoti_backend import aoti_compiler, compiler_probe

    crashing = _fake_compiler(tmp_path, "crashcxx", 'extern "C" int promptus_probe(void) '
                                                    '{ volatile int *p = 0; return *p; }')
    wrong = _fake_compiler(tmp_path, "wrongcxx", 'extern "C" int promptus_probe(void) { return 1; }')
    assert "crashed" in compiler_probe(crashing) and "signal" in compiler_probe(crashing)
    assert "failed" in compiler_probe(wrong)
    assert "could not run it" in compiler_probe(str(tmp_path / "crashcxx.cpp"))  # not executable: says so
    assert "could not build the probe" in compiler_probe("false")
    good = compiler_probe("g++") is None
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda *a, **k: crashing)
    aoti_compiler.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="promptus"):
            cxx, why = aoti_compiler()
        if good:
            assert why is None and cxx != crashing and "crashcxx" in caplog.text
        monkeypatch.setattr(aoti_backend, "compiler_probe", lambda cxx: "its library crashed (made up)")
        aoti_compiler.cache_clear()
        cxx, why = aoti_compiler()
        assert cxx is None and "no C++ compiler here" in why and "PROMPTUS_AOTI_CXX" in why
        monkeypatch.setenv("PROMPTUS_AOTI_CXX", "/opt/my/g++")
        aoti_compiler.cache_clear()
        assert aoti_compiler() == ("/opt/my/g++", None)  # named by the user: used unprobed
    finally:
        aoti_compiler.cache_clear()


def test_aoti_build_stops_with_a_clear_error_when_no_compiler_passes(tiny, tmp_path, monkeypatch):
    from promptus.backends import aoti_backend
    from promptus.backends.aoti_backend import AotiBackend, aoti_compiler
    from promptus.schedule import OneStep

    monkeypatch.setattr(aoti_backend, "compiler_probe", lambda cxx: "its library crashed (made up)")
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("exported before the compiler check"))
    aoti_compiler.cache_clear()
    try:
        backend = AotiBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, batch=3,
                              engine_dir=str(tmp_path), progress=False)
        with pytest.raises(PromptusError, match="no C.. compiler here.*--backend compile"):
            backend.prepare(64, OneStep.at(999))
    finally:
        aoti_compiler.cache_clear()
    assert not list(tmp_path.rglob("*.pt2"))


def test_auto_passes_aoti_on_when_its_package_cannot_be_made(tiny, clip, reference, tmp_path, monkeypatch,
                                                              caplog):
    """auto tries aoti first where it may (CUDA; made to say yes on this CPU machine): a package that cannot be
    built sends auto on to the next backend, with the reason logged; a backend named aoti raises instead."""
    import dataclasses
    import logging

    from promptus import backends
    from promptus.backends import aoti_backend, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    entry = backends.backend_entry("aoti")
    backends.register_backend(dataclasses.replace(entry, auto_available=lambda device: (True, "")), replace=True)
    monkeypatch.setattr(aoti_backend, "aoti_compiler", lambda: (None, "no C++ compiler here makes working libraries"))
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("exported without a compiler"))
    with caplog.at_level(logging.INFO, logger="promptus"):
        made = backends.make_backend("auto", tiny, "cpu", engine_dir=str(tmp_path), **for_clip(clip))
    assert made.name == "torch" and "aoti failed, trying the next backend" in caplog.text
    assert torch.equal(Decoder(made, tiny.identity()).decode_all(clip), reference)
    with pytest.raises(PromptusError, match="no C.. compiler here"):
        backends.make_backend("aoti", tiny, "cpu", engine_dir=str(tmp_path), **for_clip(clip)).prepare(64)


def test_aoti_under_auto_runs_the_step_uncompiled_when_a_later_package_fails(tiny, clip, reference, tmp_path,
                                                                            monkeypatch, caplog):
    """Once auto has chosen aoti, a package it cannot make later (another timestep) does not fail the decode: the
    segment step runs uncompiled, with a warning, and gives the eager decoder's frames within rounding."""
    import logging

    from promptus.backends import aoti_backend
    from promptus.backends.aoti_backend import AotiBackend

    monkeypatch.setattr(aoti_backend, "aoti_compiler", lambda: (None, "no C++ compiler here makes working libraries"))
    backend = AotiBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, batch=clip_batch(clip),
                          engine_dir=str(tmp_path), progress=False, fallback=True)
    with caplog.at_level(logging.WARNING, logger="promptus"):
        frames = Decoder(backend, tiny.identity()).decode_all(clip)
    assert backend.prepared[0] == "uncompiled" and "running the segment step uncompiled" in caplog.text
    diff = (frames.int() - reference.int()).abs()
    assert frames.shape == reference.shape and diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert not list(tmp_path.rglob("*.pt2"))


def test_decode_start_prepares_for_the_backend_auto_will_try_first(monkeypatch):
    """What load_decoder prepares for (aoti's direct start, the compile step's preload) follows auto's order."""
    from promptus import backends, startup

    monkeypatch.setattr(backends, "tensorrt_status", lambda device: (False, "not installed"))
    assert startup._first_choice("auto", torch.device("cpu")) == "torch"
    assert startup._first_choice("compile", torch.device("cpu")) == "compile"
    if backends.backend_entry("aoti").available(torch.device("cuda"))[0]:
        assert startup._first_choice("auto", torch.device("cuda")) == "aoti"


def test_a_package_that_does_not_load_in_a_fresh_python_is_not_stored(tiny, tmp_path, monkeypatch):
    """Each new package is loaded once in a fresh Python before it is stored: one that fails there (or crashes it,
    as every package from the H100 host's /opt/gcc compiler did) gives a clear error and leaves no entry behind."""
    import signal

    from promptus.backends import aoti_backend
    from promptus.backends.aoti_backend import AotiBackend, aoti_compiler, package_load_problem
    from promptus.schedule import OneStep

    if not hasattr(torch._C, "_aoti"):
        pytest.skip("this torch has no AOTInductor loader")
    cpu = torch.device("cpu")
    assert "could not load it" in package_load_problem(b"PK\x03\x04 not a package", cpu)
    monkeypatch.setattr(aoti_backend, "_LOAD_CHECK", f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})")
    assert package_load_problem(b"anything", cpu) == f"loading it crashed a fresh Python (signal {int(signal.SIGSEGV)})"
    monkeypatch.setattr(aoti_backend, "compiler_probe", lambda cxx: None)
    monkeypatch.setattr(AotiBackend, "_build", lambda self, step, size, cxx: b"PK\x03\x04 built, but crashes")
    aoti_compiler.cache_clear()
    try:
        backend = AotiBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, batch=3,
                              engine_dir=str(tmp_path), progress=False)
        with pytest.raises(PromptusError, match=r"does not load: loading it crashed .*not stored"):
            backend.prepare(64, OneStep.at(999))
    finally:
        aoti_compiler.cache_clear()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
