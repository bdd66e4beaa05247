"""The one artifact cache: every registered kind gets the same hardened storage (CPU, no TensorRT needed)."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest
import torch

from promptus.backends.artifact_cache import (
    MAX_SIDECAR_BYTES, ArtifactCache, ArtifactCacheError, NotARegularFile, artifact_kinds, clean_artifacts,
    list_artifacts,
)
from promptus.backends.compile_cache import COMPILED_DECODER, COMPILED_TRAINER, CompileOptions, TrainerKey, make_key
from promptus.backends.engine_cache import ENGINE_KIND, EngineKey


def engine_key(**changes):
    fields = dict(model_digest="ab" * 8, component="unet", batch=4, size=64, precision="fp16", flavour="tensorrt_rtx",
                  trt_version="1.7.1.116", compute_capability="portable")
    return EngineKey(**{**fields, **changes})


def compiled_key(kind, **changes):
    import dataclasses

    k = make_key("cd" * 8, batch=4, size=64, dtype=torch.float32, timestep=999, device=torch.device("cpu"),
                 mechanism="aot_compile", options=CompileOptions() if kind is COMPILED_DECODER else "reduce-overhead",
                 kind=kind)
    return dataclasses.replace(k, **changes)


KEYS = {
    ENGINE_KIND.name: (ENGINE_KIND, engine_key),
    COMPILED_DECODER.name: (COMPILED_DECODER, lambda **c: compiled_key(COMPILED_DECODER, **c)),
    COMPILED_TRAINER.name: (COMPILED_TRAINER, lambda **c: compiled_key(COMPILED_TRAINER, **c)),
}


@pytest.fixture(params=list(KEYS))
def kind_and_key(request):
    kind, make = KEYS[request.param]
    return kind, make


def test_every_kind_is_registered_once_in_its_own_files():
    names = [k.name for k in artifact_kinds()]
    assert names[:3] == ["tensorrt_engine", "compiled_decoder", "compiled_trainer"]
    assert len({(k.subdir, k.suffix) for k in artifact_kinds()}) == len(names)
    assert compiled_key(COMPILED_TRAINER).stem.startswith("trainer_b4_64px_fp32_")
    assert isinstance(compiled_key(COMPILED_TRAINER), TrainerKey)


def test_store_read_evict_round_trip(tmp_path, kind_and_key, caplog):
    kind, make = kind_and_key
    cache, key = ArtifactCache(kind, tmp_path), make()
    with caplog.at_level(logging.WARNING):
        assert cache.read(key) is None and not caplog.text  # a plain miss says nothing
    path = cache.store(key, b"payload" * 10, build_seconds=2.0)
    assert cache.read(key) == b"payload" * 10 and cache.lookup(key) == path
    assert not [p for p in cache.dir.iterdir() if p.name.startswith(".")]  # atomic: no temporaries left
    meta = json.loads(cache.sidecar_path(key).read_text())
    assert meta["kind"] == kind.name and meta["key"] == key.as_dict() and meta["build_seconds"] == 2.0
    (entry,) = list_artifacts(tmp_path, [kind])
    assert entry.status == "ok" and entry.key == key and entry.created and key.toolkit() and key.summary()
    cache.evict(key)
    assert cache.read(key) is None and list_artifacts(tmp_path, [kind]) == []


DAMAGE = {
    "truncated": lambda c, k: c.path(k).write_bytes(b"pay"),
    "flipped": lambda c, k: c.path(k).write_bytes(b"x" * 70),
    "sidecar not json": lambda c, k: c.sidecar_path(k).write_text("{not json"),
    "sidecar too big": lambda c, k: c.sidecar_path(k).write_bytes(b" " * (MAX_SIDECAR_BYTES + 1)),
    "sidecar nested": lambda c, k: c.sidecar_path(k).write_text("[" * 100_000 + "]" * 100_000),
    "sidecar of another format": lambda c, k: _edit_sidecar(c, k, format=99),
    "sidecar of another key": lambda c, k: _edit_sidecar(c, k, key={**k.as_dict(), "batch": 8}),
    "sidecar key mistyped": lambda c, k: _edit_sidecar(c, k, key={**k.as_dict(), "batch": "4"}),
    "size not an int": lambda c, k: _edit_sidecar(c, k, **{f"{c.kind.payload}_bytes": "70"}),
    "artifact links to /dev/zero": lambda c, k: _replace_with_link(c.path(k), "/dev/zero"),
    "sidecar links to /dev/zero": lambda c, k: _replace_with_link(c.sidecar_path(k), "/dev/zero"),
    "artifact is a FIFO": lambda c, k: _replace_with_fifo(c.path(k)),
    "sidecar is a FIFO": lambda c, k: _replace_with_fifo(c.sidecar_path(k)),
    "sidecar missing": lambda c, k: c.sidecar_path(k).unlink(),
}


def _edit_sidecar(cache, entry_key, **changes):
    meta = json.loads(cache.sidecar_path(entry_key).read_text())
    cache.sidecar_path(entry_key).write_text(json.dumps({**meta, **changes}))


def _replace_with_link(path, target):
    if not os.path.exists(target):
        pytest.skip(f"{target} does not exist on this system")
    path.unlink()
    path.symlink_to(target)


def _replace_with_fifo(path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("this system has no FIFOs")
    path.unlink()
    os.mkfifo(path)


def _with_deadline(fn, seconds=20.0):
    """Run ``fn`` on a thread; a hang (a FIFO opened for reading) fails the test instead of stalling it."""
    box = {}
    t = threading.Thread(target=lambda: box.update(result=fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the cache hung on a hostile file"
    return box.get("result")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_never_trusted_and_is_rebuilt(tmp_path, kind_and_key, damage, caplog):
    kind, make = kind_and_key
    cache, key = ArtifactCache(kind, tmp_path), make()
    cache.store(key, b"payload" * 10)
    DAMAGE[damage](cache, key)
    entries = _with_deadline(lambda: list_artifacts(tmp_path, [kind]))
    assert [e.status for e in entries] in (["corrupt"], ["orphan"]), entries
    with caplog.at_level(logging.WARNING):
        assert _with_deadline(lambda: cache.read(key)) is None
    assert "unusable" in caplog.text and "rebuilt" in caplog.text
    assert not os.path.lexists(cache.sidecar_path(key))  # removed: the caller's rebuild starts clean
    cache.store(key, b"payload" * 10)
    assert cache.read(key) == b"payload" * 10


def test_a_folder_in_place_of_a_cache_file_is_the_users_to_remove(tmp_path, kind_and_key):
    kind, make = kind_and_key
    cache, key = ArtifactCache(kind, tmp_path), make()
    cache.store(key, b"payload")
    cache.path(key).unlink()
    cache.path(key).mkdir()
    with pytest.raises(NotARegularFile, match="is a folder"):
        cache.read(key)
    assert cache.path(key).is_dir()  # nothing the user did not name is deleted
    root = tmp_path / "plain-file"
    root.write_text("x")
    with pytest.raises(ArtifactCacheError, match="is a file"):
        ArtifactCache(kind, root)


def test_clean_keeps_good_entries_and_removes_the_rest(tmp_path):
    good = {name: make() for name, (kind, make) in KEYS.items()}
    for name, key in good.items():
        ArtifactCache(KEYS[name][0], tmp_path).store(key, b"ok")
    stale = compiled_key(COMPILED_DECODER, torch_version="1.0.0")
    ArtifactCache(COMPILED_DECODER, tmp_path).store(stale, b"old")
    old_engine = engine_key(trt_version="1.0.0")
    ArtifactCache(ENGINE_KIND, tmp_path).store(old_engine, b"old")
    (tmp_path / "compiled" / "segment_lost.bin").write_bytes(b"o")
    (tmp_path / ".tmp-x.engine.1.abc").write_bytes(b"t")
    installed = {"tensorrt_rtx": "1.7.1.116"}
    status = {e.path.name: e.status for e in list_artifacts(tmp_path, installed=installed)}
    assert status[old_engine.stem + ".engine"] == "stale" and status[stale.stem + ".bin"] == "stale"
    assert status["segment_lost.bin"] == "orphan" and status[".tmp-x.engine.1.abc"] == "temp"
    would = clean_artifacts(tmp_path, installed=installed, dry_run=True)
    assert all(p.exists() for p in would)
    clean_artifacts(tmp_path, installed=installed)
    assert {e.key for e in list_artifacts(tmp_path, installed=installed)} == set(good.values())
    clean_artifacts(tmp_path, match=lambda k: k.batch == 4)
    assert list_artifacts(tmp_path) == []


def test_caches_are_plain_objects_not_value_types(tmp_path):
    from promptus.backends.engine_cache import EngineCache

    a, b = EngineCache(tmp_path / "a"), EngineCache(tmp_path / "b")
    assert a != b and a == a  # no stray @dataclass: two caches of different folders are different caches


def test_engines_list_shows_one_honest_table(tmp_path, capsys):
    from promptus.commands.main import main

    for name, (kind, make) in KEYS.items():
        ArtifactCache(kind, tmp_path).store(make(), b"x" * 2000, model_name="tiny")
    assert main(["engines", "list", "--engine-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["kind", "key", "built"] and lines[-1] == f"3 entries in {tmp_path}"
    rows = {line.split("  ")[0].strip(): line for line in lines[1:-1]}
    assert set(rows) == {"TensorRT engine", "compiled decoder", "compiled trainer"}
    assert "tensorrt_rtx 1.7.1.116" in rows["TensorRT engine"] and "torch" not in rows["TensorRT engine"]
    for compiled in ("compiled decoder", "compiled trainer"):
        assert f"torch {torch.__version__}" in rows[compiled] and "tensorrt" not in rows[compiled].lower()
    assert "reduce-overhead" in rows["compiled trainer"]
    assert main(["engines", "list", "--engine-dir", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["kind"] for r in listed) == ["compiled_decoder", "compiled_trainer", "tensorrt_engine"]
    assert all(r["status"] == "ok" and r["created"] and r["toolkit"] for r in listed)
    assert main(["engines", "clean", "--engine-dir", str(tmp_path), "--all"]) == 0
    assert "removed 6 files" in capsys.readouterr().out
