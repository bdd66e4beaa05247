"""Low-rank prompts: quantizer, straight-through fake quant, interpolation, rate."""

import math

import numpy as np
import pytest
import torch

from promptus.config import CodecConfig
from promptus.errors import PromptusError
from promptus.prompts import (
    QuantizedTensor, RunningRange, dequantize, embedding, estimate_rate, factor_kbps, fake_quantize,
    interpolate_factors, keyframe_factor_bits, quant_params, quantize, quantize_tensor,
)


def segment_embeddings(U0, V0, U1, V1, interval: int) -> torch.Tensor:
    """Embeddings (T×tokens×dim) of the T frames of one segment: the factors interpolated, then multiplied."""
    u, v = interpolate_factors(U0, V0, U1, V1, interval)
    return embedding(u, v)


def round_trip(x: torch.Tensor) -> tuple[QuantizedTensor, torch.Tensor]:
    qt = quantize_tensor(x)
    return qt, qt.to_torch()


def test_params_follow_the_formula():
    lo, hi = -0.3, 1.2
    scale, zp = quant_params(lo, hi)
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert zp == round(255 - hi / ((hi - lo) / 255))
    assert np.float32(scale) == scale  # stored as float32


@pytest.mark.parametrize("x", [
    torch.linspace(-1, 3, 1000),
    torch.randn(77, 8),
    torch.rand(8, 1024),
])
def test_round_trip_error_is_at_most_half_a_step(x):
    qt, xh = round_trip(x)
    assert qt.q.dtype == np.uint8 and qt.shape == tuple(x.shape)
    assert (xh - x).abs().max() <= qt.scale / 2 + 1e-6
    # Zero is always exactly representable.
    assert float(dequantize(torch.tensor([qt.zero_point], dtype=torch.uint8), qt.scale, qt.zero_point)) == 0.0


def test_all_zeros_stay_zeros():
    qt, xh = round_trip(torch.zeros(4, 4))
    assert torch.equal(xh, torch.zeros(4, 4))
    assert qt.scale > 0


def test_constant_positive_tensor():
    # Range [0, c]: c is the top code, exactly representable.
    qt, xh = round_trip(torch.full((3, 3), 0.7))
    assert qt.zero_point == 0 and int(qt.q.max()) == 255
    assert torch.allclose(xh, torch.full((3, 3), 0.7), atol=1e-7)


def test_negative_only_tensor():
    x = -torch.rand(50) - 0.1
    qt, xh = round_trip(x)
    assert qt.zero_point == 255  # hi = 0 sits at the top code
    assert (xh - x).abs().max() <= qt.scale / 2 + 1e-6
    assert (xh <= 0).all()


def test_huge_values():
    x = torch.tensor([-3e30, 0.0, 1e30, 5e29])
    qt, xh = round_trip(x)
    assert torch.isfinite(xh).all()
    assert (xh - x).abs().max() <= qt.scale / 2 * (1 + 1e-5)


def test_non_finite_input_is_a_user_error():
    with pytest.raises(PromptusError, match="NaN"):
        quantize_tensor(torch.tensor([0.0, float("nan")]))
    with pytest.raises(PromptusError):
        quant_params(0.0, float("inf"))


def test_codes_clamp_outside_the_range():
    scale, zp = quant_params(-1.0, 1.0)
    q = quantize(torch.tensor([-5.0, 5.0]), scale, zp)
    assert q.tolist() == [0, 255]


def test_running_range_keeps_extremes_and_zero():
    r = RunningRange()
    r.update(torch.tensor([0.5, 2.0]))
    r.update(torch.tensor([1.0, 1.5]))
    assert (r.lo, r.hi) == (0.0, 2.0)
    r.update(torch.tensor([-3.0]))
    assert (r.lo, r.hi) == (-3.0, 2.0)
    r2 = RunningRange()
    r2.load_state_dict(r.state_dict())
    assert r2.params() == r.params()


def test_fake_quantize_forward_is_quantized_and_gradient_passes_straight_through():
    x = torch.randn(10, requires_grad=True)
    scale, zp = quant_params(float(x.detach().min()), float(x.detach().max()))
    y = fake_quantize(x, scale, zp)
    assert torch.equal(y.detach(), dequantize(quantize(x.detach(), scale, zp), scale, zp))
    (y * torch.arange(10.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(10.0))


def test_embedding_is_uv_over_sqrt_rank():
    U, V = torch.randn(77, 4), torch.randn(4, 1024)
    assert torch.allclose(embedding(U, V), U @ V / 2.0)
    with pytest.raises(PromptusError, match="rank"):
        embedding(U, torch.randn(3, 1024))


def test_interpolation_endpoints_equal_keyframes_and_midpoint_is_linear():
    g = torch.Generator().manual_seed(1)
    U0, U1 = torch.randn(77, 8, generator=g), torch.randn(77, 8, generator=g)
    V0, V1 = torch.randn(8, 1024, generator=g), torch.randn(8, 1024, generator=g)
    u, v = interpolate_factors(U0, V0, U1, V1, 10)
    assert u.shape == (10, 77, 8) and v.shape == (10, 8, 1024)
    assert torch.equal(u[-1], U1) and torch.equal(v[-1], V1)  # s = T is keyframe k+1
    assert torch.allclose(u[4], 0.5 * U0 + 0.5 * U1)  # s = 5 of 10
    assert torch.allclose(u[0], 0.9 * U0 + 0.1 * U1)
    # Factors are interpolated, not the embedding.
    c = segment_embeddings(U0, V0, U1, V1, 10)
    assert torch.allclose(c[4], (0.5 * U0 + 0.5 * U1) @ (0.5 * V0 + 0.5 * V1) / math.sqrt(8), atol=1e-5)
    assert not torch.allclose(c[4], 0.5 * (U0 @ V0 + U1 @ V1) / math.sqrt(8), atol=1e-2)
    assert torch.allclose(c[-1], embedding(U1, V1))


def test_rate_accounting_matches_design_numbers():
    cfg = CodecConfig(rank=8, interval=10, fps=30.0)
    assert keyframe_factor_bits(cfg) == 8 * 8 * (77 + 1024)
    # 3 keyframes per second of 70 464 bits each ≈ 211 kbps.
    assert factor_kbps(cfg) == pytest.approx(3 * 70464 / 1000)
    assert 211 <= factor_kbps(cfg) < 212
    est = estimate_rate(cfg, frame_count=151, init_precision="fp32")
    assert est.keyframes == 16
    assert est.init_bytes == 4 * 4 * 64 * 64 == 65536
    assert est.factor_bytes == 16 * 8808
    assert est.total_kbps > est.factor_kbps
    assert estimate_rate(cfg, 151, "int8").init_bytes == 4 * 64 * 64 + 4 * 5
    with pytest.raises(PromptusError):
        estimate_rate(cfg, 151, "bf12")
