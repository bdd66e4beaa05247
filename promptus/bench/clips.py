"""Clips of random prompts for timing decoders (no encoder needed)."""

from __future__ import annotations

import torch


def random_bitstream(config, keyframes: int, seed: int = 0, identity=None):
    """A bitstream of random prompts for timing (no encoder needed)."""
    from ..bitstream import Bitstream, Header, InitLatent, Keyframe, ModelIdentity
    from ..prompts import quantize_tensor

    g = torch.Generator().manual_seed(seed)
    kfs = [Keyframe(k * config.interval, quantize_tensor(torch.randn(config.tokens, config.rank, generator=g)),
                    quantize_tensor(torch.randn(config.rank, config.embed_dim, generator=g)))
           for k in range(keyframes)]
    init = InitLatent.from_array(torch.randn(config.latent_shape, generator=g).numpy(), "fp16")
    header = Header(config, (keyframes - 1) * config.interval + 1, identity or ModelIdentity.unknown())
    return Bitstream(header, init, kfs)
