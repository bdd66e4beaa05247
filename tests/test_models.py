"""Model loading: tiny models, digests, single files, diffusers folders, hub ids, errors.

Everything runs on CPU with tiny random-weight models; the full-size architecture is
only instantiated on the "meta" device (no memory, no weights).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_convert import ldm_checkpoint
from promptus.errors import ModelNotFoundError, PromptusError
from promptus.models import (
    Models,
    find_default_weights,
    load_models,
    model_digest,
    sd_turbo_unet_config,
    sd_vae_config,
    taesd_config,
    tiny_configs,
    tiny_models,
)


def _inputs(batch=2, latent=8, seed=0):
    rs = np.random.RandomState(seed)
    z = torch.from_numpy(rs.randn(batch, 4, latent, latent).astype(np.float32))
    c = torch.from_numpy(rs.uniform(0, 1, (batch, 77, 1024)).astype(np.float32))
    return z, c


def _eps(models: Models, z, c):
    with torch.no_grad():
        return models.unet(z, 999, encoder_hidden_states=c).sample


def _frame(size=64, seed=0):
    rs = np.random.RandomState(seed)
    return torch.from_numpy(rs.uniform(-1, 1, (1, 3, size, size)).astype(np.float32))


def _assert_same_models(a: Models, b: Models, *, vae=True):
    assert model_digest(a) == model_digest(b)
    z, c = _inputs()
    assert torch.equal(_eps(a, z, c), _eps(b, z, c))
    with torch.no_grad():
        assert torch.equal(a.taesd.decoder(z), b.taesd.decoder(z))
    if vae:
        f = _frame()
        assert torch.equal(a.encode_init_latent(f, "vae"), b.encode_init_latent(f, "vae"))


@pytest.fixture
def taesd_dir(tmp_path, tiny):
    """A checkpoints folder holding the tiny TAESD where load_models looks by default."""
    ckpts = tmp_path / "checkpoints"
    tiny.taesd.save_pretrained(ckpts / "taesd")
    return ckpts


# --- shipped configs -------------------------------------------------------------


def test_shipped_unet_config_is_sd21_base_with_865m_parameters():
    from diffusers import UNet2DConditionModel

    cfg = sd_turbo_unet_config()
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg["attention_head_dim"] == [5, 10, 20, 20]
    assert cfg["cross_attention_dim"] == 1024 and cfg["use_linear_projection"] is True
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724  # SD 2.x UNet


def test_shipped_taesd_and_vae_configs():
    t = taesd_config()
    assert (t["scaling_factor"], t["latent_magnitude"], t["latent_shift"], t["latent_channels"]) == (1.0, 3, 0.5, 4)
    v = sd_vae_config()
    assert v["scaling_factor"] == 0.18215 and v["block_out_channels"] == [128, 256, 512, 512]
    assert sd_turbo_unet_config() is not sd_turbo_unet_config()  # fresh dicts, safe to edit


# --- tiny models -----------------------------------------------------------------


def test_tiny_models_are_deterministic_and_fast():
    a = tiny_models()  # the first call also imports diffusers
    t0 = time.perf_counter()
    b = tiny_models()
    assert time.perf_counter() - t0 < 1.0
    assert a.name == "tiny"
    digest = model_digest(a)
    assert isinstance(digest, bytes) and len(digest) == 16
    assert digest == model_digest(b)
    assert model_digest(tiny_models(seed=1)) != digest


def test_tiny_weights_do_not_depend_on_torch():
    # numpy's MT19937 draws the weights in sorted-name order; the UNet's first weight that
    # draws is conv_in.weight (4·3·3 inputs, so uniform in ±1/6) — whatever torch's RNG says
    torch.manual_seed(1234)
    w = tiny_models().unet.conv_in.weight.flatten()[:5]
    expected = np.random.RandomState([0, 0]).uniform(-1 / 6, 1 / 6, 5).astype(np.float32)
    assert np.array_equal(w.numpy(), expected)
    # pinned: changes only if the tiny architecture, its init or the digest definition changes
    assert model_digest(tiny_models()).hex() == "c298bd8476233278f9c452766bd07bf0"


def test_digest_tracks_decoding_weights_only():
    m = tiny_models()
    digest = model_digest(m)
    with torch.no_grad():
        m.vae.encoder.conv_in.weight.add_(1.0)  # the VAE encoder does not take part in decoding
        m.taesd.encoder.layers[0].weight.add_(1.0)
    assert model_digest(m) == digest
    with torch.no_grad():
        m.unet.conv_out.weight[0, 0, 0, 0] += 0.01
    assert model_digest(m) != digest
    n = tiny_models()
    with torch.no_grad():
        n.taesd.decoder.layers[0].bias[0] += 0.01
    assert model_digest(n) != digest


def test_digest_is_the_same_for_float32_and_float16_copies():
    m = tiny_models()
    digest = model_digest(m)
    assert model_digest(tiny_models().to(dtype=torch.float16)) == digest


def test_identity_carries_name_and_digest():
    m = tiny_models()
    from promptus.bitstream import ModelIdentity

    ident = m.identity()
    assert isinstance(ident, ModelIdentity)
    assert ident.name == "tiny" and ident.digest == model_digest(m)


def test_tiny_unet_takes_sd_turbo_prompts():
    m = tiny_models()
    z, c = _inputs(batch=3)
    eps = _eps(m, z, c)
    assert eps.shape == (3, 4, 8, 8) and eps.dtype == torch.float32
    assert 0.3 < float(eps.std()) < 3.0  # roughly unit std, so x0 is not wildly off
    assert not torch.equal(eps, _eps(m, z, c * 0.5))  # the prompt matters


def test_tiny_models_are_frozen_and_in_eval_mode():
    m = tiny_models()
    for module in (m.unet, m.taesd, m.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    # gradients still reach the prompt
    z, c = _inputs(batch=1)
    c.requires_grad_(True)
    m.unet(z, 999, encoder_hidden_states=c).sample.sum().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0


def test_taesd_decoder_maps_latents_to_images():
    m = tiny_models()
    z, _ = _inputs(batch=2)
    with torch.no_grad():
        img = m.taesd.decoder(z)
    assert img.shape == (2, 3, 64, 64)
    assert float(img.std()) > 0.05  # not a flat frame


def test_encode_init_latent_shapes_and_conventions():
    m = tiny_models()
    f = _frame(64)
    for which in ("vae", "taesd"):
        latent = m.encode_init_latent(f, which)
        assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    # VAE: posterior mean × 0.18215
    with torch.no_grad():
        mean = m.vae.encode(f).latent_dist.mean
    assert torch.allclose(m.encode_init_latent(f, "vae"), mean * 0.18215)
    # TAESD: diffusers' encoder takes [-1, 1] and maps it to TAESD's [0, 1] itself
    with torch.no_grad():
        raw = m.taesd.encoder.layers((f + 1) / 2)
    assert torch.allclose(m.encode_init_latent(f, "taesd"), raw)


def test_encode_init_latent_errors():
    m = tiny_models()
    with pytest.raises(PromptusError, match="which='taesd'"):
        Models(m.unet, m.taesd, None, "tiny").encode_init_latent(_frame(), "vae")
    with pytest.raises(PromptusError, match="unknown"):
        m.encode_init_latent(_frame(), "clip")
    with pytest.raises(PromptusError, match="multiple of 8"):
        m.encode_init_latent(torch.zeros(1, 3, 60, 64))
    with pytest.raises(PromptusError, match="B×3×H×W"):
        m.encode_init_latent(torch.zeros(3, 64, 64))


def test_load_tiny_spec():
    m = load_models("tiny", vae=False, dtype=torch.float16)
    assert m.name == "tiny" and m.vae is None and m.dtype == torch.float16
    assert model_digest(m) == model_digest(tiny_models())


# --- single original-format files --------------------------------------------------


def test_ldm_single_file_loads_back_equal(tmp_path, tiny, taesd_dir):
    path = tmp_path / "tiny_ldm.safetensors"
    ckpt = ldm_checkpoint(tiny.unet, tiny.vae)
    ckpt["cond_stage_model.model.ln_final.weight"] = torch.ones(4)  # a text encoder we must ignore
    save_file(ckpt, str(path))
    loaded = load_models(str(path), configs=tiny_configs(), checkpoints_dir=taesd_dir)
    assert loaded.name == "tiny_ldm.safetensors" and loaded.vae is not None
    _assert_same_models(loaded, tiny)
    assert not any(p.is_meta for p in loaded.unet.parameters())


def test_ldm_ckpt_file_with_state_dict_wrapper(tmp_path, tiny, taesd_dir):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm_checkpoint(tiny.unet, tiny.vae)}, path)
    loaded = load_models(str(path), configs=tiny_configs(), checkpoints_dir=taesd_dir, vae=False)
    assert loaded.vae is None
    _assert_same_models(loaded, tiny, vae=False)


def test_ckpt_with_pickled_objects_is_refused(tmp_path, taesd_dir):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": PromptusError("not a tensor")}, path)
    with pytest.raises(ModelNotFoundError, match="weights_only"):
        load_models(str(path), configs=tiny_configs(), checkpoints_dir=taesd_dir)


def test_unet_only_file_gives_models_without_vae(tmp_path, tiny, taesd_dir):
    path = tmp_path / "unet_only.safetensors"
    save_file(ldm_checkpoint(tiny.unet), str(path))
    loaded = load_models(str(path), configs=tiny_configs(), checkpoints_dir=taesd_dir)
    assert loaded.vae is None
    _assert_same_models(loaded, tiny, vae=False)


def test_diffusers_format_unet_file(tmp_path, tiny, taesd_dir):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.unet.state_dict().items()}, str(path))
    loaded = load_models(str(path), configs=tiny_configs(), checkpoints_dir=taesd_dir)
    _assert_same_models(loaded, tiny, vae=False)


def test_file_with_foreign_keys_is_refused(tmp_path, taesd_dir):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelNotFoundError, match="model.diffusion_model"):
        load_models(str(path), checkpoints_dir=taesd_dir)


def test_checkpoint_of_another_architecture_is_refused(tmp_path, tiny, taesd_dir):
    # a real LDM layout, but not SD-Turbo's shapes (checked on the meta device, no allocation)
    path = tmp_path / "tiny_ldm.safetensors"
    save_file(ldm_checkpoint(tiny.unet, tiny.vae), str(path))
    with pytest.raises(ModelNotFoundError, match="not an SD-2.x/SD-Turbo checkpoint"):
        load_models(str(path), checkpoints_dir=taesd_dir)


def test_corrupt_file_is_refused(tmp_path, taesd_dir):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00\x01 this is not safetensors")
    with pytest.raises(ModelNotFoundError, match="broken.safetensors"):
        load_models(str(path), checkpoints_dir=taesd_dir)


# --- missing weights ---------------------------------------------------------------


def test_missing_file_says_where_and_how(tmp_path):
    missing = tmp_path / "checkpoints" / "sd_turbo.safetensors"
    with pytest.raises(ModelNotFoundError) as err:
        load_models(str(missing), checkpoints_dir=tmp_path / "checkpoints")
    msg = str(err.value)
    assert str(missing) in msg
    assert "hf download stabilityai/sd-turbo sd_turbo.safetensors" in msg
    assert "madebyollin/taesd" in msg


def test_missing_folder_under_an_existing_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ModelNotFoundError, match="no such file or folder 'checkpoints/sd-turbo'"):
        load_models("checkpoints/sd-turbo")


def test_auto_without_weights(tmp_path):
    assert find_default_weights(tmp_path) is None
    with pytest.raises(ModelNotFoundError, match="No SD-Turbo weights found") as err:
        load_models("auto", checkpoints_dir=tmp_path)
    assert "tiny" in str(err.value)


def test_auto_finds_the_default_file(tmp_path, tiny, monkeypatch):
    # the default file under its standard name; the tiny architecture is passed explicitly
    ckpts = tmp_path / "checkpoints"
    tiny.taesd.save_pretrained(ckpts / "taesd")
    save_file(ldm_checkpoint(tiny.unet, tiny.vae), str(ckpts / "sd_turbo.safetensors"))
    assert find_default_weights(ckpts) == str(ckpts / "sd_turbo.safetensors")
    loaded = load_models("auto", checkpoints_dir=ckpts, configs=tiny_configs())
    assert loaded.name == "sd-turbo"
    _assert_same_models(loaded, tiny)


def test_missing_taesd_says_how_to_fetch_it(tmp_path, tiny):
    path = tmp_path / "unet.safetensors"
    save_file(ldm_checkpoint(tiny.unet), str(path))
    with pytest.raises(ModelNotFoundError, match="hf download madebyollin/taesd --local-dir"):
        load_models(str(path), configs=tiny_configs(), checkpoints_dir=tmp_path / "nothing")


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_models("stabilityai/sd-turbo", checkpoints_dir=tmp_path)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "hub id" in msg and "HF_HUB_OFFLINE" in msg and "hf download stabilityai/sd-turbo" in msg


def test_taesd_hub_id_offline_fails_fast(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    path = tmp_path / "unet.safetensors"
    save_file(ldm_checkpoint(tiny.unet), str(path))
    with pytest.raises(ModelNotFoundError, match="TAESD"):
        load_models(str(path), configs=tiny_configs(), taesd="madebyollin/taesd")


# --- diffusers folders -----------------------------------------------------------


def test_diffusers_pipeline_folder_loads_back_equal(tmp_path, tiny, taesd_dir):
    folder = tmp_path / "sd-turbo"
    tiny.unet.save_pretrained(folder / "unet")
    tiny.vae.save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    loaded = load_models(str(folder), checkpoints_dir=taesd_dir)
    assert loaded.name == "sd-turbo"
    _assert_same_models(loaded, tiny)
    assert find_default_weights(tmp_path) == str(folder)


def test_diffusers_unet_folder_and_taesd_file(tmp_path, tiny):
    tiny.unet.save_pretrained(tmp_path / "my-unet")
    taesd_file = tmp_path / "taesd.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.taesd.state_dict().items()}, str(taesd_file))
    loaded = load_models(
        str(tmp_path / "my-unet"), taesd=str(taesd_file), configs={"taesd": tiny_configs()["taesd"]}, vae=False
    )
    assert loaded.name == "my-unet" and loaded.vae is None
    _assert_same_models(loaded, tiny, vae=False)


def test_folder_of_the_wrong_kind_is_refused(tmp_path, tiny, taesd_dir):
    with pytest.raises(ModelNotFoundError, match="AutoencoderTiny"):
        load_models(str(taesd_dir / "taesd"), checkpoints_dir=taesd_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a diffusers folder"):
        load_models(str(tmp_path / "empty"), checkpoints_dir=taesd_dir)


def test_models_to_moves_every_component():
    m = tiny_models().to("cpu", torch.float16)
    assert m.dtype == torch.float16
    for module in (m.unet, m.taesd, m.vae):
        assert all(p.dtype == torch.float16 for p in module.parameters())


def test_taesd_file_of_another_architecture_is_refused(tmp_path, tiny):
    path = tmp_path / "unet.safetensors"
    save_file(ldm_checkpoint(tiny.unet), str(path))
    taesd_file = tmp_path / "taesd.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.taesd.state_dict().items()}, str(taesd_file))
    with pytest.raises(ModelNotFoundError, match="not a TAESD"):  # tiny weights, full-size TAESD config
        load_models(str(path), configs={"unet": tiny_configs()["unet"]}, taesd=str(taesd_file))


def test_full_size_random_models_architecture():
    from promptus.models import full_size_random_models

    m = full_size_random_models(device="meta", dtype=torch.float16)  # no memory, no init cost
    assert m.name == "sd-turbo-random" and m.vae is None
    assert sum(p.numel() for p in m.unet.parameters()) == 865_910_724
    assert m.dtype == torch.float16 and m.taesd.config.latent_channels == 4


def test_load_models_random_builds_the_full_size_architecture(monkeypatch):
    """``--model random``: the real architecture with random weights (built by full_size_random_models)."""
    from promptus.models import loading as m

    calls = []
    monkeypatch.setattr(m, "full_size_random_models",
                        lambda device, dtype, vae=False: calls.append((str(device), dtype, vae)) or "built")
    assert m.load_models("random", device="cpu", vae=False) == "built"
    assert calls == [("cpu", torch.float32, False)]


_RACE = """
import sys, threading
from promptus.models.networks import diffusers_classes

errors = []
def worker(names):
    try:
        diffusers_classes(*names)
    except Exception as e:  # the failure under test
        errors.append(repr(e))

threads = [threading.Thread(target=worker, args=(n,)) for n in
           (("AutoencoderTiny",), ("AutoencoderTiny", "UNet2DConditionModel"), ("UNet2DConditionModel",))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors)
sys.exit(1 if errors else 0)
"""


@pytest.mark.slow
def test_diffusers_classes_from_threads_on_a_fresh_install(tmp_path):
    """The decoder's preload thread and the weights loader ask diffusers' lazy module for classes at once; with
    no bytecode yet (a fresh install) plain ``from diffusers import AutoencoderTiny`` on two threads failed about
    every second time (ImportError, seen on a GPU host). An empty PYTHONPYCACHEPREFIX makes every import compile
    from source, the slow first import that opens the race; three runs must all succeed."""
    import os
    import subprocess
    import sys

    for run in range(3):
        env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / f"pycache{run}")}
        proc = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
