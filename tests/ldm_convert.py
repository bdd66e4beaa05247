"""Test helper: diffusers state dicts → original Stability/LDM key layout.

The inverse of diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``,
written independently from the LDM naming so that a tiny diffusers model can be saved
as an original-format single file (``model.diffusion_model.*``, ``first_stage_model.*``)
and loaded back through :func:`promptus.models.load_models`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    layer, param = rest.rsplit(".", 1)
    return f"{_UNET_RESNET[layer]}.{param}"


def unet_diffusers_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """LDM UNet keys (without the ``model.diffusion_model.`` prefix) for a diffusers UNet state dict."""
    per_level = config["layers_per_block"] + 1  # resnets per level in the LDM layout (+ downsampler / upsampler)
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            b, l, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * per_level + l}.0.{_resnet(rest)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            b, l, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * per_level + l}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            new = f"input_blocks.{1 + b * per_level + per_level - 1}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            b, l, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{b * per_level + l}.0.{_resnet(rest)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            b, l, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{b * per_level + l}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            slot = 2 if up_has_attn[b] else 1
            new = f"output_blocks.{b * per_level + per_level - 1}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[new] = value
    return out


def vae_diffusers_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """LDM VAE keys (without the ``first_stage_model.`` prefix) for a diffusers AutoencoderKL state dict.

    Attention q/k/v/proj_out become 1×1 convolution weights, as in the original files.
    """
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[new] = value
    return out


def ldm_checkpoint(unet, vae=None) -> dict[str, torch.Tensor]:
    """An original-format single-file state dict for a diffusers UNet (and VAE)."""
    ckpt = {
        f"model.diffusion_model.{k}": v.contiguous()
        for k, v in unet_diffusers_to_ldm(unet.state_dict(), unet.config).items()
    }
    if vae is not None:
        vae_ldm = vae_diffusers_to_ldm(vae.state_dict(), vae.config)
        ckpt.update({f"first_stage_model.{k}": v.contiguous() for k, v in vae_ldm.items()})
    return ckpt
