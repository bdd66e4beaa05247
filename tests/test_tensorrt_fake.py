"""The TensorRT backend's control flow against a fake ``tensorrt`` module and a fake CUDA.

These tests check our code's use of the TensorRT API — which calls, on which device and
stream, with which memory, what is cached, which failures rebuild an engine and which
fall back to another backend — not TensorRT itself (see tests/fake_tensorrt.py). No
machine here can execute an engine; the real-GPU tests in test_tensorrt.py skip with
that reason.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import sys

import pytest
import torch

import promptus.backends as backends
from promptus.backends import trt_build, trt_cuda, trt_runtime
from promptus.backends.engine_cache import EngineCache, list_engines
from promptus.backends.onnx_export import OnnxExportError
from promptus.backends.tensorrt import TensorRTBackend
from promptus.backends.trt_build import TensorRTError, TensorRTFlavour, TensorRTNotInstalledError
from promptus.errors import PromptusError

from fake_tensorrt import RTX_API, SCRATCH, STANDARD_API, Events, FakeCuda, fake_export, make_fake_tensorrt, \
    public_names

BATCH, SIZE = 2, 64


class Rig:
    """A fake machine: CUDA GPUs of the given names, one TensorRT flavour, recorded events."""

    def __init__(self, monkeypatch, tmp_path, *, flavour="tensorrt", names=("NVIDIA GeForce RTX 4090",) * 2,
                 cc=(8, 9), driver=(13, 0), cuda_major=13, **fake_kw):
        self.monkeypatch, self.engine_dir, self.names = monkeypatch, tmp_path / "engines", list(names)
        self.events = Events()
        self.cuda = FakeCuda(self.events, device_count=len(names), driver=driver)
        monkeypatch.setattr(trt_cuda, "CUDA", self.cuda)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.cuda.current_device())
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.names))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cc)
        monkeypatch.setattr(torch.cuda, "get_device_name",
                            lambda index=None: self.names[self.cuda.current_device() if index is None else index])
        self.module = make_fake_tensorrt(self.cuda, flavour=flavour, **fake_kw)
        self.flavour = TensorRTFlavour(flavour, self.module.__name__, self.module.__version__, self.module,
                                       cuda_major=cuda_major)
        monkeypatch.setattr(trt_build, "find_tensorrt", lambda flavour="auto": self.flavour)

        def export(models, component, path, **kw):
            self.events.append(("export", component))
            return fake_export(models, component, path, **kw)

        monkeypatch.setattr(trt_build, "export_component", export)

    @property
    def failures(self) -> dict:
        return self.module.failures

    def backend(self, models, device="cuda:1", **kw) -> TensorRTBackend:
        kw = {"batch": BATCH, "size": SIZE, "engine_dir": self.engine_dir, **kw}
        return TensorRTBackend(models, device, torch.float16, **kw)


@pytest.fixture
def rig(monkeypatch, tmp_path):
    return lambda **kw: Rig(monkeypatch, tmp_path, **kw)


# ---------------------------------------------------------------------------------
# The API names: the fake offers only documented ones; the installed flavour has ours
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour,api", [("tensorrt", STANDARD_API), ("tensorrt_rtx", RTX_API)])
def test_the_fake_offers_only_documented_names(flavour, api):
    """A call our code makes that the fake lacks fails these tests; the fake must not invent names."""
    m = make_fake_tensorrt(FakeCuda(Events()), flavour=flavour)
    module_names = {n for n in vars(m) if not n.startswith("_") and n not in ("failures", "api")} | {"__version__"}
    assert module_names <= api["module"], module_names - api["module"]
    for name in module_names - {"__version__"}:
        extra = public_names(getattr(m, name)) - api.get(name, set())
        assert not extra, (name, extra)
    assert public_names(m.ILogger.Severity) <= api["ILogger.Severity"]


def test_the_installed_tensorrt_has_every_name_we_use():
    """Run for whichever flavour is installed: a renamed or removed call fails here, in CI."""
    found = []
    for flavour, api in (("tensorrt", STANDARD_API), ("tensorrt_rtx", RTX_API)):
        try:
            m = trt_build.find_tensorrt(flavour).module
        except TensorRTNotInstalledError as e:
            print(f"SKIP {flavour}: {e}")
            continue
        found.append(flavour)
        missing = {n for n in api["module"] if not hasattr(m, n)}
        assert not missing, (flavour, missing)
        classes = {"Runtime": m.Runtime, "Builder": m.Builder, "OnnxParser": m.OnnxParser,
                   "IBuilderConfig": m.IBuilderConfig, "ICudaEngine": m.ICudaEngine,
                   "IExecutionContext": m.IExecutionContext, "ILogger": m.ILogger}
        if flavour == "tensorrt":
            classes["ITimingCache"] = m.ITimingCache
        else:
            classes |= {"IRuntimeConfig": m.IRuntimeConfig, "IRuntimeCache": m.IRuntimeCache}
        for cls_name, cls in classes.items():
            gone = [n for n in api[cls_name] if not hasattr(cls, n)]
            assert not gone, (flavour, cls_name, gone)
        for enum in ("NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "TensorIOMode", "DataType",
                     "ExecutionContextAllocationStrategy", "CudaGraphStrategy", "EngineValidity",
                     "EngineInvalidityDiagnostics"):
            if enum in api:
                gone = api[enum] - set(getattr(m, enum).__members__)
                assert not gone, (flavour, enum, gone)
        assert api["ILogger.Severity"] <= set(m.ILogger.Severity.__members__)
    if not found:
        pytest.skip("no TensorRT flavour is installed")


# ---------------------------------------------------------------------------------
# Finding 1: decode() and the demo build engines for the clip, not for 512×512 batch 10
# ---------------------------------------------------------------------------------


def _spy_make_backend(monkeypatch):
    seen = []
    real = backends.make_backend

    def spy(name, models, device, *args, **kw):
        seen.append(kw)
        return real("torch", models, "cpu", *args[:1], batch=kw["batch"], size=kw["size"])

    monkeypatch.setattr(backends, "make_backend", spy)
    return seen


def test_decode_prepares_the_backend_for_the_clip(tiny, monkeypatch):
    import promptus
    from promptus.bitstream import to_bytes

    from test_decoder import make_bitstream

    seen = _spy_make_backend(monkeypatch)
    clip = make_bitstream(tiny, frame_count=5, interval=4, size=64)
    frames = promptus.decode(to_bytes(clip), "tiny", device="cpu")
    assert frames.shape == (5, 64, 64, 3)
    assert seen and seen[0].get("batch") == 4 and seen[0].get("size") == 64


def test_demo_prepares_the_backend_for_its_clip(tmp_path, monkeypatch):
    from PIL import Image

    from promptus.commands.main import main
    from synthetic import synthetic_clip

    clip = tmp_path / "clip"
    clip.mkdir()
    for i, f in enumerate(synthetic_clip(3, 32, 32)):
        Image.fromarray(f.numpy()).save(clip / f"{i:05d}.png")
    seen = _spy_make_backend(monkeypatch)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--checkpoints", str(tmp_path / "none"), "--device", "cpu",
                 "--clip", str(clip), "--size", "32", "--rank", "1", "--interval", "2", "--max-frames", "3",
                 "--iters-first", "1", "--iters", "1", "--perceptual", "off"]) == 0
    assert seen[-1].get("batch") == 2 and seen[-1].get("size") == 32


# ---------------------------------------------------------------------------------
# Finding 2: auto falls back tensorrt → compile → torch at any stage; tensorrt alone fails loudly
# ---------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, name, fail=False):
        self.name, self.fail = name, fail

    def __call__(self, *a, **kw):
        if self.fail:
            raise RuntimeError(f"{self.name} failed")
        return self

    def describe(self):
        return self.name


STAGES = {
    "import": lambda r, mp: mp.setattr(trt_build, "find_tensorrt", _not_installed),
    "export packages": lambda r, mp: mp.setitem(sys.modules, "onnx_graphsurgeon", None),
    "driver": lambda r, mp: setattr(r.cuda, "driver", (12, 4)),
    "export": lambda r, mp: mp.setattr(trt_build, "export_component", _failing_export),
    "build": lambda r, mp: r.failures.update(build=True),
    "load": lambda r, mp: r.failures.update(deserialize="fake: Cuda Runtime (out of memory)"),
    "context": lambda r, mp: r.failures.update(context="fake: out of memory allocating the context"),
    "first inference": lambda r, mp: r.failures.update(execute=True),
}
REASONS = {"import": "not installed", "export packages": "onnx", "driver": "driver", "export": "export",
           "build": "build", "load": "out of memory", "context": "context", "first inference": "execute"}


def _not_installed(flavour="auto"):
    raise TensorRTNotInstalledError("TensorRT is not installed (fake)")


def _failing_export(*a, **kw):
    raise OnnxExportError("ONNX export of unet failed (fake)")


@pytest.mark.parametrize("stage", list(STAGES))
def test_auto_falls_back_at_every_stage(tiny, rig, monkeypatch, caplog, stage):
    r = rig()
    STAGES[stage](r, monkeypatch)
    compile_ = _Recorder("compile")
    monkeypatch.setattr(backends, "CompileBackend", compile_)
    monkeypatch.setattr(backends, "TorchBackend", _Recorder("torch"))
    monkeypatch.setattr(backends, "compile_status", lambda device: (True, "fake"))
    with caplog.at_level(logging.INFO, logger="promptus.backends"):
        got = backends.make_backend("auto", tiny, "cuda:1", batch=BATCH, size=SIZE, engine_dir=r.engine_dir)
    assert got is compile_
    assert "tensorrt" in caplog.text and REASONS[stage] in caplog.text.lower(), caplog.text
    with pytest.raises(PromptusError) as e:
        backends.make_backend("tensorrt", tiny, "cuda:1", batch=BATCH, size=SIZE, engine_dir=r.engine_dir)
    assert REASONS[stage] in str(e.value).lower()


def test_auto_falls_back_from_compile_to_torch(tiny, rig, monkeypatch, caplog):
    r = rig()
    r.failures.update(build=True)
    torch_ = _Recorder("torch")
    monkeypatch.setattr(backends, "CompileBackend", _Recorder("compile", fail=True))
    monkeypatch.setattr(backends, "TorchBackend", torch_)
    monkeypatch.setattr(backends, "compile_status", lambda device: (True, "fake"))
    with caplog.at_level(logging.INFO, logger="promptus.backends"):
        assert backends.make_backend("auto", tiny, "cuda:1", batch=BATCH, size=SIZE,
                                     engine_dir=r.engine_dir) is torch_
    assert "compile failed" in caplog.text


def test_auto_takes_tensorrt_when_every_stage_works(tiny, rig):
    r = rig()
    got = backends.make_backend("auto", tiny, "cuda:1", batch=BATCH, size=SIZE, engine_dir=r.engine_dir)
    assert isinstance(got, TensorRTBackend) and (got.batch, got.size) == (BATCH, SIZE)


# ---------------------------------------------------------------------------------
# Finding 3: rebuild only what a rebuild can fix
# ---------------------------------------------------------------------------------

STANDARD_LOAD_ERRORS = {
    "The engine plan file is not compatible with this version of TensorRT, expecting library version 10.13.0.35 "
    "got 10.12.0.36, please rebuild.": True,
    "The engine plan file is generated on an incompatible device, expecting compute 8.6 got compute 8.9, "
    "please rebuild.": True,
    "Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match": True,
    "Cuda Runtime (out of memory)": False,
    "CUDA initialization failure with error: 35. Please check your CUDA installation": False,
    "Cuda Driver (an illegal memory access was encountered)": False,
}


@pytest.mark.parametrize("message,rebuild", list(STANDARD_LOAD_ERRORS.items()))
def test_only_stale_or_malformed_engines_are_rebuilt(tiny, rig, message, rebuild):
    r = rig()
    r.failures["deserialize"] = [message]  # the first load fails, a second would work
    if rebuild:
        r.backend(tiny)
        assert len(r.events.of("build")) == 3  # unet, taesd_decoder, unet again
    else:
        with pytest.raises(TensorRTError, match="could not deserialize"):
            r.backend(tiny)
        assert len(r.events.of("build")) == 1  # no minutes spent on a rebuild that fails the same way


@pytest.mark.parametrize("diagnostics,rebuild", [
    (["VERSION_MISMATCH"], True), (["UNSUPPORTED_CC"], True), (["MALFORMED_ENGINE"], True),
    (["OLD_CUDA_DRIVER"], False), (["INSUFFICIENT_GPU_MEMORY"], False), (["CUDA_ERROR"], False),
    (["VERSION_MISMATCH", "OLD_CUDA_DRIVER"], False),
])
def test_rtx_rebuilds_only_for_version_capability_or_damage(tiny, rig, diagnostics, rebuild):
    r = rig(flavour="tensorrt_rtx", version="1.7.1.116")
    r.failures["validity"] = [diagnostics]
    if rebuild:
        r.backend(tiny)
        assert len(r.events.of("build")) == 3
    else:
        with pytest.raises(TensorRTError, match=diagnostics[-1]):
            r.backend(tiny)
        assert len(r.events.of("build")) == 1


# ---------------------------------------------------------------------------------
# Finding 4: TensorRT-RTX's runtime cache is loaded and saved beside the engine
# ---------------------------------------------------------------------------------


def test_rtx_runtime_cache_spares_the_second_process_its_jit(tiny, rig):
    r = rig(flavour="tensorrt_rtx", version="1.7.1.116")
    r.backend(tiny)
    assert sorted(e[1] for e in r.events.of("jit")) == ["taesd_decoder", "unet"]
    caches = sorted(p.name for p in r.engine_dir.iterdir() if p.name.endswith(".rtcache"))
    assert len(caches) == 2
    again = rig(flavour="tensorrt_rtx", version="1.7.1.116")  # a new process: fresh TensorRT, same folder
    again.backend(tiny)
    assert again.events.of("jit") == [] and len(again.events.of("runtime_cache_deserialize")) == 2
    assert len(again.events.of("build")) == 0
    # cleaning an engine takes its runtime cache along
    from promptus.backends.engine_cache import clean_engines

    clean_engines(r.engine_dir, everything=True)
    assert list(r.engine_dir.iterdir()) == []


# ---------------------------------------------------------------------------------
# Finding 5: every TensorRT call runs with the engine's GPU current
# ---------------------------------------------------------------------------------


def test_inference_runs_on_the_engines_gpu(tiny, rig):
    r = rig()
    backend = r.backend(tiny, device="cuda:1")
    assert r.cuda.current_device() == 0  # the caller's current device is left alone
    unet = backend.engines["unet"]
    for _ in range(3):  # plain, captured, replayed
        unet.infer({"z": torch.zeros(1, 4, 8, 8), "timestep": 999, "context": torch.zeros(1, 77, 1024)})
    runs = r.events.of("execute") + r.events.of("deserialize") + r.events.of("create_context")
    assert runs and {e[2] if e[0] != "deserialize" else e[1] for e in runs} == {1}
    assert all(e[1] == 1 for e in r.events.of("replay"))
    assert all(e[1] == 1 for e in r.events.of("alloc"))


def test_an_engine_enqueues_with_its_gpu_current_whatever_the_caller_has(tiny, rig):
    r = rig()
    path = trt_build.get_or_build(tiny, "taesd_decoder", batch=BATCH, size=SIZE, engine_dir=r.engine_dir,
                                  flavour=r.flavour, device="cuda:1")
    engine = trt_runtime.Engine(path, flavour=r.flavour, device="cuda:1").load().activate()
    with r.cuda.device("cuda:0"):  # the caller works on GPU 0
        engine.infer({"latent": torch.zeros(2, 4, 8, 8)})
    (run,) = r.events.of("execute")
    assert run[2] == 1 and run[3] == engine.stream.cuda_stream and engine.stream.device == 1


# ---------------------------------------------------------------------------------
# Finding 6: PyTorch's cached memory is released before building and before contexts
# ---------------------------------------------------------------------------------


def test_torch_cache_is_released_after_export_and_before_contexts(tiny, rig):
    r = rig()
    r.backend(tiny)
    names = [e[0] for e in r.events]
    for component in ("unet", "taesd_decoder"):
        export = r.events.index(("export", component))
        build = next(i for i, e in enumerate(r.events) if e[0] == "build" and e[1] == component)
        assert "release_cached_memory" in names[export:build], names
    assert "release_cached_memory" in names[names.index("build", names.index("build") + 1):
                                            names.index("create_context")]
    # the builder's workspace is bounded by the memory that is actually free
    assert r.events.of("memory_pool_limit") == [("memory_pool_limit", "WORKSPACE", r.cuda.free)] * 2


# ---------------------------------------------------------------------------------
# Finding 7: one stream and one scratch block for both engines; the PyTorch UNet can leave the GPU
# ---------------------------------------------------------------------------------


def test_engines_share_one_stream_and_one_scratch_block(tiny, rig, monkeypatch):
    r = rig()
    moved = []
    monkeypatch.setattr(tiny.unet, "to", lambda *a, **k: moved.append(("unet", a, k)) or tiny.unet)
    monkeypatch.setattr(tiny.taesd.decoder, "to", lambda *a, **k: moved.append(("decoder", a, k)) or tiny.taesd.decoder)
    backend = r.backend(tiny, offload_models=True)
    contexts = r.events.of("create_context")
    assert [c[3] for c in contexts] == ["USER_MANAGED", "USER_MANAGED"]
    memory = r.events.of("set_device_memory")
    assert len({m[2] for m in memory}) == 1 and {m[3] for m in memory} == {max(SCRATCH.values())}
    assert len(r.events.of("new_stream")) == 1
    streams = {e[3] for e in r.events.of("execute")}
    assert len(streams) == 1 and streams == {r.events.of("new_stream")[0][2]}
    assert [m[0] for m in moved] == ["unet", "decoder"] and all("cpu" in map(str, m[1]) for m in moved)
    assert r.events.index_of("release_cached_memory", last=True) > r.events.index_of("execute", last=True)
    assert backend.describe()


def test_models_stay_by_default(tiny, rig, monkeypatch):
    r = rig()
    monkeypatch.setattr(tiny.unet, "to", lambda *a, **k: pytest.fail("moved the caller's UNet"))
    r.backend(tiny)


# ---------------------------------------------------------------------------------
# Finding 8: the key names the GPU model for standard TensorRT; its warnings are visible
# ---------------------------------------------------------------------------------


def test_standard_engines_are_keyed_by_gpu_model(tiny, rig):
    r = rig(names=("NVIDIA GeForce RTX 4090", "NVIDIA L4"))  # both compute capability 8.9
    a = trt_build.get_or_build(tiny, "taesd_decoder", batch=BATCH, size=SIZE, engine_dir=r.engine_dir,
                               flavour=r.flavour, device="cuda:0")
    b = trt_build.get_or_build(tiny, "taesd_decoder", batch=BATCH, size=SIZE, engine_dir=r.engine_dir,
                               flavour=r.flavour, device="cuda:1")
    assert a != b and len(r.events.of("build")) == 2
    keys = {e.key.gpu for e in list_engines(r.engine_dir)}
    assert keys == {"NVIDIA GeForce RTX 4090", "NVIDIA L4"}


def test_rtx_engines_serve_any_gpu_of_their_targets(tiny, rig):
    r = rig(flavour="tensorrt_rtx", version="1.7.1.116", names=("NVIDIA GeForce RTX 4090", "NVIDIA L4"))
    a = trt_build.get_or_build(tiny, "taesd_decoder", batch=BATCH, size=SIZE, engine_dir=r.engine_dir,
                               flavour=r.flavour, device="cuda:0")
    b = trt_build.get_or_build(tiny, "taesd_decoder", batch=BATCH, size=SIZE, engine_dir=r.engine_dir,
                               flavour=r.flavour, device="cuda:1")
    assert a == b and len(r.events.of("build")) == 1


def test_tensorrt_warnings_are_logged_as_warnings(tiny, rig, caplog):
    r = rig()
    r.failures["warnings"] = ["Using an engine plan file across different models of devices is not recommended"]
    with caplog.at_level(logging.WARNING, logger="promptus.backends"):
        trt_build.get_or_build(tiny, "taesd_decoder", batch=BATCH, size=SIZE, engine_dir=r.engine_dir,
                               flavour=r.flavour, device="cuda:0")
    assert any(rec.levelno == logging.WARNING and "different models of devices" in rec.getMessage()
               for rec in caplog.records)


# ---------------------------------------------------------------------------------
# Finding 9: without STRONGLY_TYPED, FP16 is set only where the flag exists
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fp16_flag", [True, False])
def test_weakly_typed_build_without_fp16_flag(tiny, rig, fp16_flag):
    r = rig(strongly_typed=False, fp16_flag=fp16_flag)
    trt_build.get_or_build(tiny, "taesd_decoder", batch=BATCH, size=SIZE, engine_dir=r.engine_dir,
                           flavour=r.flavour, device="cuda:0")
    (build,) = r.events.of("build")
    assert [f.name for f in build[3]] == (["FP16"] if fp16_flag else [])


# ---------------------------------------------------------------------------------
# Finding 10: a cached engine is read once; standard builds keep a timing cache
# ---------------------------------------------------------------------------------


def test_a_cached_engine_is_read_once(tiny, rig, monkeypatch):
    r = rig()
    trt_build.get_or_build(tiny, "unet", batch=BATCH, size=SIZE, engine_dir=r.engine_dir, flavour=r.flavour,
                           device="cuda:1")
    opened = []
    for owner, name in ((builtins, "open"), (io, "open"), (os, "open")):
        real = getattr(owner, name)

        def counting(file, *a, _real=real, **k):
            if str(file).endswith(".engine"):
                opened.append(str(file))
            return _real(file, *a, **k)

        monkeypatch.setattr(owner, name, counting)
    path, data = trt_build.load_or_build(tiny, "unet", batch=BATCH, size=SIZE, engine_dir=r.engine_dir,
                                         flavour=r.flavour, device="cuda:1")
    assert len(opened) == 1 and bytes(data) == path.read_bytes()


def test_standard_builds_reuse_a_timing_cache(tiny, rig):
    r = rig()
    kw = dict(batch=BATCH, size=SIZE, engine_dir=r.engine_dir, flavour=r.flavour, device="cuda:0")
    trt_build.get_or_build(tiny, "taesd_decoder", **kw)
    trt_build.get_or_build(tiny, "unet", **kw)
    first, second = r.events.of("set_timing_cache")
    assert first[1] == b"" and second[1] == b"[taesd_decoder]"  # the second build starts from the first's
    assert [e[4] for e in r.events.of("build")] == [b"", b"[taesd_decoder]"]
    rtx = rig(flavour="tensorrt_rtx", version="1.7.1.116")
    trt_build.get_or_build(tiny, "taesd_decoder", **{**kw, "flavour": rtx.flavour})
    assert rtx.events.of("set_timing_cache") == []  # a no-op in TensorRT-RTX: not used


# ---------------------------------------------------------------------------------
# The driver and the packages the export needs are part of "can TensorRT run here"
# ---------------------------------------------------------------------------------


def test_status_checks_the_driver_and_the_export_packages(rig, monkeypatch):
    r = rig(driver=(12, 8))
    ok, why = trt_build.tensorrt_status("cuda:0")
    assert not ok and "driver" in why and "CUDA 12.8" in why and "CUDA 13" in why
    r.cuda.driver = (13, 0)
    assert trt_build.tensorrt_status("cuda:0")[0]
    r.cuda.driver = None  # the driver cannot be asked: do not refuse on a guess
    assert trt_build.tensorrt_status("cuda:0")[0]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    ok, why = trt_build.tensorrt_status("cuda:0")
    assert not ok and "onnxruntime" in why


def test_engine_load_refuses_a_folder_and_special_files(rig, tmp_path):
    r = rig()
    folder = tmp_path / "unet.engine"
    folder.mkdir()
    with pytest.raises(TensorRTError, match="not a regular file"):
        trt_runtime.Engine(folder, flavour=r.flavour, device="cuda:0").load()
    if os.path.exists("/dev/zero"):
        link = tmp_path / "zero.engine"
        link.symlink_to("/dev/zero")
        with pytest.raises(TensorRTError, match="not a regular file"):
            trt_runtime.Engine(link, flavour=r.flavour, device="cuda:0").load()
    assert EngineCache  # (cache-side hardening: test_tensorrt.py)
