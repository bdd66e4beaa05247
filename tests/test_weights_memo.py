"""The weights memo: what a decoder's start-up learnt about a weights file, kept for the next process."""

from __future__ import annotations

import json
import os

import pytest
import torch

from promptus import startup, weights_memo
from promptus.config import CodecConfig

from hostile import bitstream


@pytest.fixture
def memo_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PROMPTUS_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def weight_files(tiny, tmp_path, monkeypatch):
    """The tiny model saved as a single UNet file and a TAESD file, loadable as SD-Turbo files are."""
    import promptus.models as models_mod
    from promptus.bench.command import _save_safetensors
    from promptus.models import tiny_configs

    configs = tiny_configs()
    for module in (models_mod, models_mod.loading):
        monkeypatch.setattr(module, "sd_turbo_unet_config", lambda: dict(configs["unet"]))
        monkeypatch.setattr(module, "taesd_config", lambda: dict(configs["taesd"]))
    unet, taesd = tmp_path / "unet.safetensors", tmp_path / "taesd.safetensors"
    _save_safetensors(tiny.unet.state_dict(), unet)
    _save_safetensors(tiny.taesd.state_dict(), taesd)
    return unet, taesd


def test_key_follows_the_files_and_skips_what_is_not_local(tmp_path, memo_dir):
    unet, taesd = tmp_path / "u.safetensors", tmp_path / "t"
    unet.write_bytes(b"u" * 10)
    taesd.mkdir()
    (taesd / "config.json").write_text("{}")
    key = weights_memo.weights_key(str(unet), str(taesd), tmp_path)
    assert key and key == weights_memo.weights_key(str(unet), str(taesd), tmp_path)
    os.utime(unet, ns=(1, 1))
    assert weights_memo.weights_key(str(unet), str(taesd), tmp_path) != key  # touched: another key
    (taesd / "more.safetensors").write_bytes(b"t")
    second = weights_memo.weights_key(str(unet), str(taesd), tmp_path)
    assert second not in (key, None)  # a file added to the TAESD folder
    assert weights_memo.weights_key("tiny", None, tmp_path) is None
    assert weights_memo.weights_key("stabilityai/sd-turbo", None, tmp_path) is None  # a hub id
    assert weights_memo.weights_key(str(unet), None, tmp_path / "none") is None  # TAESD from the hub
    many = tmp_path / "many"
    many.mkdir()
    for i in range(weights_memo.MAX_FILES + 1):
        (many / f"{i}").write_bytes(b"")
    assert weights_memo.files_fingerprint(many) is None


def test_put_get_and_the_bound(memo_dir, monkeypatch):
    assert weights_memo.get("k") == {} and weights_memo.get(None) == {}
    weights_memo.put("k", model_digest="ab" * 16)
    weights_memo.put("k", shared_prefix_problem=None)
    got = weights_memo.get("k")
    assert got["model_digest"] == "ab" * 16 and "shared_prefix_problem" in got
    monkeypatch.setattr(weights_memo, "MAX_ENTRIES", 3)
    for i in range(5):
        weights_memo.put(f"n{i}", x=i)
    entries = json.loads(weights_memo.memo_path().read_text())["entries"]
    assert sorted(entries) == ["n2", "n3", "n4"]


@pytest.mark.parametrize("damage", ["garbage", "deep", "oversized", "folder", "wrong format", "entries list", "fifo",
                                    "link to /dev/zero", "bad values"])
def test_a_damaged_memo_is_ignored_and_rewritten(memo_dir, damage):
    path = weights_memo.memo_path()
    path.parent.mkdir(parents=True)
    if damage == "folder":
        path.mkdir()
    elif damage == "fifo":
        os.mkfifo(path)
    elif damage == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif damage == "bad values":
        path.write_text(json.dumps({"format": 1, "entries": {"k": [1], "j": {"model_digest": 5}}}))
        assert startup._remembered_digest("j") is None
        assert startup._compile_keys(weights_memo.get("j"), device=torch.device("cpu"), dtype=torch.float16,
                                     batch=10, size=64, timestep=999) is None
    else:
        path.write_text({"garbage": "{not json", "deep": "[" * 100_000 + "]" * 100_000,
                         "oversized": json.dumps({"format": 1, "entries": {"k": {"x": "y" * weights_memo.MAX_BYTES}}}),
                         "wrong format": json.dumps({"format": 99, "entries": {"k": {"x": 1}}}),
                         "entries list": json.dumps({"format": 1, "entries": [1, 2]})}[damage])
    assert weights_memo.get("k") == {}
    weights_memo.put("k", x=1)  # a folder in the way: skipped quietly; anything else is replaced
    assert weights_memo.get("k") == ({} if damage == "folder" else {"x": 1, "written": weights_memo.get("k")["written"]})
    if damage == "link to /dev/zero":
        assert not path.is_symlink()  # the link was replaced, nothing was written through it


def test_a_second_start_remembers_the_digest_and_the_architecture(weight_files, memo_dir, monkeypatch):
    unet, taesd = weight_files
    header = bitstream(CodecConfig(width=64, height=64, rank=2, interval=3), 7).header
    startup.clear()
    first = startup.load_decoder(str(unet), header, device="cpu", dtype=torch.float32, backend="eager",
                                 taesd=str(taesd))
    facts = weights_memo.get(weights_memo.weights_key(str(unet), str(taesd), "checkpoints"))
    assert facts["model_digest"] == first.identity.digest.hex()
    assert facts[f"architecture {torch.float32}"]
    assert facts["shared_prefix_problem"] is None or isinstance(facts["shared_prefix_problem"], str)

    startup.clear()
    computed = []
    import promptus.models.networks as networks

    real = networks.model_digest
    monkeypatch.setattr(networks, "model_digest", lambda m: computed.append(1) or real(m))
    profile = startup.StartupProfile()
    second = startup.load_decoder(str(unet), header, device="cpu", dtype=torch.float32, backend="eager",
                                  taesd=str(taesd), profile=profile)
    assert second.identity == first.identity and computed == []  # not hashed again
    assert any("weights memo" in n for n in profile.notes)

    os.utime(unet, ns=(10**9, 10**9))  # the file changed: its digest is computed again
    startup.clear()
    third = startup.load_decoder(str(unet), header, device="cpu", dtype=torch.float32, backend="eager",
                                 taesd=str(taesd))
    assert third.identity == first.identity and computed == [1]
    startup.clear()


def test_a_memo_of_the_wrong_shape_gives_no_direct_start(tmp_path, monkeypatch):
    """Only well-formed facts start the aoti backend without the networks; anything else loads them."""
    from promptus.backends import aoti_backend

    class Started:
        geometry = None

    monkeypatch.setattr(aoti_backend.AotiBackend, "from_files", classmethod(lambda cls, **kw: Started()))
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"x")
    facts = {f"architecture {torch.float32}": "ab" * 8, "shared_prefix_problem": None, "model_digest": "00" * 16,
             "model_name": "m", "geometry": {"embed_dim": 8, "latent_channels": 4, "latent_factor": 8}}
    kwargs = dict(device=torch.device("cpu"), dtype=torch.float32, batch=4, size=64, timestep=999,
                  engine_dir=str(tmp_path))
    started = startup._direct_aoti(str(weights), str(weights), tmp_path, facts, **kwargs)
    assert isinstance(started.backend, Started) and started.identity.name == "m"
    for bad in ({"geometry": {"embed_dim": "x", "latent_channels": 4, "latent_factor": 8}},
                {"geometry": {"embed_dim": 1, "nope": 2}}, {"model_digest": "zz"}, {"unet_names": {"a": 1}},
                {"model_name": 5}, {f"architecture {torch.float32}": None}):
        assert startup._direct_aoti(str(weights), str(weights), tmp_path, {**facts, **bad}, **kwargs) is None, bad


def test_remembered_keys_equal_the_ones_the_networks_give(tiny):
    facts = startup.architecture_facts(tiny, torch.float16)
    keys = startup._compile_keys(facts, device=torch.device("cpu"), dtype=torch.float16, batch=10, size=64,
                                 timestep=999)
    again = startup._compile_keys(json.loads(json.dumps(facts)), device=torch.device("cpu"), dtype=torch.float16,
                                  batch=10, size=64, timestep=999)
    assert keys and keys == again
    assert startup._compile_keys({}, device=torch.device("cpu"), dtype=torch.float16, batch=10, size=64,
                                 timestep=999) is None
    bad = {f"architecture {torch.float16}": 5, "shared_prefix_problem": None}
    assert startup._compile_keys(bad, device=torch.device("cpu"), dtype=torch.float16, batch=10, size=64,
                                 timestep=999) is None


_DIRECT = """
import json, sys
sys.path.insert(0, {root!r})
import torch
import promptus.models as models_mod
import promptus.models.loading as loading
from promptus.models import tiny_configs
configs = tiny_configs()
for module in (models_mod, loading):  # the tiny model saved as SD-Turbo-style files
    module.sd_turbo_unet_config = lambda: dict(configs["unet"])
    module.taesd_config = lambda: dict(configs["taesd"])
from safetensors.torch import save_file
from promptus import startup
from promptus.bitstream import read
from promptus.decoder import Decoder
clip = read({clip!r})
loaded = startup.load_decoder({unet!r}, clip.header, device="cpu", dtype=torch.float32, backend="aoti",
                              taesd={taesd!r}, engine_dir={engines!r})
frames = Decoder(loaded.backend, loaded.identity).decode_all(clip)
save_file({{"frames": frames.contiguous()}}, {out!r})
print("RESULT " + json.dumps({{"how": loaded.backend.prepared[0], "diffusers": "diffusers" in sys.modules,
                              "dynamo": "torch._dynamo.convert_frame" in sys.modules}}))
"""


@pytest.fixture(scope="module")
def aoti_engines(tmp_path_factory):
    return tmp_path_factory.mktemp("aoti-engines")


@pytest.mark.slow  # one AOTInductor build of the tiny step (~30-40 s on 2 cores) and four fresh processes
@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_a_second_aoti_decode_starts_without_diffusers(weight_files, tmp_path, aoti_engines, layout, tiny):
    """First decode with --backend aoti: the networks are loaded, the package built (or found) and stored, the
    facts remembered. Second decode, a fresh process: the package and the weights files alone — diffusers and
    Dynamo never imported — and the same frames. Also from an original (LDM) single file, whose UNet names
    the first run maps once (ldm_unet_names)."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    import promptus
    from promptus.backends.aoti_backend import aoti_problem

    why = aoti_problem(torch.device("cpu"))
    if why:
        pytest.skip(f"the aoti backend cannot run here: {why}")
    unet, taesd = weight_files
    if layout == "ldm":
        from safetensors.torch import save_file

        from ldm_convert import ldm_checkpoint

        unet = tmp_path / "sd_turbo_like.safetensors"
        save_file({k: v.contiguous() for k, v in ldm_checkpoint(tiny.unet).items()}, str(unet))
    clip = tmp_path / "clip.promptus"
    promptus.write(clip, bitstream(CodecConfig(width=64, height=64, rank=2, interval=3), 7))
    root = str(Path(promptus.__file__).parent.parent)
    runs = []
    for i in range(2):
        out = tmp_path / f"frames{i}.safetensors"
        code = _DIRECT.format(root=root, clip=str(clip), unet=str(unet), taesd=str(taesd),
                              engines=str(aoti_engines), out=str(out))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        runs.append((json.loads(line[len("RESULT "):]), load_file(out)["frames"]))
    (first, frames0), (second, frames1) = runs
    assert first["how"] in ("built", "loaded") and first["diffusers"]
    assert second == {"how": "loaded without the networks", "diffusers": False, "dynamo": False}
    assert torch.equal(frames0, frames1)


def test_deciding_autos_choice_imports_neither_dynamo_nor_inductor():
    """load_decoder asks which backend auto will try first (aoti on CUDA) before the direct start; asking must not
    import what that start avoids: torch imports a submodule on attribute access, and torch._inductor brings
    Dynamo (about 1 s on an H100 host, measured as auto's start 0.85 s behind --backend aoti's)."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom promptus import startup\n"
            "before = {m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules}\n"
            "choice = startup._first_choice('auto', torch.device('cuda'))\n"
            "print(choice, sorted(before), 'torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    choice, before, dynamo, inductor = out.stdout.split()
    assert before == "[]" and dynamo == inductor == "False", out.stdout
    assert choice in ("aoti", "compile", "torch")  # aoti where this machine has a C++ compiler


def test_ldm_names_are_a_rename_or_nothing(tiny, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import promptus.models.loading as loading
    from ldm_convert import ldm_checkpoint
    from promptus.models import tiny_configs

    monkeypatch.setattr(loading, "sd_turbo_unet_config", lambda: dict(tiny_configs()["unet"]))
    ldm, plain, junk = tmp_path / "ldm.safetensors", tmp_path / "plain.safetensors", tmp_path / "junk.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_checkpoint(tiny.unet).items()}, str(ldm))
    save_file({k: v.contiguous() for k, v in tiny.unet.state_dict().items()}, str(plain))
    junk.write_bytes(b"\x00" * 64)
    names = loading.ldm_unet_names(ldm)
    assert set(names) == set(tiny.unet.state_dict()) and all(v.startswith("model.diffusion_model.")
                                                           for v in names.values())
    assert loading.ldm_unet_names(plain) is None and loading.ldm_unet_names(junk) is None
    assert loading.ldm_unet_names(tmp_path / "missing.safetensors") is None


def test_the_memo_stays_within_its_size(memo_dir, monkeypatch):
    monkeypatch.setattr(weights_memo, "MAX_BYTES", 20_000)
    for i in range(6):
        weights_memo.put(f"k{i}", names="x" * 5_000)
    assert weights_memo.memo_path().stat().st_size <= 20_000
    kept = json.loads(weights_memo.memo_path().read_text())["entries"]
    assert "k5" in kept and "k0" not in kept and weights_memo.get("k5")["names"] == "x" * 5_000
