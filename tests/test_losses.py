"""The inversion loss: VGG-19 re-declared with torchvision's layout, its weights loader,
the perceptual loss checked against a hand-written re-computation, and the weighted sum."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from promptus import losses
from promptus.errors import ModelNotFoundError
from promptus.losses import InversionLoss, PerceptualLoss, VGG19Features, load_vgg19, random_vgg19

# torchvision's vgg19().features, written out: index -> (in, out) for convs, "M" for pools.
TORCHVISION_CONVS = {
    0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128),
    10: (128, 256), 12: (256, 256), 14: (256, 256), 16: (256, 256),
    19: (256, 512), 21: (512, 512), 23: (512, 512), 25: (512, 512),
    28: (512, 512), 30: (512, 512), 32: (512, 512), 34: (512, 512),
}  # fmt: skip
TORCHVISION_POOLS = (4, 9, 18, 27, 36)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def vgg():
    return random_vgg19(seed=0)


@pytest.fixture(scope="module")
def perceptual(vgg):
    return PerceptualLoss(vgg)


def frames(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def torchvision_style_state(seed=1):
    """What vgg19-dcbb9e9d.pth holds: features.* of random_vgg19 plus (small, fake) classifier.* keys."""
    state = {k: v.clone() for k, v in random_vgg19(seed).state_dict().items()}
    for i in (0, 3, 6):
        state[f"classifier.{i}.weight"] = torch.randn(4, 4)
        state[f"classifier.{i}.bias"] = torch.randn(4)
    return state


def reference_conv_outputs(state, image):
    """The 16 pre-ReLU conv outputs of one normalised image, straight from the state dict."""
    x, outs = image, []
    for i in sorted(TORCHVISION_CONVS):
        if i - 1 in TORCHVISION_POOLS:
            x = F.max_pool2d(x, 2)
        x = F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1)
        outs.append(x)
        x = F.relu(x)
    return outs


def reference_perceptual(state, generated, target):
    """One sample, written out: [-1,1] -> [0,1] -> ImageNet-normalised, per-layer MSE, mean of 16."""
    norm = lambda im: (((im + 1) / 2) - MEAN) / STD  # noqa: E731
    g_feats = reference_conv_outputs(state, norm(generated[None].double()))
    t_feats = reference_conv_outputs(state, norm(target[None].double()))
    total = 0.0
    for g, t in zip(g_feats, t_feats):
        total += float(((g - t) ** 2).sum()) / g.numel()
    return total / 16


# ---------------------------------------------------------------- architecture and weights


def test_layout_matches_torchvision_vgg19_features():
    features = VGG19Features().features
    assert len(features) == 37
    for i, layer in enumerate(features):
        if i in TORCHVISION_CONVS:
            assert isinstance(layer, torch.nn.Conv2d)
            assert (layer.in_channels, layer.out_channels) == TORCHVISION_CONVS[i]
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1) and layer.stride == (1, 1)
        elif i in TORCHVISION_POOLS:
            assert isinstance(layer, torch.nn.MaxPool2d) and layer.kernel_size == 2 and layer.stride == 2
        else:
            assert isinstance(layer, torch.nn.ReLU) and not layer.inplace
            assert i - 1 in TORCHVISION_CONVS
    expected = {f"features.{i}.{p}" for i in TORCHVISION_CONVS for p in ("weight", "bias")}
    assert set(VGG19Features().state_dict()) == expected


def test_forward_returns_the_16_pre_relu_conv_outputs(vgg):
    x = frames(1, 32)
    outs = vgg(x)
    ref = reference_conv_outputs(vgg.state_dict(), x)
    assert len(outs) == 16
    for got, want in zip(outs, ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all((o < 0).any() for o in outs)  # pre-ReLU: negatives survive


def test_random_vgg19_is_deterministic_frozen_and_in_eval():
    a, b, c = random_vgg19(3), random_vgg19(3), random_vgg19(4)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    w = a.features[0].weight
    assert torch.equal(w, b.features[0].weight) and not torch.equal(w, c.features[0].weight)
    bound = (6 / 27) ** 0.5  # He-uniform for fan_in 3·3·3
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.8 * bound


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_load_vgg19_reads_a_torchvision_state_dict(tmp_path, fmt):
    state = torchvision_style_state(seed=1)
    path = tmp_path / f"vgg19.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    vgg = load_vgg19(path)
    assert not vgg.training and not any(p.requires_grad for p in vgg.parameters())
    for k, v in vgg.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_vgg19_accepts_a_features_only_state_dict(tmp_path):
    state = {k.removeprefix("features."): v for k, v in random_vgg19(6).state_dict().items()}
    torch.save(state, tmp_path / "features.pth")
    assert torch.equal(load_vgg19(tmp_path / "features.pth").features[2].weight, state["2.weight"])


def test_load_vgg19_finds_the_file_in_the_hub_checkpoints_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("PROMPTUS_OFFLINE", "1")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    state = torchvision_style_state(seed=2)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")
    vgg = load_vgg19()
    assert torch.equal(vgg.features[34].bias, state["features.34.bias"])


def vgg16_like_state():
    # VGG-16 has 13 convs, its 8th at index 17; same shapes otherwise
    state = {k: v for k, v in torchvision_style_state().items() if not k.startswith("features.34")}
    state["features.17.weight"] = state.pop("features.16.weight")
    state["features.17.bias"] = state.pop("features.16.bias")
    return state


def wrong_shape_state():
    state = torchvision_style_state()
    state["features.5.weight"] = torch.zeros(128, 32, 3, 3)
    return state


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: torch.save(vgg16_like_state(), p), id="vgg16-keys"),
        pytest.param(lambda p: torch.save(wrong_shape_state(), p), id="wrong-shape"),
        pytest.param(lambda p: torch.save({"weight": torch.zeros(3)}, p), id="other-network"),
        pytest.param(lambda p: torch.save([torch.zeros(3)], p), id="not-a-dict"),
    ],
)
def test_a_wrong_file_is_not_a_vgg19(tmp_path, make):
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    make(path)
    with pytest.raises(ModelNotFoundError, match="not a torchvision VGG-19"):
        load_vgg19(path)


def test_unreadable_or_missing_file_raises_model_not_found(tmp_path):
    garbage = tmp_path / "vgg19.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelNotFoundError, match="cannot read"):
        load_vgg19(garbage)
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load_vgg19(tmp_path / "absent.pth")


def test_offline_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("PROMPTUS_OFFLINE", "1")

    network = []

    def no_network(*args, **kwargs):
        network.append(args)
        raise OSError("must not touch the network when offline")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(ModelNotFoundError) as err:
        load_vgg19()
    assert network == []
    message = str(err.value)
    hub_checkpoints = str(tmp_path / "hub" / "checkpoints")
    for needed in ("vgg19-dcbb9e9d.pth", "--perceptual off", "--vgg PATH", losses.VGG19_URL, hub_checkpoints):
        assert needed in message


@pytest.mark.parametrize("var", ["PROMPTUS_OFFLINE", "HF_HUB_OFFLINE"])
def test_online_probe_honours_offline_variables(monkeypatch, var):
    monkeypatch.delenv("PROMPTUS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def unreachable(address, *args, **kwargs):
        calls.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert losses._is_online() is False and len(calls) == 1  # probed, failed
    monkeypatch.setenv(var, "1")
    assert losses._is_online() is False and len(calls) == 1  # not probed


def test_online_download_is_used_and_its_failures_are_wrapped(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = torchvision_style_state(seed=5)
    seen = {}

    def fake_download(url, **kwargs):
        seen.update(url=url, **kwargs)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    vgg = load_vgg19(online=True)
    assert seen["url"] == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" and seen["weights_only"] is True
    assert torch.equal(vgg.features[0].weight, state["features.0.weight"])

    def broken_download(url, **kwargs):
        raise RuntimeError("connection reset")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", broken_download)
    with pytest.raises(ModelNotFoundError, match="connection reset") as err:
        load_vgg19(online=True)
    assert "--perceptual off" in str(err.value)


# ---------------------------------------------------------------- perceptual loss


def test_perceptual_of_identical_frames_is_zero_and_grows_with_noise(perceptual):
    target = frames(2, 32)
    assert torch.equal(perceptual(target.clone(), target), torch.zeros(2))
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    values = [perceptual(target + s * noise, target) for s in (0.02, 0.1, 0.4)]
    for v in values:
        assert v.shape == (2,) and v.dtype == torch.float32
    assert bool((values[0] > 0).all() and (values[0] < values[1]).all() and (values[1] < values[2]).all())


def test_perceptual_matches_a_hand_written_recomputation(perceptual, vgg):
    generated, target = frames(3, 32, seed=2), frames(3, 32, seed=3)
    got = perceptual(generated, target)
    state = {k: v.double() for k, v in vgg.state_dict().items()}
    for n in (0, 2):
        want = reference_perceptual(state, generated[n], target[n])
        assert got[n].item() == pytest.approx(want, rel=1e-4)
    assert got[0].item() != pytest.approx(got[1].item(), rel=1e-3)  # per sample, not a batch mean


def test_target_features_are_reusable_and_detached(perceptual):
    generated, target = frames(2, 32, seed=4), frames(2, 32, seed=5)
    feats = perceptual.target_features(target.clone().requires_grad_(True))
    assert len(feats) == 16 and not any(f.requires_grad for f in feats)
    torch.testing.assert_close(perceptual(generated, target_feats=feats), perceptual(generated, target))
    one = perceptual(generated, target[:1])  # a single target is compared with every frame
    torch.testing.assert_close(one[1], perceptual(generated[1:], target[:1])[0])
    with pytest.raises(TypeError):
        perceptual(generated)
    with pytest.raises(ValueError):
        perceptual(generated, frames(2, 48))


def test_low_precision_inputs_and_autocast_give_float32(perceptual):
    generated, target = frames(2, 32, seed=6), frames(2, 32, seed=7)
    g16, t16 = generated.bfloat16(), target.bfloat16()
    got = perceptual(g16, t16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, perceptual(g16.float(), t16.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = perceptual(generated, target)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, perceptual(generated, target), rtol=0.1, atol=0)


# ---------------------------------------------------------------- inversion loss


def by_hand(generated, target, context, perc, w=(0.8, 0.2, 0.1)):
    mse = torch.stack([((g - t) ** 2).mean() for g, t in zip(generated, target)])
    reg = torch.stack([c.abs().mean() for c in context])
    return w[0] * mse + w[1] * perc + w[2] * reg


def test_inversion_loss_is_the_weighted_sum(perceptual):
    generated, target = frames(2, 32, seed=8), frames(2, 32, seed=9)
    context = torch.randn(2, 77, 1024, generator=torch.Generator().manual_seed(0))
    perc = perceptual(generated, target)
    got = InversionLoss(perceptual)(generated, target, context)
    torch.testing.assert_close(got, by_hand(generated, target, context, perc))
    weighted = InversionLoss(perceptual, mse_weight=1.0, perceptual_weight=0.5, reg_weight=0.01)
    torch.testing.assert_close(
        weighted(generated, target, context), by_hand(generated, target, context, perc, (1.0, 0.5, 0.01))
    )
    terms = InversionLoss(perceptual).terms(generated, target, context)
    torch.testing.assert_close(terms.perceptual, perc)
    torch.testing.assert_close(terms.mse, F.mse_loss(generated, target, reduction="none").mean((1, 2, 3)))


def test_inversion_loss_reuses_target_features(perceptual):
    loss = InversionLoss(perceptual)
    generated, target = frames(2, 32, seed=10), frames(2, 32, seed=11)
    context = torch.rand(2, 77, 1024)
    feats = loss.target_features(target)
    torch.testing.assert_close(loss(generated, target, context, target_feats=feats), loss(generated, target, context))


def test_gradients_reach_generated_and_context(perceptual):
    generated = frames(2, 32, seed=12).requires_grad_(True)
    context = torch.randn(2, 77, 1024).requires_grad_(True)
    target = frames(2, 32, seed=13)
    InversionLoss(perceptual)(generated, target, context).sum().backward()
    for t in (generated, context):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceptual.parameters())
    # the perceptual term alone has a gradient too
    g2 = generated.detach().clone().requires_grad_(True)
    perceptual(g2, target).sum().backward()
    assert g2.grad.abs().sum() > 0


def test_perceptual_off(perceptual):
    generated, target = frames(2, 32, seed=14), frames(2, 32, seed=15)
    context = torch.randn(2, 77, 1024)
    off = InversionLoss(None)
    assert off.target_features(target) is None
    got = off(generated.half(), target, context.half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, by_hand(generated.half().float(), target, context.half().float(), torch.zeros(2))
    )
    on = InversionLoss(perceptual)(generated, target, context)
    assert bool((on > off(generated, target, context)).all())


def test_inversion_loss_rejects_bad_settings_and_shapes():
    with pytest.raises(ValueError):
        InversionLoss(None, mse_weight=-1)
    loss = InversionLoss(None)
    with pytest.raises(ValueError):
        loss(frames(2, 32), frames(3, 32), torch.zeros(2, 77, 1024))
    with pytest.raises(ValueError):
        loss(frames(2, 32), frames(2, 32), torch.zeros(3, 77, 1024))


# ---- a newcomer's first hour on a CPU (issue 25): VGG weights found in torch hub

def test_vgg_weights_are_found_in_torch_hub_without_reading_them(tmp_path, monkeypatch):
    from promptus.losses import VGG19_FILE, vgg19_weights_available

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    assert not vgg19_weights_available(online=False)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / VGG19_FILE).write_bytes(b"not read")
    assert vgg19_weights_available(online=False)
