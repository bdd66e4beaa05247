"""The segment step as one module — mix → UNet → x0 → TAESD → uint8 — for compilers.

:class:`SegmentStep` is what the ``compile`` backend hands to ``torch.compile`` as a
single graph, so that inductor sees (and fuses) the glue between the networks and a
saved artifact covers the whole step.

**Shared prefix.** Every frame of a segment starts from the same ``z`` at the same
timestep; only the prompt differs. Everything the UNet computes before its first
cross-attention is therefore identical across the batch: the time embedding,
``conv_in``, the first ResNet block, and in the first transformer block the input
projection and the self-attention over the 64×64 latent. With ``shared_prefix`` those
run once, at batch 1, and are broadcast to the T frames; the rest of the UNet is
diffusers' own blocks. :func:`shared_prefix_problem` says whether a UNet has the
layout this relies on (SD 2.x: ``CrossAttnDownBlock2D`` first, linear projections,
layer-norm transformer blocks).
"""

from __future__ import annotations

import torch

from ..schedule import OneStep, mix_latent, to_uint8


def shared_prefix_problem(unet: torch.nn.Module) -> str | None:
    """Why :func:`unet_shared_prefix` cannot run ``unet`` (``None`` when it can)."""
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(unet, "down_blocks"):
        return "not a diffusers UNet2DConditionModel"
    if getattr(unet, "time_embed_act", None) is not None or getattr(unet, "encoder_hid_proj", None) is not None:
        return "time-embedding activation or encoder projection is not supported"
    for name, want in (("class_embed_type", None), ("addition_embed_type", None), ("time_cond_proj_dim", None),
                       ("encoder_hid_dim_type", None), ("center_input_sample", False)):
        if cfg.get(name, want) != want:
            return f"config {name}={cfg.get(name)!r} is not supported"
    down0 = unet.down_blocks[0]
    if type(down0).__name__ != "CrossAttnDownBlock2D":
        return f"first down block is {type(down0).__name__}, not CrossAttnDownBlock2D"
    tr = down0.attentions[0]
    if not getattr(tr, "is_input_continuous", False) or not getattr(tr, "use_linear_projection", False):
        return "first transformer does not use linear projections on continuous input"
    if len(tr.transformer_blocks) != 1:
        return "first transformer has more than one block"
    blk = tr.transformer_blocks[0]
    if blk.norm_type != "layer_norm" or blk.pos_embed is not None or blk.only_cross_attention \
            or blk.attn2 is None or getattr(blk, "_chunk_size", None) is not None:
        return "first transformer block is not a plain layer-norm self+cross attention block"
    return None


def _first_transformer(tr, h1: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``tr(h1, encoder_hidden_states=context)`` for a batch-1 ``h1`` and a batch-n ``context``:
    the norm, input projection and self-attention at batch 1, the rest at batch n."""
    n = context.shape[0]
    _, c, height, width = h1.shape
    residual = h1
    x = tr.norm(h1).permute(0, 2, 3, 1).reshape(1, height * width, c)
    x = tr.proj_in(x)
    blk = tr.transformer_blocks[0]
    x = blk.attn1(blk.norm1(x)) + x
    x = x.expand(n, -1, -1)  # from here on, each frame's own prompt
    x = blk.attn2(blk.norm2(x), encoder_hidden_states=context) + x
    x = blk.ff(blk.norm3(x)) + x
    x = tr.proj_out(x)
    inner = x.shape[-1]
    x = x.reshape(n, height, width, inner).permute(0, 3, 1, 2).contiguous()
    return x + residual


def unet_shared_prefix(unet, z1: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``unet(z1.expand(n), timestep, encoder_hidden_states=context).sample`` for one shared ``z1``
    (1×4×h×w) and n prompts, with the batch-invariant prefix computed once (module docstring)."""
    n = context.shape[0]
    emb = unet.time_embedding(unet.time_proj(timestep).to(z1.dtype))  # 1×D: broadcast by every ResNet
    h = unet.conv_in(z1)
    skips = [h.expand(n, -1, -1, -1)]
    down0 = unet.down_blocks[0]
    h = down0.resnets[0](h, emb)
    h = _first_transformer(down0.attentions[0], h, context)
    skips.append(h)
    for resnet, attn in zip(down0.resnets[1:], down0.attentions[1:]):
        h = attn(resnet(h, emb), encoder_hidden_states=context, return_dict=False)[0]
        skips.append(h)
    for down in down0.downsamplers or ():
        h = down(h)
    if down0.downsamplers:
        skips.append(h)
    for block in unet.down_blocks[1:]:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=context)
        else:
            h = unet.mid_block(h, emb)
    # as diffusers: explicit upsample sizes only when the latent is not a multiple of 2^(number of upsamplers)
    factor = 2 ** unet.num_upsamplers
    explicit = any(s % factor for s in z1.shape[-2:])
    for i, block in enumerate(unet.up_blocks):
        k = len(block.resnets)
        res, skips = tuple(skips[-k:]), skips[:-k]
        size = skips[-1].shape[2:] if explicit and i < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context,
                      upsample_size=size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


class SegmentStep(torch.nn.Module):
    """One segment step as a module: ``forward(z_prev, noise, mix, context) → (x0, frames)``.

    ``z_prev`` and ``noise`` are 1×4×h×w float32, ``mix`` a 0-d float32 tensor and
    ``context`` n×77×1024; returns x0 (n×4×h×w float32) and frames (uint8 n×H×W×3),
    computed as :meth:`promptus.backends.TorchBackend._segment_eager` does: latent
    arithmetic in float32, the networks in ``dtype``.

    ``unet_channels_last`` / ``taesd_channels_last`` feed that network channels-last
    activations (its weights must be set to the same layout by the caller);
    ``shared_prefix`` computes the batch-invariant start of the UNet once (module docstring).
    """

    def __init__(self, unet: torch.nn.Module, taesd_decoder: torch.nn.Module, onestep: OneStep, dtype: torch.dtype,
                 *, shared_prefix: bool = False, unet_channels_last: bool = False,
                 taesd_channels_last: bool = False):
        super().__init__()
        self.unet = unet
        self.taesd_decoder = taesd_decoder
        self.onestep = onestep
        self.dtype = dtype
        self.shared_prefix = shared_prefix
        self.unet_channels_last = unet_channels_last
        self.taesd_channels_last = taesd_channels_last

    def forward(self, z_prev: torch.Tensor, noise: torch.Tensor, mix: torch.Tensor, context: torch.Tensor):
        n = context.shape[0]
        z = mix_latent(z_prev, noise, mix)
        zn = z.expand(n, -1, -1, -1)
        ctx = context.to(self.dtype)
        b = 1 if self.shared_prefix else n
        zin = (z if self.shared_prefix else zn).to(self.dtype)
        if self.unet_channels_last:
            zin = zin.contiguous(memory_format=torch.channels_last)
        t = torch.full((b,), self.onestep.timestep, device=z.device, dtype=torch.long)
        if self.shared_prefix:
            eps = unet_shared_prefix(self.unet, zin, t, ctx)
        else:
            eps = self.unet(zin, t, encoder_hidden_states=ctx, return_dict=False)[0]
        x0 = self.onestep.x0(zn, eps.float())
        x = x0.to(self.dtype)
        if self.taesd_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x0, to_uint8(self.taesd_decoder(x))
