"""The one-step math (docs/design.md, "The method"), checked against independently computed numbers."""

import math

import numpy as np
import pytest
import torch

from promptus.config import CodecConfig
from promptus.errors import PromptusError
from promptus.schedule import OneStep, make_noise, mix_latent, to_model_range, to_uint8


def reference_alpha_bar(t: int) -> float:
    # Scaled-linear schedule written out longhand: sqrt(beta) linear over 1000 steps.
    s0, s1 = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    for i in range(t + 1):
        beta = (s0 + (s1 - s0) * i / 999) ** 2
        prod *= 1 - beta
    return prod


def test_constants_at_999_match_schedule_and_published_values():
    o = OneStep.at(999)
    a = reference_alpha_bar(999)
    assert o.sigma == pytest.approx(math.sqrt((1 - a) / a), rel=1e-12)
    assert o.sigma == pytest.approx(14.6146, abs=1e-4)
    assert o.c_in == pytest.approx(0.0683, abs=1e-4)
    assert o.c_in == pytest.approx(1 / math.sqrt(1 + o.sigma**2), rel=1e-12)
    assert o.c_out == -o.sigma


def test_other_timesteps_follow_the_schedule():
    for t in (0, 500, 998):
        a = reference_alpha_bar(t)
        assert OneStep.at(t).sigma == pytest.approx(math.sqrt((1 - a) / a), rel=1e-10)
    with pytest.raises(PromptusError):
        OneStep.at(1000)


def test_x0_inverts_the_noising():
    # If eps_hat is the true noise, x0 recovers the clean latent: z = c_in (x0 + sigma eps).
    o = OneStep.at(999)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    z = o.c_in * (x0 + o.sigma * eps)
    assert torch.allclose(o.x0(z, eps), x0, atol=1e-10)


def test_noise_is_numpy_randomstate_randn_float32():
    cfg = CodecConfig(width=64, height=32, seed=88)
    eps = make_noise(cfg)
    ref = np.random.RandomState(88).randn(1, 4, 4, 8).astype(np.float32)
    assert eps.dtype == torch.float32 and tuple(eps.shape) == (1, 4, 4, 8)
    assert np.array_equal(eps.numpy(), ref)
    assert not torch.equal(make_noise(cfg.replace(seed=89)), eps)


def test_mix_is_convex_in_working_precision():
    zp = torch.full((1, 4, 2, 2), 2.0)
    eps = torch.full((1, 4, 2, 2), -1.0)
    z = mix_latent(zp, eps, 0.05)
    m = np.float32(0.05)
    expected = np.float32(2.0) * m + np.float32(-1.0) * (np.float32(1) - m)
    assert torch.all(z == torch.tensor(expected))
    assert torch.equal(mix_latent(zp, eps, 0.0), eps)
    assert torch.equal(mix_latent(zp, eps, 1.0), zp)


def test_image_to_uint8_rounds_and_clamps():
    img = torch.tensor([-2.0, -1.0, 0.0, 1 / 255, 0.5, 1.0, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(img)
    assert out.shape == (1, 1, 7, 3) and out.dtype == torch.uint8
    # (x+1)/2*255: -> 0, 0, 127.5->128 (round half to even gives 128), 128.0 -> 128, 191.25 -> 191, 255, 255
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 128, 191, 255, 255]


def test_uint8_model_range_round_trip():
    frames = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_range(frames)), frames)


def test_config_validation():
    with pytest.raises(PromptusError, match="multiple of 8"):
        CodecConfig(width=100)
    with pytest.raises(PromptusError, match="rank"):
        CodecConfig(rank=0)
    with pytest.raises(PromptusError, match="interval"):
        CodecConfig(interval=0)
    cfg = CodecConfig(interval=10)
    assert [cfg.keyframe_count(n) for n in (1, 2, 10, 11, 12, 21, 141)] == [1, 2, 2, 2, 3, 3, 15]
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg
