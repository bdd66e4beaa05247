"""Random-weight models built in code: the tiny test model and the full-size architecture for timing.

:func:`tiny_models` builds small random-weight models of SD-Turbo's architecture family,
deterministically (numpy's generator, not torch's), for tests and the CPU demo
(``--model tiny``); :func:`full_size_random_models` builds the real architecture with
random weights for benchmarks (``--model random``): the cost of a forward pass does not
depend on the weight values. Neither can reconstruct a real image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .networks import (
    DIFFUSERS_CLASSES, Models, _freeze, diffusers_classes, sd_turbo_unet_config, sd_vae_config, taesd_config,
)

#: Gains applied to the tiny models' last convolutions after the deterministic init
#: (measured once for seed 0): the UNet's predicted noise gets roughly unit std on
#: N(0, 1) input (≈ 0.32 without the gain), and the TAESD decoder's image spreads around
#: mid-grey instead of sitting near black. Constants, not measured at build time, so the
#: tiny weights never depend on the floating-point details of a forward pass.
_TINY_UNET_OUT_GAIN = 3.0
_TINY_TAESD_OUT_GAIN = 8.0


# ---------------------------------------------------------------------------------
# Tiny and random models
# ---------------------------------------------------------------------------------


def _tiny_unet_config() -> dict[str, Any]:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        # diffusers' SD 2.x quirk: attention_head_dim holds the number of heads per block
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=1024,
        use_linear_projection=True,
    )


def _tiny_taesd_config() -> dict[str, Any]:
    return dict(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        latent_magnitude=3,
        latent_shift=0.5,
        scaling_factor=1.0,
    )


def _tiny_vae_config() -> dict[str, Any]:
    return dict(
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


def tiny_configs() -> dict[str, dict[str, Any]]:
    """Architectures of :func:`tiny_models`, keyed ``"unet"``, ``"taesd"``, ``"vae"`` (fresh dicts).

    Useful with ``load_models(..., configs=tiny_configs())`` to load tiny weights saved
    as a single file.
    """
    return {"unet": _tiny_unet_config(), "taesd": _tiny_taesd_config(), "vae": _tiny_vae_config()}


@torch.no_grad()
def _deterministic_init(module: torch.nn.Module, seed: int, stream: int) -> None:
    """Overwrite every parameter from numpy's MT19937, independently of torch's RNG.

    Parameters are visited in sorted-name order: biases → 0, 1-D weights (norms) → 1,
    other weights → uniform(−b, b) with b = 1/sqrt(fan_in).
    """
    rng = np.random.RandomState([seed, stream])
    params = dict(module.named_parameters())
    for name in sorted(params):
        p = params[name]
        if name.endswith("bias"):
            values = np.zeros(p.shape, dtype=np.float32)
        elif p.ndim == 1:
            values = np.ones(p.shape, dtype=np.float32)
        else:
            bound = 1.0 / math.sqrt(math.prod(p.shape[1:]))
            values = rng.uniform(-bound, bound, size=p.shape).astype(np.float32)
        p.copy_(torch.from_numpy(values))


def tiny_models(seed: int = 0) -> Models:
    """Small random-weight models of SD-Turbo's architecture family, for tests (CPU, float32).

    Same interfaces as the real ones: the UNet takes 4-channel latents, timestep and a
    77×1024 prompt (CrossAttn/plain down and up blocks, linear projections); TAESD and
    the VAE map images to 4-channel latents 8× smaller and back. Weights depend only on
    ``seed`` (numpy's generator), not on torch's RNG, machine or version.
    """
    AutoencoderKL, AutoencoderTiny, UNet2DConditionModel = diffusers_classes(*DIFFUSERS_CLASSES)

    configs = tiny_configs()
    unet = UNet2DConditionModel.from_config(configs["unet"])
    taesd = AutoencoderTiny.from_config(configs["taesd"])
    vae = AutoencoderKL.from_config(configs["vae"])
    for stream, module in enumerate((unet, taesd, vae)):
        _deterministic_init(module, seed, stream)
    with torch.no_grad():
        unet.conv_out.weight.mul_(_TINY_UNET_OUT_GAIN)
        last = taesd.decoder.layers[-1]  # TAESD's image is in [0, 1] before diffusers maps it to [-1, 1]
        last.weight.mul_(_TINY_TAESD_OUT_GAIN)
        last.bias.fill_(0.5)
    _freeze(unet, taesd, vae)
    return Models(unet=unet, taesd=taesd, vae=vae, name="tiny")


def full_size_random_models(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    vae: bool = False,
) -> Models:
    """The full-size SD-Turbo UNet and TAESD (and optionally the SD VAE) with random weights.

    For timing: the cost of a forward pass does not depend on the weight values. Weights
    come from torch's default init after ``torch.manual_seed(seed)``, built directly on
    ``device`` (so they differ between CPU and CUDA). Name ``"sd-turbo-random"``.
    """
    AutoencoderKL, AutoencoderTiny, UNet2DConditionModel = diffusers_classes(*DIFFUSERS_CLASSES)

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(sd_turbo_unet_config())
        taesd = AutoencoderTiny.from_config(taesd_config())
        sd_vae = AutoencoderKL.from_config(sd_vae_config()) if vae else None
    models = Models(unet=unet, taesd=taesd, vae=sd_vae, name="sd-turbo-random").to(device, dtype)
    _freeze(*models._components())
    return models
