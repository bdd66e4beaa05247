"""Quality metrics (PSNR, SSIM, MS-SSIM, LPIPS), Bjøntegaard deltas and `promptus eval`."""

import argparse
import json
import logging
import math

import numpy as np
import pytest
import torch

from promptus.errors import PromptusError
from promptus.metrics import (
    LPIPSNet, MetricUnavailable, QualityMeter, bd_quality, bd_rate, evaluate, load_lpips, ms_ssim,
    ms_ssim_scales, psnr, ssim,
)
from promptus.commands.eval import register as add_eval_parser
from promptus.video import write_frames
from synthetic import synthetic_clip


def frames(n=4, size=64, seed=0, high=250):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, size, size, 3), generator=g, dtype=torch.uint8)


def noisy(x, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x.float() + sigma * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def test_identical_frames_psnr_inf_ssim_one():
    a = frames()
    rep = evaluate(a, a.clone(), lpips="off")
    assert rep.psnr == [math.inf] * 4 and rep.psnr_clip == math.inf
    assert rep.ssim == pytest.approx([1.0] * 4, abs=1e-6)
    assert rep.ms_ssim == pytest.approx([1.0] * 4, abs=1e-6)
    s = rep.summary()
    assert s["psnr"] == math.inf and s["ssim"] == pytest.approx(1.0, abs=1e-6) and s["severe_psnr_share"] == 0.0


def test_psnr_of_a_known_perturbation_matches_the_formula():
    a = frames(high=250)
    b = a + 3  # no overflow: values < 250
    expected = 20 * math.log10(255 / 3)
    assert psnr(a, b).tolist() == pytest.approx([expected] * 4, abs=1e-9)
    # One offset per frame: each frame's PSNR on its own, the clip value is their mean.
    a = frames(high=240)  # +8 must not wrap around
    c = a.clone()
    for i, d in enumerate((1, 2, 4, 8)):
        c[i] += d
    per = [20 * math.log10(255 / d) for d in (1, 2, 4, 8)]
    rep = evaluate(a, c, lpips="off")
    assert rep.psnr == pytest.approx(per, abs=1e-9)
    assert rep.mean("psnr") == pytest.approx(sum(per) / 4)
    assert rep.psnr_clip == pytest.approx(10 * math.log10(255**2 / np.mean([1, 4, 16, 64])))


def test_ssim_falls_with_noise_and_is_symmetric():
    a = torch.from_numpy(synthetic_clip(2, 64, 64).numpy())
    light, heavy = ssim(a, noisy(a, 4)), ssim(a, noisy(a, 40))
    assert (heavy < light).all() and (light < 1).all() and (heavy > 0).all()
    assert torch.allclose(ssim(noisy(a, 4), a), light, atol=1e-6)


def test_ms_ssim_scales_follow_the_frame_size():
    assert ms_ssim_scales(512, 512) == 5 and ms_ssim_scales(176, 300) == 5 and ms_ssim_scales(175, 175) == 4
    assert ms_ssim_scales(98, 98) == 3 and ms_ssim_scales(99, 99) == 4
    assert ms_ssim_scales(64, 64) == 3 and ms_ssim_scales(32, 32) == 2 and ms_ssim_scales(20, 20) == 0
    a = frames(2, 176)
    assert ms_ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    b = noisy(a, 20)
    assert (ms_ssim(a, b) < 1).all()
    rep = evaluate(a[:, :64, :64].contiguous(), b[:, :64, :64].contiguous(), lpips="off")
    assert rep.ms_ssim_scales == 3 and len(rep.ms_ssim) == 2


def test_ms_ssim_of_tiny_frames_is_unavailable_with_a_reason():
    a = frames(2, 16)
    with pytest.raises(MetricUnavailable, match="too small"):
        ms_ssim(a, a)
    rep = evaluate(a, a, lpips="off")
    assert rep.ms_ssim is None and "too small" in rep.unavailable["ms_ssim"]
    assert rep.summary()["ms_ssim"] is None and rep.ssim  # the other metrics are still there


def test_lpips_is_reported_unavailable_here_with_the_reason(tmp_path, monkeypatch):
    """No AlexNet weights (they cannot be downloaded here): LPIPS is None plus a reason, never a number."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(MetricUnavailable) as err:
        load_lpips()
    reason = err.value.reason
    assert "alexnet-owt-7be5be79.pth" in reason and "--lpips-weights" in reason
    print("LPIPS here:", reason)
    a = frames(2)
    rep = evaluate(a, noisy(a, 10))  # lpips="auto"
    s = rep.summary()
    assert s["lpips"] is None and s["severe_lpips_share"] is None and rep.lpips is None
    assert s["unavailable"]["lpips"] == reason
    with pytest.raises(MetricUnavailable, match="do not exist"):
        load_lpips(tmp_path / "no_such_alexnet.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a state dict")
    with pytest.raises(MetricUnavailable, match="cannot load"):
        load_lpips(tmp_path / "bad.pth")
    assert evaluate(a, a, lpips="off").unavailable["lpips"].startswith("switched off")


def random_alexnet_file(path, seed=0):
    """A state dict in torchvision's AlexNet layout with random weights (the real ones can't be downloaded here)."""
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in LPIPSNet().features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(2, 2)  # the rest of torchvision's file is ignored
    torch.save(state, path)
    return path


def test_lpips_with_local_backbone_weights(tmp_path):
    lp = load_lpips(random_alexnet_file(tmp_path / "alexnet.pth"))
    a = torch.from_numpy(synthetic_clip(3, 64, 64).numpy())
    assert lp(a, a).tolist() == pytest.approx([0.0] * 3, abs=1e-7)
    light, heavy = lp(a, noisy(a, 5)), lp(a, noisy(a, 60))
    assert (light > 0).all() and (heavy > light).all()
    rep = evaluate(a, noisy(a, 60), lpips=lp, lpips_threshold=float(heavy.min()) / 2)
    assert rep.lpips == pytest.approx(heavy.tolist()) and rep.severe_lpips_share == 1.0
    assert "lpips" not in rep.unavailable and rep.summary()["lpips"] == pytest.approx(float(heavy.mean()))


def test_lpips_matches_torchmetrics_where_torchvision_is_installed(tmp_path):
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - any import failure means no reference here
        pytest.skip(f"torchvision is not importable here ({type(e).__name__}), so torchmetrics' LPIPS can't run")
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None)
    torch.save(tv.state_dict(), tmp_path / "alexnet.pth")
    ref = _NoTrainLpips(net="alex", pnet_rand=True)
    for i in range(1, 6):
        for name, module in getattr(ref.net, f"slice{i}").named_children():
            module.load_state_dict(tv.features[int(name)].state_dict())
    a = frames(2)
    b = noisy(a, 20)
    ours = load_lpips(tmp_path / "alexnet.pth")(a, b)
    theirs = ref(a.permute(0, 3, 1, 2).float() / 127.5 - 1, b.permute(0, 3, 1, 2).float() / 127.5 - 1).flatten()
    assert torch.allclose(ours.float(), theirs, rtol=1e-4, atol=1e-6)


def test_severe_frame_share_uses_the_stated_thresholds():
    a = frames(4)
    b = torch.cat([noisy(a[:2], 2), noisy(a[2:], 60)])  # ~42 dB and ~13 dB
    rep = evaluate(a, b, lpips="off")
    assert rep.psnr[0] > 30 and rep.psnr[3] < 20
    assert rep.severe_psnr_share == 0.5 and rep.summary()["psnr_threshold_db"] == 20.0
    assert evaluate(a, b, lpips="off", psnr_threshold_db=50).severe_psnr_share == 1.0


def test_meter_accumulates_batches_like_one_call():
    a, b = frames(5), noisy(frames(5), 10)
    m = QualityMeter(lpips="off")
    m.update(a[:2], b[:2])
    m.update(a[2:], b[2:])
    whole = evaluate(a, b, lpips="off")
    assert m.report.psnr == pytest.approx(whole.psnr) and m.report.ssim == pytest.approx(whole.ssim)


def test_bad_inputs_are_user_errors():
    a = frames(2)
    with pytest.raises(PromptusError, match="uint8"):
        psnr(a.float(), a.float())
    with pytest.raises(PromptusError, match="size"):
        psnr(a, frames(2, 32))


# ------------------------------------------------------------------ BD


RATES = [100.0, 200.0, 400.0, 800.0]
PSNR = [30.0, 33.0, 35.5, 37.0]


def test_bd_rate_of_a_curve_against_itself_is_zero():
    assert bd_rate(RATES, PSNR, RATES, PSNR) == pytest.approx(0.0, abs=1e-9)
    assert bd_quality(RATES, PSNR, RATES, PSNR) == pytest.approx(0.0, abs=1e-9)


def test_bd_rate_of_twice_the_bitrate():
    double = [2 * r for r in RATES]
    assert bd_rate(RATES, PSNR, double, PSNR) == pytest.approx(100.0, abs=1e-6)  # test needs 2× the bits
    assert bd_rate(double, PSNR, RATES, PSNR) == pytest.approx(-50.0, abs=1e-6)  # test needs half
    assert bd_quality(double, PSNR, RATES, PSNR) > 0  # more quality at equal rate
    # Three points: a quadratic fit, still exact for a pure rate scaling.
    assert bd_rate(RATES[:3], PSNR[:3], double[:3], PSNR[:3]) == pytest.approx(100.0, abs=1e-6)


def test_bd_rate_is_none_without_overlap_or_points():
    assert bd_rate(RATES, PSNR, RATES, [q + 20 for q in PSNR]) is None
    assert bd_rate(RATES, PSNR, [100.0], [31.0]) is None
    assert bd_rate(RATES, PSNR, [100.0, 200.0], [math.inf, math.inf]) is None  # non-finite points are dropped


# ------------------------------------------------------------------ eval


def run_eval(argv):
    p = argparse.ArgumentParser()
    add_eval_parser(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_eval_mp4_against_png_folder_with_a_length_mismatch(tmp_path, capsys, caplog):
    clip = synthetic_clip(10, 64, 64).numpy()
    write_frames(clip, tmp_path / "ref", 24)
    write_frames(clip[:8], tmp_path / "dec.mp4", 24)
    out = tmp_path / "eval.json"
    with caplog.at_level(logging.WARNING, logger="promptus"):
        assert run_eval(["eval", str(tmp_path / "ref"), str(tmp_path / "dec.mp4"), "--json", str(out)]) == 0
    assert "comparing the first 8" in caplog.text
    d = json.loads(out.read_text())
    assert (d["reference_frames"], d["decoded_frames"], d["frames_compared"]) == (10, 8, 8)
    assert len(d["per_frame"]["psnr"]) == 8 and 25 < d["summary"]["psnr"] < 80  # x264 CRF 12
    assert d["summary"]["lpips"] is None and "lpips" in d["summary"]["unavailable"]
    text = capsys.readouterr().out
    assert "PSNR" in text and "unavailable" in text and "PSNR < 20 dB" in text


def test_eval_identical_folders_writes_inf_as_a_string(tmp_path, capsys):
    write_frames(synthetic_clip(3, 32, 32).numpy(), tmp_path / "a", 24)
    out = tmp_path / "e.json"
    assert run_eval(["eval", str(tmp_path / "a"), str(tmp_path / "a"), "--json", str(out), "--size", "32"]) == 0
    d = json.loads(out.read_text())  # strict JSON: no Infinity
    assert d["summary"]["psnr"] == "inf" and d["per_frame"]["psnr"] == ["inf"] * 3
    assert d["summary"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert "inf" in capsys.readouterr().out
