"""TensorRT engines: the cache (keys, corruption, list/clean), real tensorrt_rtx builds of the
tiny components on the CPU, the CLI, tensorrt_status, and the backend's batching.

No machine here can *run* an engine (tensorrt_rtx refuses Hopper GPUs; the CPU machines
have no CUDA): the execution tests at the end skip with that reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from promptus.backends import trt_build, trt_cuda, trt_runtime
from promptus.backends.engine_cache import EngineCache, EngineKey, clean_engines, list_engines
from promptus.backends.tensorrt import (
    PORTABLE, Engine, TensorRTBackend, TensorRTError, TensorRTFlavour, TensorRTNotInstalledError, engine_key,
    find_tensorrt, get_or_build, resolve_compute_capability, tensorrt_status,
)
from promptus.backends.torch_backend import TorchBackend
from promptus.commands import engines as engines_command
from promptus.errors import PromptusError

BATCH, SIZE = 2, 64


def rtx_or_skip() -> TensorRTFlavour:
    try:
        return find_tensorrt("tensorrt_rtx")
    except TensorRTNotInstalledError as e:
        print(f"SKIP reason: {e}")
        pytest.skip(f"tensorrt_rtx is not importable: {e}")


def fake_flavour(name="tensorrt_rtx", version="1.7.1.116", sms=("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")):
    """A stand-in for an imported TensorRT module: only what key and status logic read."""
    module = SimpleNamespace(ComputeCapability=SimpleNamespace(__members__={s: s for s in ("NONE", "CURRENT", *sms)}))
    return TensorRTFlavour(name, f"fake_{name}", version, module)


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def fake_gpu(monkeypatch, cc=(9, 0), name="NVIDIA H100 80GB HBM3"):
    """PyTorch sees one GPU; the engine code's own CUDA calls go to a recorder (tests/fake_tensorrt.py)."""
    from fake_tensorrt import Events, FakeCuda

    monkeypatch.setattr(trt_cuda, "CUDA", FakeCuda(Events(), device_count=1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)


# ---------------------------------------------------------------------------------
# Keys and the cache
# ---------------------------------------------------------------------------------

BASE_KEY = EngineKey(model_digest="0" * 32, component="unet", batch=10, size=512, precision="fp16",
                     flavour="tensorrt_rtx", trt_version="1.7.1.116", compute_capability=PORTABLE)
CHANGES = {
    "model_digest": "1" * 32, "component": "taesd_decoder", "batch": 2, "size": 256, "precision": "fp32",
    "flavour": "tensorrt", "trt_version": "1.7.2.1", "compute_capability": "sm89", "gpu": "NVIDIA L4",
    "graph_version": 99,
}


def test_every_key_field_changes_the_key():
    assert set(CHANGES) == set(BASE_KEY.as_dict())  # the test covers every field
    seen = {BASE_KEY.digest}
    for field, value in CHANGES.items():
        key = EngineKey(**{**BASE_KEY.as_dict(), field: value})
        assert key.digest not in seen and key.stem != BASE_KEY.stem, field
        seen.add(key.digest)
    assert EngineKey.from_dict(json.loads(json.dumps(BASE_KEY.as_dict()))) == BASE_KEY
    for bad in ({**BASE_KEY.as_dict(), "batch": "10"}, {**BASE_KEY.as_dict(), "extra": 1}, [1]):
        with pytest.raises(ValueError):
            EngineKey.from_dict(bad)


@pytest.mark.parametrize("field", list(CHANGES))
def test_cache_misses_on_any_key_change(tmp_path, field):
    cache = EngineCache(tmp_path)
    cache.store(BASE_KEY, b"engine bytes")
    assert cache.lookup(BASE_KEY) == cache.engine_path(BASE_KEY)
    other = EngineKey(**{**BASE_KEY.as_dict(), field: CHANGES[field]})
    assert cache.lookup(other) is None  # → the caller builds
    assert cache.lookup(BASE_KEY) is not None  # and the first entry is untouched


def _damage(cache, key, how):
    engine, sidecar = cache.engine_path(key), cache.sidecar_path(key)
    if how == "flipped byte":
        data = bytearray(engine.read_bytes())
        data[len(data) // 2] ^= 0xFF
        engine.write_bytes(bytes(data))
    elif how == "truncated engine":
        engine.write_bytes(engine.read_bytes()[:-7])
    elif how == "engine missing":
        engine.unlink()
    elif how == "sidecar missing":
        sidecar.unlink()
    elif how == "sidecar not JSON":
        sidecar.write_text('{"format": 1, "key": ')
    elif how == "sidecar of another key":
        meta = json.loads(sidecar.read_text())
        meta["key"]["batch"] = 3
        sidecar.write_text(json.dumps(meta))
    elif how == "sidecar of another format":
        meta = json.loads(sidecar.read_text())
        meta["format"] = 0
        sidecar.write_text(json.dumps(meta))


DAMAGE = ["flipped byte", "truncated engine", "engine missing", "sidecar missing", "sidecar not JSON",
          "sidecar of another key", "sidecar of another format"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_entries_are_not_trusted(tmp_path, how, caplog):
    cache = EngineCache(tmp_path)
    cache.store(BASE_KEY, bytes(range(256)) * 10)
    _damage(cache, BASE_KEY, how)
    with caplog.at_level(logging.WARNING, logger="promptus.backends.engine_cache"):
        assert cache.lookup(BASE_KEY) is None
    assert "rebuilt" in caplog.text
    assert list(tmp_path.iterdir()) == []  # the damaged entry is gone


@pytest.fixture
def deadline():
    """Fail (rather than hang) when a cache read blocks: a reader of /dev/zero or a FIFO never ends."""
    import signal

    def expired(*_):
        raise TimeoutError("the engine cache read blocked")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_cache_reads_only_regular_files_and_only_the_recorded_size(tmp_path, deadline, special, caplog):
    import os

    cache = EngineCache(tmp_path)
    cache.store(BASE_KEY, b"")  # a sidecar that vouches for 0 bytes: reading until EOF would never end
    engine = cache.engine_path(BASE_KEY)
    engine.unlink()
    if special == "fifo":
        os.mkfifo(engine)
    else:
        engine.symlink_to(special)
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(BASE_KEY) is None
        assert cache.read(BASE_KEY) is None
    assert "not a regular file" in caplog.text
    assert [e.status for e in list_engines(tmp_path)] in ([], ["corrupt"], ["orphan"])
    clean_engines(tmp_path, everything=True)


def test_a_deeply_nested_sidecar_is_a_clean_miss(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    cache.store(BASE_KEY, b"engine")
    cache.sidecar_path(BASE_KEY).write_text("[" * 200_000 + "]" * 200_000)
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(BASE_KEY) is None  # not RecursionError
    assert "not readable JSON" in caplog.text
    cache.store(BASE_KEY, b"engine")
    cache.sidecar_path(BASE_KEY).write_text("[" * 200_000 + "]" * 200_000)
    assert [e.status for e in list_engines(tmp_path)] == ["corrupt"]


def test_an_engine_path_that_is_a_folder_is_a_clean_error(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(BASE_KEY, b"engine")
    cache.engine_path(BASE_KEY).unlink()
    cache.engine_path(BASE_KEY).mkdir()
    with pytest.raises(PromptusError, match="is a folder"):
        cache.lookup(BASE_KEY)
    assert [e.status for e in list_engines(tmp_path)] == ["corrupt"]


def test_store_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)
    cache.store(BASE_KEY, b"old")

    class Boom(Exception):
        pass

    def failing_replace(src, dst):
        raise Boom

    monkeypatch.setattr("promptus.backends.engine_cache.os.replace", failing_replace)
    with pytest.raises(Boom):
        cache.store(BASE_KEY, b"new engine")
    monkeypatch.undo()
    assert cache.engine_path(BASE_KEY).read_bytes() == b"old"  # the old entry is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [cache.engine_path(BASE_KEY).name, cache.sidecar_path(BASE_KEY).name])
    with pytest.raises(PromptusError, match="is a file"):
        EngineCache(cache.engine_path(BASE_KEY))


def test_list_and_clean(tmp_path):
    cache = EngineCache(tmp_path)
    keys = [BASE_KEY, EngineKey(**{**BASE_KEY.as_dict(), "batch": 2}),
            EngineKey(**{**BASE_KEY.as_dict(), "trt_version": "1.6.0.0"}),
            EngineKey(**{**BASE_KEY.as_dict(), "size": 256})]
    for k in keys:
        cache.store(k, k.stem.encode())
    _damage(cache, keys[3], "flipped byte")
    (tmp_path / ".tmp-unet.engine.123.abcd").write_bytes(b"half")
    (tmp_path / "stray.engine").write_bytes(b"?")
    entries = {e.path.name: e for e in list_engines(tmp_path)}
    assert [e.status for e in entries.values()].count("ok") == 3
    assert entries[cache.engine_path(keys[3]).name].status == "corrupt"
    assert entries["stray.engine"].status == "orphan"
    assert entries[".tmp-unet.engine.123.abcd"].status == "temp"
    assert entries[cache.engine_path(keys[0]).name].key == keys[0]

    # default: unusable files, and engines of another version of the installed flavour
    gone = clean_engines(tmp_path, installed=[("tensorrt_rtx", "1.7.1.116")], dry_run=True)
    assert all(p.exists() for p in gone)
    gone = clean_engines(tmp_path, installed=[("tensorrt_rtx", "1.7.1.116")])
    assert {p.name for p in gone} == {
        cache.engine_path(keys[2]).name, cache.sidecar_path(keys[2]).name,
        cache.engine_path(keys[3]).name, cache.sidecar_path(keys[3]).name,
        ".tmp-unet.engine.123.abcd", "stray.engine"}
    assert {e.key for e in list_engines(tmp_path)} == {keys[0], keys[1]}
    gone = clean_engines(tmp_path, match=lambda k: k.batch == 2)
    assert [e.key for e in list_engines(tmp_path)] == [keys[0]]
    clean_engines(tmp_path, everything=True)
    assert list(tmp_path.iterdir()) == []
    assert list_engines(tmp_path / "nowhere") == []


# ---------------------------------------------------------------------------------
# get_or_build's cache logic, with a stand-in builder (fast, no TensorRT needed)
# ---------------------------------------------------------------------------------


@pytest.fixture
def counted_builds(monkeypatch):
    """Replace export and build by stand-ins that count calls and return distinct bytes."""
    calls = []

    def export(models, component, path, **kw):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"onnx")
        return path

    def build(onnx_path, flavour, *, compute_capability, precision, **options):
        calls.append((onnx_path.name, compute_capability, precision))
        return f"engine {len(calls)} {onnx_path.name}".encode()

    monkeypatch.setattr(trt_build, "export_component", export)
    monkeypatch.setattr(trt_build, "build_engine", build)
    return calls


def test_get_or_build_rebuilds_exactly_when_the_key_changes(tiny, tmp_path, counted_builds, monkeypatch, caplog):
    from promptus.models import tiny_models

    no_cuda(monkeypatch)
    rtx = fake_flavour()
    base = dict(batch=BATCH, size=SIZE, dtype=torch.float16, engine_dir=tmp_path, flavour=rtx)
    with caplog.at_level(logging.INFO, logger="promptus.backends.trt_build"):
        first = get_or_build(tiny, "unet", **base)
    assert "building the TensorRT engine for unet" in caplog.text and "built " in caplog.text
    assert len(counted_builds) == 1 and counted_builds[0][1:] == (PORTABLE, "fp16")
    assert get_or_build(tiny, "unet", **base) == first and len(counted_builds) == 1  # cache hit

    variations = [
        dict(models=tiny_models(seed=1)),                       # model digest
        dict(component="taesd_decoder"),                        # component
        dict(batch=4),                                          # batch
        dict(size=128),                                         # size
        dict(dtype=torch.float32),                              # precision
        dict(flavour=fake_flavour(name="tensorrt")),            # flavour (built for "the GPU": sm89 below)
        dict(flavour=fake_flavour(version="1.8.0.0")),          # version
        dict(compute_capability="8.9"),                         # compute capability
    ]
    paths = {first}
    for change in variations:
        kw = {**base, **{k: v for k, v in change.items() if k not in ("models", "component")}}
        models, component = change.get("models", tiny), change.get("component", "unet")
        if kw["flavour"].name == "tensorrt":
            fake_gpu(monkeypatch, cc=(8, 9))  # standard TensorRT needs the GPU it builds for
        n = len(counted_builds)
        path = get_or_build(models, component, **kw)
        assert len(counted_builds) == n + 1, change
        assert path not in paths, change
        paths.add(path)
        assert get_or_build(models, component, **kw) == path and len(counted_builds) == n + 1  # now cached
        no_cuda(monkeypatch)
    assert len(list_engines(tmp_path)) == len(paths) == 1 + len(variations)
    assert all(e.status == "ok" for e in list_engines(tmp_path))


def test_a_portable_engine_serves_the_gpus_it_covers(tiny, tmp_path, counted_builds, monkeypatch):
    rtx = fake_flavour()
    kw = dict(batch=BATCH, size=SIZE, engine_dir=tmp_path, flavour=rtx)
    no_cuda(monkeypatch)
    portable = get_or_build(tiny, "unet", **kw)  # on a machine without a GPU (CI)
    fake_gpu(monkeypatch, cc=(8, 9), name="NVIDIA GeForce RTX 4090")
    assert get_or_build(tiny, "unet", **kw) == portable and len(counted_builds) == 1
    fake_gpu(monkeypatch, cc=(7, 5), name="NVIDIA GeForce RTX 2080 Ti")  # Turing: not in the portable set
    turing = get_or_build(tiny, "unet", **kw)
    assert turing != portable and "_sm75_" in turing.name and len(counted_builds) == 2


@pytest.mark.parametrize("how", DAMAGE)
def test_get_or_build_rebuilds_a_damaged_entry(tiny, tmp_path, counted_builds, monkeypatch, how):
    no_cuda(monkeypatch)
    kw = dict(batch=BATCH, size=SIZE, engine_dir=tmp_path, flavour=fake_flavour())
    path = get_or_build(tiny, "taesd_decoder", **kw)
    key = engine_key(tiny, "taesd_decoder", batch=BATCH, size=SIZE, flavour=kw["flavour"])
    _damage(EngineCache(tmp_path), key, how)
    assert get_or_build(tiny, "taesd_decoder", **kw) == path
    assert len(counted_builds) == 2
    assert [e.status for e in list_engines(tmp_path)] == ["ok"]
    get_or_build(tiny, "taesd_decoder", force=True, **kw)
    assert len(counted_builds) == 3


# ---------------------------------------------------------------------------------
# Flavours, compute capabilities, tensorrt_status
# ---------------------------------------------------------------------------------


def test_find_tensorrt_falls_back_and_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # standard TensorRT absent (as here)
    try:
        found = find_tensorrt()
    except TensorRTNotInstalledError:
        found = None
    if found is not None:
        assert found.name == "tensorrt_rtx" and found.is_rtx
    for name in ("tensorrt_rtx", "tensorrt_rtx_bindings"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TensorRTNotInstalledError) as e:
        find_tensorrt()
    msg = str(e.value)
    assert "TensorRT is not installed" in msg and "pip install tensorrt" in msg
    assert "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings" in msg and isinstance(e.value, PromptusError)
    with pytest.raises(PromptusError, match="unknown TensorRT flavour"):
        find_tensorrt("onnxruntime")


def test_compute_capability_keys(monkeypatch):
    rtx, std = fake_flavour(), fake_flavour(name="tensorrt", version="10.13.0")
    no_cuda(monkeypatch)
    assert resolve_compute_capability(rtx) == PORTABLE  # what tensorrt_rtx builds without a GPU
    assert resolve_compute_capability(rtx, "8.9") == resolve_compute_capability(rtx, "sm89") == "sm89"
    assert resolve_compute_capability(rtx, "12.0") == "sm120"
    with pytest.raises(TensorRTError, match="cannot target compute capability 9.0"):
        resolve_compute_capability(rtx, "9.0")
    with pytest.raises(TensorRTError, match="no CUDA GPU"):
        resolve_compute_capability(std)
    with pytest.raises(TensorRTError, match="portable engines need tensorrt_rtx"):
        resolve_compute_capability(std, PORTABLE)
    with pytest.raises(PromptusError, match="not like 8.9"):
        resolve_compute_capability(rtx, "ampere")
    fake_gpu(monkeypatch, cc=(8, 6), name="NVIDIA GeForce RTX 3090")
    assert resolve_compute_capability(rtx) == "sm86" == resolve_compute_capability(std)
    fake_gpu(monkeypatch, cc=(9, 0))
    assert resolve_compute_capability(rtx) == PORTABLE  # an H100: rtx can only build its portable engine
    assert resolve_compute_capability(std) == "sm90"
    with pytest.raises(TensorRTError, match="builds for the GPU it runs on"):
        resolve_compute_capability(std, "8.9")


def test_real_rtx_lists_its_compute_capabilities():
    rtx = rtx_or_skip()
    supported = rtx.supported_compute_capabilities()
    assert (8, 9) in supported and (12, 0) in supported and (9, 0) not in supported
    print(f"{rtx.describe()} supports compute capabilities {supported}")


def test_tensorrt_status_without_cuda(monkeypatch):
    no_cuda(monkeypatch)
    ok, why = tensorrt_status("cuda")
    assert not ok and why.startswith("no CUDA")
    ok, why = tensorrt_status("cpu")
    assert not ok and "CUDA" in why


def test_tensorrt_status_without_tensorrt(monkeypatch):
    fake_gpu(monkeypatch, cc=(8, 9))
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        monkeypatch.setitem(sys.modules, name, None)
    ok, why = tensorrt_status("cuda")
    assert not ok and "TensorRT is not installed" in why and "pip install" in why


def test_tensorrt_status_with_rtx_on_hopper_and_on_ada(monkeypatch):
    monkeypatch.setattr(trt_build, "find_tensorrt", lambda flavour="auto": fake_flavour())
    fake_gpu(monkeypatch, cc=(9, 0), name="NVIDIA H200")
    ok, why = tensorrt_status("cuda")
    assert not ok
    assert "refuses compute capability 9.0" in why and "NVIDIA H200" in why and "8.9" in why and "12.0" in why
    fake_gpu(monkeypatch, cc=(8, 9), name="NVIDIA GeForce RTX 4090")
    ok, why = tensorrt_status("cuda:0")
    assert ok and "RTX 4090" in why and "tensorrt_rtx 1.7.1.116" in why
    monkeypatch.setattr(trt_build, "find_tensorrt", lambda flavour="auto": fake_flavour(name="tensorrt", version="10.13"))
    fake_gpu(monkeypatch, cc=(9, 0), name="NVIDIA H200")
    assert tensorrt_status("cuda")[0]  # the standard library runs on Hopper


def test_backend_refuses_to_start_where_it_cannot_run(tiny, monkeypatch):
    no_cuda(monkeypatch)
    with pytest.raises(TensorRTError, match="cannot run here: no CUDA"):
        TensorRTBackend(tiny, "cuda", batch=BATCH, size=SIZE)
    with pytest.raises(TensorRTError, match="no CUDA"):
        Engine("x.engine", flavour=fake_flavour(), device="cuda")


def test_runtime_helpers_match_the_rtx_bindings():
    """The API names themselves are checked for both flavours in test_tensorrt_fake.py."""
    rtx = rtx_or_skip()
    m = rtx.module
    assert {n for n in trt_runtime._TORCH_DTYPES} <= set(m.DataType.__members__)
    assert trt_runtime.torch_dtype(m.DataType.HALF) == torch.float16
    assert trt_runtime.torch_dtype(m.DataType.INT64) == torch.int64
    assert not hasattr(m.BuilderFlag, "FP16")  # RTX: strongly typed only, precision comes from the graph
    assert "UNSUPPORTED_CC" in trt_runtime._validity_reasons(m, int(m.EngineInvalidityDiagnostics.UNSUPPORTED_CC))


# ---------------------------------------------------------------------------------
# Real tensorrt_rtx builds on this CPU machine, through the CLI
# ---------------------------------------------------------------------------------


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="promptus")
    engines_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`promptus engines build --model tiny --size 64 --batch 2` into a fresh folder (real tensorrt_rtx)."""
    try:
        find_tensorrt("tensorrt_rtx")
    except TensorRTNotInstalledError as e:
        print(f"SKIP reason: {e}")
        pytest.skip(f"tensorrt_rtx is not importable: {e}")
    d = tmp_path_factory.mktemp("engines")
    t0 = time.perf_counter()
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.cuda, "is_available", lambda: False)  # as on CI, even on a GPU machine
    try:
        assert run_cli("engines", "build", "--model", "tiny", "--size", str(SIZE), "--batch", str(BATCH),
                       "--device", "cpu", "--flavour", "tensorrt_rtx", "--engine-dir", str(d)) == 0
    finally:
        mp.undo()
    print(f"CLI export + build of both tiny components: {time.perf_counter() - t0:.1f} s")
    return d


def test_rtx_builds_both_tiny_components(built):
    entries = list_engines(built)
    assert sorted(e.key.component for e in entries) == ["taesd_decoder", "unet"]
    for e in entries:
        assert e.status == "ok" and e.nbytes > 100_000
        assert (e.key.flavour, e.key.compute_capability, e.key.precision, e.key.batch, e.key.size) == (
            "tensorrt_rtx", PORTABLE, "fp16", BATCH, SIZE)
        print(f"{e.key.component}: {e.nbytes / 1e6:.1f} MB, export {e.sidecar['export_seconds']} s, "
              f"build {e.sidecar['build_seconds']} s")
    assert not [p for p in built.iterdir() if p.name.startswith(".")]  # no temp folders or files left


def test_second_build_is_a_cache_hit(built, tiny, capsys, monkeypatch):
    no_cuda(monkeypatch)
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    monkeypatch.setattr(trt_build, "build_engine", lambda *a, **k: pytest.fail("rebuilt a cached engine"))
    for component in ("unet", "taesd_decoder"):
        get_or_build(tiny, component, batch=BATCH, size=SIZE, engine_dir=built, flavour="tensorrt_rtx")
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before


@pytest.mark.slow  # 4 s on 2 cores: full tier
def test_rtx_builds_for_one_compute_capability_from_a_torchscript_graph(tiny, tmp_path):
    rtx = rtx_or_skip()
    t0 = time.perf_counter()
    path = get_or_build(tiny, "unet", batch=BATCH, size=SIZE, engine_dir=tmp_path, flavour=rtx,
                        compute_capability="8.9", device="cpu", exporter="torchscript")
    print(f"unet for sm89 (TorchScript export): {time.perf_counter() - t0:.2f} s")
    (entry,) = list_engines(tmp_path)
    assert entry.path == path and entry.key.compute_capability == "sm89"


def test_rtx_rejects_a_broken_graph(tmp_path):
    rtx = rtx_or_skip()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(trt_build.EngineBuildError, match="cannot parse"):
        trt_build.build_engine(bad, rtx)


def test_cli_list_and_clean(built, tmp_path, capsys):
    import shutil

    d = tmp_path / "engines"
    shutil.copytree(built, d)
    (d / "leftover.json").write_text("{")
    assert run_cli("engines", "list", "--engine-dir", str(d)) == 0
    out = capsys.readouterr().out
    assert "unet" in out and "taesd_decoder" in out and "portable" in out and "tiny" in out
    assert "orphan" in out and "3 entries" in out
    assert run_cli("engines", "list", "--engine-dir", str(d), "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["status"] for r in rows) == ["ok", "ok", "orphan"]
    assert run_cli("engines", "clean", "--engine-dir", str(d)) == 0
    assert "removed 1 file" in capsys.readouterr().out
    assert run_cli("engines", "clean", "--engine-dir", str(d), "--size", "512", "--dry-run") == 0
    assert "would remove 0 files" in capsys.readouterr().out
    assert run_cli("engines", "clean", "--engine-dir", str(d), "--batch", str(BATCH)) == 0
    assert "removed 4 files" in capsys.readouterr().out
    assert run_cli("engines", "list", "--engine-dir", str(d)) == 0
    assert "no engines" in capsys.readouterr().out


def test_cli_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        run_cli("engines", "build", "--help")
    out = capsys.readouterr().out
    for flag in ("--model", "--size", "--batch", "--engine-dir", "--device", "--compute-capability", "--flavour"):
        assert flag in out
    assert run_cli("engines") == 2


# ---------------------------------------------------------------------------------
# The backend's batching, with a stand-in engine (a test double: it runs torch, not TensorRT)
# ---------------------------------------------------------------------------------


class TorchStandInEngine:
    """Mimics :class:`Engine`'s contract — fixed-batch buffers in the engine precision, feeds
    copied into the first rows, numbers fill an input, outputs overwritten per call — but
    computes with the PyTorch module. It tests the backend's padding, chunking and casts only."""

    def __init__(self, module, spec, batch, size, dtype):
        self.module, self.spec, self.calls = module, spec, 0
        shapes, dtypes = spec.shapes(batch, size), spec.dtypes(dtype)
        self.buffers = {n: torch.full(shapes[n], float("nan")).to(dtypes[n]) if dtypes[n].is_floating_point
                        else torch.zeros(shapes[n], dtype=dtypes[n]) for n in shapes}

    def infer(self, feeds):
        self.calls += 1
        for name, value in feeds.items():
            buf = self.buffers[name]
            if isinstance(value, (int, float)):
                buf.fill_(value)
            else:
                buf[: value.shape[0]].copy_(value)
        args = [self.buffers[n] for n in self.spec.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        self.buffers[self.spec.output_names[0]].copy_(out)
        return {n: self.buffers[n] for n in self.spec.output_names}


@pytest.mark.parametrize("frames", [1, 2, 3, 5])
def test_backend_pads_chunks_and_casts(tiny, frames):
    from promptus.backends.onnx_export import COMPONENTS
    from promptus.schedule import OneStep

    engines = {c: TorchStandInEngine(spec.wrap(tiny).eval(), spec, BATCH, SIZE, torch.float32)
               for c, spec in COMPONENTS.items()}
    backend = TensorRTBackend(tiny, "cpu", torch.float32, batch=BATCH, size=SIZE, engines=engines)
    reference = TorchBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32)
    g = torch.Generator().manual_seed(frames)
    z = torch.randn(frames, 4, SIZE // 8, SIZE // 8, generator=g)
    c = torch.randn(frames, 77, 1024, generator=g)
    eps = backend.denoise(z, 999, c)
    assert eps.dtype == torch.float32 and eps.shape == z.shape
    torch.testing.assert_close(eps, reference.denoise(z, 999, c), atol=1e-5, rtol=1e-5)
    assert engines["unet"].calls == -(-frames // BATCH)  # ceil: chunks of the engine batch
    x0, images = backend.step(z, c, OneStep.at(999))
    ref_x0, ref_images = reference.step(z, c, OneStep.at(999))
    torch.testing.assert_close(x0, ref_x0, atol=1e-4, rtol=1e-4)
    assert images.dtype == torch.uint8 and images.shape == (frames, SIZE, SIZE, 3)
    assert (images.int() - ref_images.int()).abs().max() <= 1
    # results are fresh tensors: the next call does not overwrite them
    again = eps.clone()
    backend.denoise(torch.zeros_like(z), 999, c)
    torch.testing.assert_close(eps, again)
    with pytest.raises(PromptusError, match="built for 64×64"):
        backend.decode(torch.zeros(1, 4, 16, 16))
    assert "batch 2, 64 px" in backend.describe()


# ---------------------------------------------------------------------------------
# Execution on a GPU: skipped on every machine here
# ---------------------------------------------------------------------------------

_RUNNABLE, _WHY = tensorrt_status("cuda")
needs_engine_gpu = pytest.mark.skipif(
    not _RUNNABLE, reason=f"no GPU here can run a TensorRT engine ({_WHY})")


@needs_engine_gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_engines_match_torch_on_the_gpu(tmp_path, cuda_graph):
    from promptus.models import tiny_models

    models = tiny_models().to("cuda", torch.float16)
    backend = TensorRTBackend(models, "cuda", torch.float16, batch=BATCH, size=SIZE, engine_dir=tmp_path,
                              cuda_graph=cuda_graph)
    reference = TorchBackend(models.unet, models.taesd.decoder, "cuda", torch.float16)
    g = torch.Generator().manual_seed(0)
    for frames in (1, 2, 3):
        z = torch.randn(frames, 4, SIZE // 8, SIZE // 8, generator=g).cuda()
        c = torch.randn(frames, 77, 1024, generator=g).cuda()
        for _ in range(3):  # the first call warms up (and with standard TensorRT, captures the graph)
            eps = backend.denoise(z, 999, c)
        torch.testing.assert_close(eps, reference.denoise(z, 999, c), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(backend.decode(z), reference.decode(z), atol=2e-2, rtol=2e-2)


@needs_engine_gpu
def test_engine_reports_its_io(tmp_path):
    from promptus.models import tiny_models

    models = tiny_models()
    path = get_or_build(models, "unet", batch=BATCH, size=SIZE, engine_dir=tmp_path, device="cuda")
    engine = Engine(path, device="cuda").load()
    assert [(t.name, t.shape, t.dtype, t.is_input) for t in engine.io] == [
        ("z", (2, 4, 8, 8), torch.float16, True), ("timestep", (2,), torch.int64, True),
        ("context", (2, 77, 1024), torch.float16, True), ("eps", (2, 4, 8, 8), torch.float16, False)]


def test_backend_takes_batch_and_size_from_the_caller(tiny):
    """No 10/512 fallback: the caller passes the clip's interval and frame size."""
    from promptus.backends.onnx_export import COMPONENTS

    engines = {c: SimpleNamespace(infer=None) for c in COMPONENTS}
    with pytest.raises(TypeError):
        TensorRTBackend(tiny, "cpu", torch.float32, engines=engines)
    with pytest.raises(PromptusError, match="batch must be a positive integer"):
        TensorRTBackend(tiny, "cpu", torch.float32, batch=None, size=64, engines=engines)
    backend = TensorRTBackend(tiny, "cpu", torch.float32, batch=3, size=64, engines=engines)
    assert (backend.batch, backend.size, backend.latent) == (3, 64, 8)
    with pytest.raises(PromptusError, match="engines missing"):
        TensorRTBackend(tiny, "cpu", torch.float32, batch=2, size=64, engines={"unet": engines["unet"]})
