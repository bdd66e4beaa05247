"""The compile backend's stored segment step: key, atomic store, validation, rebuild, list and clean (CPU)."""

import dataclasses
import json
import logging
import math

import pytest
import torch

from promptus.backends import make_backend
from promptus.backends.compile_cache import (
    CompileCache,
    CompileCacheError,
    CompileKey,
    CompileOptions,
    architecture_digest,
    attention_backends,
    attention_problem,
    available_mechanisms,
    clean_compiled,
    list_compiled,
    make_key,
    resolve_options,
)
from promptus.backends.engine_cache import list_engines
from promptus.backends.torch_backend import CompileBackend
from promptus.commands.bench import format_decode_table
from promptus.decoder import Decoder

from test_decoder import make_bitstream


def key(**changes) -> CompileKey:
    k = make_key("ab" * 8, batch=4, size=64, dtype=torch.float32, timestep=999, device=torch.device("cpu"),
                 mechanism="aot_compile", options=CompileOptions())
    return dataclasses.replace(k, **changes)


def test_key_holds_everything_the_artifact_depends_on():
    k = key()
    d = k.as_dict()
    assert d["torch_version"] == str(torch.__version__) and d["gpu"] == "cpu" and d["compute_capability"] == "cpu"
    assert d["dtype"] == "fp32" and d["options"] == CompileOptions().describe()
    assert CompileKey.from_dict(json.loads(json.dumps(d))) == k
    for name, value in (("model_digest", "cd" * 8), ("batch", 5), ("size", 128), ("dtype", "fp16"), ("timestep", 500),
                        ("torch_version", "2.4.0"), ("triton_version", "3.0.0"), ("gpu", "NVIDIA H200"),
                        ("compute_capability", "sm90"), ("mechanism", "cache_artifacts"), ("options", "inductor")):
        other = dataclasses.replace(k, **{name: value})
        assert other.digest != k.digest and other.stem != k.stem, name
    assert k.stem.startswith("segment_b4_64px_fp32_torch-") and k.stem.endswith(k.digest)
    with pytest.raises(ValueError, match="batch"):
        CompileKey.from_dict({**d, "batch": "4"})
    with pytest.raises(ValueError, match="differ"):
        CompileKey.from_dict({**d, "extra": 1})


def test_options_name_their_levers():
    o = CompileOptions(autotune=True, inductor={"conv_1x1_as_mm": True})
    assert "autotune" in o.describe() and "conv_1x1_as_mm=True" in o.describe()
    assert o.inductor_options() == {"max_autotune": True, "coordinate_descent_tuning": True, "conv_1x1_as_mm": True}
    assert CompileOptions(backend="aot_eager", autotune=True).inductor_options() == {}
    assert CompileOptions(inductor={"b": 1, "a": 2}) == CompileOptions(inductor={"a": 2, "b": 1})


def test_attention_lever_is_named_in_the_key_and_off_where_it_cannot_run(tiny, caplog):
    cudnn = CompileOptions(attention="cudnn")
    assert "attention=cudnn" in cudnn.describe() and "attention" not in CompileOptions().describe()
    assert key(options=cudnn.describe()).digest != key().digest
    with pytest.raises(ValueError, match="attention 'fast'"):
        CompileOptions(attention="fast")
    assert attention_problem("default", "cpu") is None
    assert "CUDA" in attention_problem("cudnn", "cpu")
    with caplog.at_level(logging.INFO, logger="promptus"):
        assert resolve_options(cudnn, None, "cpu").attention == "default"
        assert not resolve_options(CompileOptions(), "why", "cpu", announce=False).shared_prefix
        backend = CompileBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, options=cudnn,
                                 compile_backend="aot_eager")
    assert backend.options.attention == "default"
    assert "cudnn attention is off (cuDNN attention runs on CUDA GPUs only)" in caplog.text


def test_attention_backends_prefers_cudnn_inside_and_restores_the_order():
    q = torch.randn(1, 2, 8, 4)
    order = getattr(torch._C, "_get_sdp_priority_order", None)
    before = order() if order else None
    with attention_backends("default"):
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with attention_backends("cudnn"):  # on the CPU the math kernel still answers
        if order:
            from torch.nn.attention import SDPBackend

            assert order()[0] == int(SDPBackend.CUDNN_ATTENTION)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert torch.equal(out, ref)
    if order:
        assert order() == before


def test_architecture_digest_follows_the_architecture_not_the_weights(tiny):
    from diffusers import UNet2DConditionModel

    from promptus.models import tiny_configs, tiny_models

    a = architecture_digest(tiny.unet, tiny.taesd.decoder)
    other = tiny_models(seed=1)
    assert architecture_digest(other.unet, other.taesd.decoder) == a  # other weights: the same artifact serves
    cfg = tiny_configs()["unet"]
    cfg["cross_attention_dim"] = 768
    assert architecture_digest(UNet2DConditionModel.from_config(cfg), tiny.taesd.decoder) != a


def test_store_is_atomic_and_bad_entries_are_removed_with_a_message(tmp_path, caplog):
    cache = CompileCache(tmp_path)
    k = key()
    with caplog.at_level(logging.WARNING):
        assert cache.read(k) is None and not caplog.text  # a plain miss says nothing
    cache.store(k, b"artifact", build_seconds=1.5)
    assert cache.read(k) == b"artifact" and cache.lookup(k) == cache.artifact_path(k)
    assert sorted(p.name for p in cache.dir.iterdir()) == [k.stem + ".bin", k.stem + ".json"]  # no temporaries
    meta = json.loads(cache.sidecar_path(k).read_text())
    assert meta["key"] == k.as_dict() and meta["artifact_bytes"] == 8 and meta["build_seconds"] == 1.5

    cache.artifact_path(k).write_bytes(b"artifacX")  # damaged in place
    with caplog.at_level(logging.WARNING):
        assert cache.read(k) is None
    assert "unusable" in caplog.text and "SHA-256" in caplog.text and "rebuilt" in caplog.text
    assert not cache.artifact_path(k).exists() and not cache.sidecar_path(k).exists()

    cache.store(k, b"artifact")
    cache.artifact_path(k).write_bytes(b"art")
    assert cache.check(k)[1].startswith("artifact file has 3 bytes")
    cache.store(k, b"artifact")
    meta = json.loads(cache.sidecar_path(k).read_text())
    meta["key"]["batch"] = 8
    cache.sidecar_path(k).write_text(json.dumps(meta))
    assert "does not match" in cache.check(k)[1]
    cache.sidecar_path(k).write_text("{not json")
    assert "not readable JSON" in cache.check(k)[1]


def test_engine_folder_that_is_a_file(tmp_path):
    (tmp_path / "engines").write_text("x")
    with pytest.raises(CompileCacheError, match="is a file"):
        CompileCache(tmp_path / "engines")


def test_list_and_clean(tmp_path):
    cache = CompileCache(tmp_path)
    ok, stale, elsewhere, broken = key(), key(torch_version="1.0.0"), key(gpu="NVIDIA H200", compute_capability="sm90"), \
        key(batch=8)
    for k in (ok, stale, elsewhere, broken):
        cache.store(k, b"x" * 10)
    cache.artifact_path(broken).write_bytes(b"y" * 10)
    (cache.dir / "segment_lost.bin").write_bytes(b"o")
    (cache.dir / ".tmp-segment.bin.123.abc").write_bytes(b"t")
    status = {e.path.name: e.status for e in list_compiled(tmp_path)}
    assert status == {ok.stem + ".bin": "ok", stale.stem + ".bin": "stale", elsewhere.stem + ".bin": "ok",
                      broken.stem + ".bin": "corrupt", "segment_lost.bin": "orphan", ".tmp-segment.bin.123.abc": "temp"}
    assert list_engines(tmp_path) == []  # the TensorRT cache never sees (or cleans) compiled steps

    would = clean_compiled(tmp_path, dry_run=True)
    assert {p.name for p in would} == {stale.stem + ".bin", stale.stem + ".json", broken.stem + ".bin",
                                       broken.stem + ".json", "segment_lost.bin", ".tmp-segment.bin.123.abc"}
    assert all(p.exists() for p in would)
    clean_compiled(tmp_path)
    assert {e.path.name for e in list_compiled(tmp_path)} == {ok.stem + ".bin", elsewhere.stem + ".bin"}
    clean_compiled(tmp_path, match=lambda k: k.gpu == "cpu")
    assert [e.key for e in list_compiled(tmp_path)] == [elsewhere]
    clean_compiled(tmp_path, everything=True)
    assert list_compiled(tmp_path) == []


@pytest.mark.skipif("aot_compile" not in available_mechanisms(),
                    reason=f"torch {torch.__version__} has no torch.compile(...).aot_compile (torch >= 2.10)")
@pytest.mark.slow  # 14 s on 2 cores: full tier
def test_a_new_backend_loads_the_built_step_and_decodes_the_same_frames(tiny, tmp_path, caplog):
    # aot_eager: Dynamo and AOTAutograd run and are stored as on a GPU; inductor's C++ build would take minutes here.
    clip = make_bitstream(tiny, frame_count=6, interval=4)  # frame 0 (padded to 4), then 4, then 1 (padded)

    def backend():
        torch._dynamo.reset()  # as in a new process
        return CompileBackend(tiny.unet, tiny.taesd.decoder, "cpu", torch.float32, batch=4,
                              options=CompileOptions(backend="aot_eager"), engine_dir=str(tmp_path),
                              mechanism="aot_compile", progress=False)

    a = backend()
    with caplog.at_level(logging.INFO, logger="promptus.backends.compile_cache"):
        built = Decoder(a).decode_all(clip)
    assert a.prepared.how == "built" and a.prepared.path.exists()
    assert "usually takes about" in caplog.text and "done once" in caplog.text
    reference = Decoder(make_backend("eager", tiny, "cpu", batch=4, size=64)).decode_all(clip)
    assert (built.int() - reference.int()).abs().max() <= 1

    b = backend()
    loaded = Decoder(b).decode_all(clip)
    assert b.prepared.how == "loaded" and torch.equal(loaded, built)  # same backend, same frames, bit for bit

    # An artifact its sidecar vouches for but that cannot load (another writer, a torch bug): rebuilt, with a message.
    cache = CompileCache(tmp_path)
    junk = b"not a compiled function"
    cache.store(b.prepared.key, junk)
    caplog.clear()
    c = backend()
    with caplog.at_level(logging.WARNING):
        rebuilt = Decoder(c).decode_all(clip)
    assert "could not be loaded" in caplog.text and "rebuilding" in caplog.text
    assert c.prepared.how == "built" and torch.equal(rebuilt, built)
    assert cache.read(c.prepared.key) != junk


def test_bench_table_without_eager_prints_no_nan():
    nan = math.nan
    row = {"backend": "compile", "status": "ok", "unet_ms": nan, "decoder_ms": nan, "segment_ms": 25.2,
           "fps_gpu": 376.5, "fps_host": 376.1, "peak_gib": 2.75, "psnr_vs_fp32": 71.1, "mfu": 0.46, "speedup": nan,
           "cold_start_s": 64.1, "warm_start_s": 12.9}
    result = {"device": "NVIDIA H200", "torch": "2.11", "model": "random", "size": 512, "batch": 10,
              "frames_timed": 301, "dtype": "torch.float16", "unet_tflop_per_batch": 8.0,
              "decoder_tflop_per_batch": 1.4, "matmul_ceiling_tflops": 770, "arithmetic_limit_fps": 812, "rows": [row]}
    table = format_decode_table(result)
    assert "nan" not in table.lower()
    line = next(ln for ln in table.splitlines() if ln.startswith("compile"))
    assert "64.1" in line and "12.9" in line and "—" in line


@pytest.mark.slow
def test_aoti_probe_starts_a_step_without_diffusers_or_dynamo(tmp_path):
    """scripts/aoti_probe.py on the tiny model: the AOTInductor package of the segment step, loaded in a fresh
    process by torch's C++ loader with the weights bound by name, gives the eager step's frames (> 60 dB) and
    imports none of diffusers, transformers, torch._dynamo or torch._inductor."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("AOTInductor compiles C++ and this machine has no C++ compiler (g++, c++ or clang++)")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "aoti_probe.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["status"] == "ok" and result["heavy_modules_imported"] == []
    assert result["frames_psnr_db"] > 60 and result["constants"] > 100
