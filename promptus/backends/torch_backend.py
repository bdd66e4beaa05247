"""Eager PyTorch backend: the reference implementation (fp32 on CPU, fp16 on CUDA)."""

from __future__ import annotations

import torch

from .base import Backend


class TorchBackend(Backend):
    """Runs the diffusers UNet and the TAESD decoder eagerly."""

    name = "torch"

    def __init__(self, unet: torch.nn.Module, taesd_decoder: torch.nn.Module,
                 device: torch.device | str, dtype: torch.dtype, *, channels_last: bool = False):
        super().__init__(torch.device(device), dtype)
        # nn.Module.to, not diffusers' override: that one warns about fp32-only modules
        # even when a model lists none. Note this moves the caller's modules in place.
        self.unet = torch.nn.Module.to(unet, self.device, dtype).eval().requires_grad_(False)
        self.taesd_decoder = torch.nn.Module.to(taesd_decoder, self.device, dtype).eval().requires_grad_(False)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.taesd_decoder.to(memory_format=torch.channels_last)
        self.channels_last = channels_last

    @torch.inference_mode()
    def denoise(self, z, timestep, context):
        t = torch.full((z.shape[0],), timestep, device=self.device, dtype=torch.long)
        z_in = z.to(self.device, self.dtype)
        if self.channels_last:
            z_in = z_in.contiguous(memory_format=torch.channels_last)
        eps = self.unet(z_in, t, encoder_hidden_states=context.to(self.device, self.dtype), return_dict=False)[0]
        return eps.float()

    @torch.inference_mode()
    def decode(self, latent):
        x = latent.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.taesd_decoder(x).float()
