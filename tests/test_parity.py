"""Release parity: the decoder's parity="release" mode against the public release's generation loop.

The reference below transcribes the release's generation script (generation.py with the
sgm sampler and denoiser it calls) for the tiny model on the CPU, where its
``autocast("cuda")`` does nothing: float32 networks, one frame per UNet call, and the
uint8 truncation done on a float16 image (what the release's CUDA run converts).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_legacy_folder

from promptus.backends import ReleaseParityBackend, make_backend
from promptus.bitstream import read
from promptus.commands.main import main
from promptus.config import PARITY_OURS, PARITY_RELEASE
from promptus.decoder import Decoder
from promptus.errors import PromptusError
from promptus.pipeline import PipelinedDecoder
from promptus.schedule import to_uint8, to_uint8_release

from test_decoder import make_bitstream


def release_dequantize(qt):
    """QParam.dequantize_tensor: scale · (q − zero_point) on tensors, as loaded from a .prompt file."""
    scale = torch.tensor(qt.scale, dtype=torch.float32)
    zero_point = torch.tensor(float(qt.zero_point), dtype=torch.float32)
    return scale * (torch.from_numpy(qt.q) - zero_point)


def release_generation(models, bs):
    """generation.py's loop for the prompts of ``bs``: uint8 frames 0 .. last keyframe."""
    cfg = bs.header.config
    rank, interval, H, W = cfg.rank, cfg.interval, cfg.height, cfg.width
    unet, decoder = models.unet, models.taesd.decoder

    # SubstepSampler(n_sample_steps=1) over LegacyDDPMDiscretization: σ_max, then 0.
    betas = torch.linspace(0.00085**0.5, 0.0120**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas.numpy(), axis=0)
    sigmas = torch.flip(torch.tensor((1 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32) ** 0.5, (0,))
    sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])[[0, 1000]]

    def denoiser(input, sigma, c):  # DiscreteDenoiser with EpsScaling; σ_max quantizes to index 999
        s = sigma[:, None, None, None]
        c_skip, c_out, c_in = torch.ones_like(s), -s, 1 / (s**2 + 1.0) ** 0.5
        eps = unet(input * c_in, torch.tensor([999]), encoder_hidden_states=c).sample
        return eps * c_out + input * c_skip

    def sampler(x, c):  # EulerAncestralSampler, eta 1, one step
        x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        s_in = x.new_ones([x.shape[0]])
        sigma, next_sigma = s_in * sigmas[0], s_in * sigmas[1]
        sigma_up = torch.minimum(next_sigma, 1.0 * (next_sigma**2 * (sigma**2 - next_sigma**2) / sigma**2) ** 0.5)
        sigma_down = (next_sigma**2 - sigma_up**2) ** 0.5
        denoised = denoiser(x, sigma, c)
        d = (x - denoised) / sigma[:, None, None, None]
        x = x + (sigma_down - sigma)[:, None, None, None] * d
        return x  # the ancestral noise step is skipped: the next σ is 0

    frames = []

    def generate(randn, c):
        samples_z = sampler(randn, c)
        img = decoder(samples_z).to(torch.float16)  # the CUDA run's TAESD image is float16
        img = torch.clamp(img, min=-1.0, max=1.0)
        img = torch.clamp((img + 1.0) / 2.0, min=0.0, max=1.0)
        frames.append((255 * img).to(dtype=torch.uint8).permute(0, 2, 3, 1)[0])
        return samples_z

    with torch.no_grad():
        rand_noise = torch.from_numpy(np.random.RandomState(cfg.seed).randn(1, 4, H // 8, W // 8)).to(torch.float32)
        sigma = torch.Tensor([cfg.mix]).float()
        prev_frame = None
        for curr, nxt in zip(bs.keyframes, bs.keyframes[1:]):
            U_curr, V_curr = release_dequantize(curr.U_q), release_dequantize(curr.V_q)
            U_next, V_next = release_dequantize(nxt.U_q), release_dequantize(nxt.V_q)
            if prev_frame is None:
                prev_frame = bs.init.to_torch()
                z = prev_frame * sigma + rand_noise * (1 - sigma)
                c = (U_curr @ V_curr / np.sqrt(rank)).unsqueeze(dim=0)
                prev_frame = generate(randn=z, c=c)
            z = prev_frame * sigma + rand_noise * (1 - sigma)
            for step in range(1, interval + 1):
                factor = 1 / interval
                u = (1 - step * factor) * U_curr + (step * factor) * U_next
                v = (1 - step * factor) * V_curr + (step * factor) * V_next
                c = (u @ v / np.sqrt(rank)).unsqueeze(dim=0)
                prev_frame = generate(randn=z, c=c)
    return torch.stack(frames)


@pytest.fixture(scope="module")
def clip(tiny):
    # interval 10: its interpolation weights 1 − s/T differ in the last bit from ours at s = 6, 8, 9
    bs = make_bitstream(tiny, frame_count=21, interval=10, rank=4)
    return bs, release_generation(tiny, bs)


def test_release_parity_reproduces_the_release_loop_exactly(tiny, clip):
    bs, ref = clip
    decoder = Decoder(make_backend("auto", tiny, "cpu", batch=10, size=64, parity=PARITY_RELEASE), tiny.identity())
    assert decoder.parity == PARITY_RELEASE
    frames = decoder.decode_all(bs)
    assert frames.shape == ref.shape == (21, 64, 64, 3)
    for i in range(len(ref)):
        assert torch.equal(frames[i], ref[i]), f"frame {i} differs from the release's"
    assert ref.float().std() > 1  # not a constant image

    # The streaming, pipelined decoder (what `promptus decode` runs) gives the same frames.
    out = []
    PipelinedDecoder(decoder, to_host=True).run([bs.header, bs.init, *bs.keyframes], lambda s, f: out.append(f.clone()))
    assert torch.equal(torch.cat(out), frames)


def test_our_default_decoder_is_not_the_release(tiny, clip):
    """The reference can tell the modes apart: ours rounds, so it sits at or just above the release."""
    bs, ref = clip
    ours = Decoder(make_backend("torch", tiny, "cpu", batch=10, size=64), tiny.identity()).decode_all(bs)
    diff = ours.int() - ref.int()
    assert not torch.equal(ours, ref)
    assert 0.3 < (diff > 0).float().mean() < 0.7  # about half the values are one above
    assert diff.min() >= -1 and diff.max() <= 2  # float32 here: only rounding and last-bit differences


def test_release_uint8_truncates_in_float16():
    # -0.0039253... is a float16 value: (x + 1)/2 · 255 is 127.0 in float16 but 126.9995 in float32.
    x = torch.tensor([-1.5, -1.0, -0.003925323486328125, 0.0, 0.5, 0.999, 1.0, 2.0], dtype=torch.float16)
    img = x.view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = to_uint8_release(img)
    assert out.shape == (1, 1, 8, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 127, 191, 254, 255, 255]
    f32 = (255 * ((x.float() + 1) / 2).clamp(0, 1)).to(torch.uint8)
    assert f32[2] == 126  # truncating in float32 would give another byte
    # A float32 image (the CPU) is rounded to float16 first.
    assert torch.equal(to_uint8_release(img.float()), out)
    # Never above our rounding, at most one below.
    g = torch.linspace(-1.2, 1.2, 10_001).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    d = to_uint8(g).int() - to_uint8_release(g).int()
    assert d.min() == 0 and d.max() == 1 and 0.3 < d.float().mean() < 0.7


def test_release_parity_needs_its_backend(tiny):
    eager = make_backend("eager", tiny, "cpu", batch=4, size=64)
    with pytest.raises(PromptusError, match="make_backend"):
        Decoder(eager, parity=PARITY_RELEASE)
    with pytest.raises(PromptusError, match="unknown parity"):
        Decoder(eager, parity="paper")
    with pytest.raises(PromptusError, match="cannot use the torch backend"):
        make_backend("torch", tiny, "cpu", batch=4, size=64, parity=PARITY_RELEASE)
    release = make_backend("eager", tiny, "cpu", batch=4, size=64, parity=PARITY_RELEASE)
    assert isinstance(release, ReleaseParityBackend) and release.dtype == torch.float32
    assert "one frame per call" in release.describe() and "truncated" in release.describe()
    with pytest.raises(PromptusError, match="parity 'ours'"):
        Decoder(release, parity=PARITY_OURS)
    assert Decoder(eager).parity == PARITY_OURS


def test_decode_command_with_parity_release_reproduces_release_prompts(tiny, tmp_path, capsys):
    """Prompts in the release's own layout, imported and decoded with --parity release: the release's frames."""
    make_legacy_folder(tmp_path / "rank2_interval4", keyframes=3, interval=4)
    clip = tmp_path / "clip.promptus"
    assert main(["-q", "import-legacy", str(tmp_path / "rank2_interval4"), "-o", str(clip), "--fps", "24",
                 "--init-precision", "fp32"]) == 0
    out = tmp_path / "frames"
    assert main(["decode", str(clip), "-o", f"{out}/", "--model", "tiny", "--device", "cpu", "--parity", "release"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 9 frames" in printed and "parity release" in printed and "one frame per call" in printed
    frames = torch.stack([torch.from_numpy(np.array(Image.open(f))) for f in sorted(out.iterdir())])
    assert torch.equal(frames, release_generation(tiny, read(clip)))
