"""The inversion loss: reconstruction + VGG-19 perceptual + prompt regulariser (docs/design.md, "The method").

Per frame the encoder minimises ``0.8·MSE + 0.2·perceptual + 0.1·mean|c|``:

* MSE between the generated and the real frame, both in [-1, 1];
* perceptual: for each of the 16 conv layers of VGG-19 the MSE between the conv
  outputs (before their ReLU) of the two frames, taken in [0, 1] with ImageNet
  normalisation, averaged over the 16 layers;
* mean |c| of the frame's embedding ``c`` (77×1024).

Every term is returned per frame (shape ``(B,)``) so that the trainer can weight its
worst frame. VGG-19 is re-declared here with torchvision's layer indices, so that
torchvision's published ImageNet weights (``vgg19-dcbb9e9d.pth``) load without
torchvision; :func:`load_vgg19` is the one place those weights come from and
:func:`random_vgg19` builds the same network with random weights for tests and timing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from .errors import ModelNotFoundError

logger = logging.getLogger(__name__)

#: torchvision's VGG-19 ImageNet weights: file name (in torch.hub's checkpoints folder) and URL.
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"

#: torchvision's configuration "E" (VGG-19): conv output channels, "M" = 2×2 max-pool.
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip
#: Indices of the 16 Conv2d layers in torchvision's ``vgg19().features``.
VGG19_CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TRUTHY = {"1", "ON", "YES", "TRUE"}


# ---------------------------------------------------------------- the network


class VGG19Features(nn.Module):
    """torchvision's ``vgg19().features``, with the same module indices.

    ``self.features`` is an ``nn.Sequential`` of 37 modules laid out exactly as
    torchvision's, so a torchvision VGG-19 state dict (``features.{i}.weight`` /
    ``features.{i}.bias``) loads as is. ``forward`` returns the outputs of the 16
    Conv2d layers (pre-ReLU, where the published loss taps them) and stops after the
    16th, so the last ReLU and pool are never run.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1))
                # not inplace (torchvision's is): an inplace ReLU would overwrite the conv output we return
                layers.append(nn.ReLU(inplace=False))
                in_channels = int(v)
        self.features = nn.Sequential(*layers)
        self._conv_indices = tuple(i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d))
        assert self._conv_indices == VGG19_CONV_INDICES

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 16 conv outputs (before ReLU) for an ImageNet-normalised batch B×3×H×W."""
        outputs: list[torch.Tensor] = []
        last = self._conv_indices[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._conv_indices:
                outputs.append(x)
                if i == last:
                    break
        return outputs

    def stages(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` ranges of ``features`` for the five stages: convs up to and with a max-pool.

        The last stage stops after the 16th conv, as :meth:`forward` does.
        """
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        bounds = [0, *(i + 1 for i in pools[:-1]), self._conv_indices[-1] + 1]
        return tuple(zip(bounds[:-1], bounds[1:]))

    def run(self, x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Layers ``start:stop`` on ``x``: their output and the conv outputs (pre-ReLU) among them."""
        outputs = []
        for i in range(start, stop):
            x = self.features[i](x)
            if i in self._conv_indices:
                outputs.append(x)
        return x, outputs


def _conv_shapes() -> dict[int, tuple[int, int]]:
    """{features index: (out_channels, in_channels)} of VGG-19's convs."""
    channels = [v for v in VGG19_CFG if v != "M"]
    ins = [3, *channels[:-1]]
    return {i: (int(out), int(in_c)) for i, out, in_c in zip(VGG19_CONV_INDICES, channels, ins)}


def random_vgg19(seed: int = 0) -> VGG19Features:
    """VGG-19 with deterministic random weights, frozen and in eval mode (tests, timing).

    Weights are He-uniform (±sqrt(6/fan_in)), biases uniform ±1/sqrt(fan_in) like
    torch's default, drawn from ``numpy.random.RandomState(seed)`` in layer order.
    """
    rng = np.random.RandomState(seed)
    state = {}
    for i, (out_c, in_c) in _conv_shapes().items():
        fan_in = in_c * 9
        w_bound, b_bound = np.sqrt(6.0 / fan_in), 1.0 / np.sqrt(fan_in)
        weight = rng.uniform(-w_bound, w_bound, (out_c, in_c, 3, 3))
        bias = rng.uniform(-b_bound, b_bound, (out_c,))
        state[f"features.{i}.weight"] = torch.from_numpy(weight.astype(np.float32))
        state[f"features.{i}.bias"] = torch.from_numpy(bias.astype(np.float32))
    vgg = VGG19Features()
    vgg.load_state_dict(state)
    return vgg.eval().requires_grad_(False)


# ---------------------------------------------------------------- weights


def _offline_by_env() -> bool:
    return any(os.environ.get(k, "").strip().upper() in _TRUTHY for k in ("PROMPTUS_OFFLINE", "HF_HUB_OFFLINE"))


def _is_online(host: str = "download.pytorch.org", port: int = 443, timeout: float = 2.0) -> bool:
    """Whether ``host:port`` answers within ``timeout`` seconds; False when told to stay offline.

    ``PROMPTUS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` means offline without touching the
    network. The connection runs in a daemon thread because name resolution ignores
    socket timeouts and can hang far longer than ``timeout`` on a machine without DNS.
    """
    if _offline_by_env():
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except BaseException:  # any failure (DNS, refused, timeout) means: not online
            result.append(False)

    thread = threading.Thread(target=probe, name="promptus-online-probe", daemon=True)
    try:
        thread.start()
        thread.join(timeout)
    except Exception:
        return False
    return bool(result and result[0])


def _help_text() -> str:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"The perceptual loss needs torchvision's VGG-19 ImageNet weights, {VGG19_FILE}. "
        f"Put that file in {checkpoints}/ (torch.hub's checkpoints folder; TORCH_HOME moves it) "
        f"or pass its path with --vgg PATH (load_vgg19(path) from Python). "
        f"On a connected machine fetch it from {VGG19_URL}. "
        "Or run with --perceptual off (MSE and regulariser only; lower quality)."
    )


def _read_weights(path: Path) -> object:
    """The object stored in a .pth (tensors only) or .safetensors file."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/safetensors errors all mean: not a readable weights file
        raise ModelNotFoundError(
            f"{path}: cannot read weights ({type(e).__name__}: {e}); expected torchvision's VGG-19 "
            f"state dict ({VGG19_FILE}, or a .safetensors of the same keys).\n{_help_text()}"
        ) from e


def _vgg19_state(state: object, source: str) -> dict[str, torch.Tensor]:
    """The 32 conv tensors of a torchvision VGG-19 state dict, checked and as float32.

    ``classifier.*`` keys are ignored; a state dict of ``vgg19().features`` alone
    (keys ``{i}.weight``) is accepted too.
    """
    not_vgg = f"{source}: not a torchvision VGG-19 state dict"
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ModelNotFoundError(f"{not_vgg} (holds a {type(state).__name__}).\n{_help_text()}")
    if "features.0.weight" not in state and "0.weight" in state:
        state = {f"features.{k}": v for k, v in state.items()}
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    expected: dict[str, tuple[int, ...]] = {}
    for i, (out_c, in_c) in _conv_shapes().items():
        expected[f"features.{i}.weight"] = (out_c, in_c, 3, 3)
        expected[f"features.{i}.bias"] = (out_c,)
    missing = [k for k in expected if k not in features]
    unexpected = sorted(set(features) - set(expected))
    if missing or unexpected:
        detail = (f"missing {missing[:4]}" if missing else "") + (" " if missing and unexpected else "")
        detail += f"unexpected {unexpected[:4]}" if unexpected else ""
        raise ModelNotFoundError(
            f"{not_vgg} ({detail}; VGG-16, VGG-19-BN and other networks do not fit).\n{_help_text()}"
        )
    out = {}
    for k, shape in expected.items():
        v = features[k]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape or not v.is_floating_point():
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ModelNotFoundError(f"{not_vgg} ({k} is {got}, VGG-19 has {shape}).\n{_help_text()}")
        out[k] = v.detach().to(torch.float32)
    return out


def vgg19_weights_available(online: bool | None = None) -> bool:
    """Whether :func:`load_vgg19` without a path can find its weights: in torch.hub's checkpoints folder, or
    by download when ``online`` (``None`` probes, as :func:`load_vgg19` does). Reads nothing."""
    if (Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE).is_file():
        return True
    return _is_online() if online is None else online


def load_vgg19(path: str | os.PathLike | None = None, *, online: bool | None = None) -> VGG19Features:
    """VGG-19 with torchvision's ImageNet weights, frozen and in eval mode, on the CPU.

    Args:
        path: ``vgg19-dcbb9e9d.pth`` (torchvision's pickled state dict, read with
            ``weights_only=True``) or a ``.safetensors`` file with the same keys.
        online: without ``path``, whether to download the file when it is not in
            torch.hub's checkpoints folder; ``None`` probes download.pytorch.org
            (never when ``PROMPTUS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``).

    Raises:
        ModelNotFoundError: the file is missing, unreadable, not a VGG-19, or cannot
            be downloaded; the message says where to put the file and how to get it.
    """
    if path is not None:
        file = Path(os.path.expanduser(os.fspath(path)))
        if not file.is_file():
            raise ModelNotFoundError(f"VGG-19 weights: no such file {str(file)!r}.\n{_help_text()}")
        state, source = _read_weights(file), str(file)
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE
        if cached.is_file():
            state, source = _read_weights(cached), str(cached)
        else:
            if online is None:
                online = _is_online()
            if not online:
                raise ModelNotFoundError(f"VGG-19 weights not found (no file {cached}; offline).\n{_help_text()}")
            logger.info("downloading %s", VGG19_URL)
            try:
                state = torch.hub.load_state_dict_from_url(
                    VGG19_URL, map_location="cpu", weights_only=True, check_hash=True
                )
            except Exception as e:  # network, hash, disk, pickle: all mean no weights
                raise ModelNotFoundError(
                    f"VGG-19 weights: download of {VGG19_URL} failed ({type(e).__name__}: {e}).\n{_help_text()}"
                ) from e
            source = VGG19_URL
    vgg = VGG19Features()
    vgg.load_state_dict(_vgg19_state(state, source))
    return vgg.eval().requires_grad_(False)


# ---------------------------------------------------------------- losses


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of (a − b)² over every dimension but the first, in float32: shape (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def _check_pair(generated: torch.Tensor, target: torch.Tensor) -> None:
    if generated.dim() != 4 or generated.shape[1] != 3:
        raise ValueError(f"generated frames must be B×3×H×W, got {tuple(generated.shape)}")
    if target.dim() != 4 or target.shape[1:] != generated.shape[1:] or target.shape[0] not in (1, generated.shape[0]):
        raise ValueError(
            f"target frames {tuple(target.shape)} do not fit generated frames {tuple(generated.shape)} "
            "(same C×H×W, batch equal or 1)"
        )


class PerceptualLoss(nn.Module):
    """Per-sample VGG-19 feature loss: mean over the 16 conv layers of the per-layer MSE.

    Inputs are frames in [-1, 1]; they are cast to float32, mapped to [0, 1] and
    ImageNet-normalised before VGG. The VGG may run under the caller's autocast; the
    feature differences are taken in float32. The target's features do not change
    during an inversion: compute them once with :meth:`target_features` and pass
    them as ``target_feats``.
    """

    def __init__(self, vgg: VGG19Features):
        super().__init__()
        self.vgg = vgg.eval().requires_grad_(False)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.vgg.eval()  # VGG-19 has no dropout or batch norm in `features`, but stay frozen regardless
        return self

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        x = ((x + 1) / 2 - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(self.vgg.features[0].weight.dtype)  # no-op for a float32 VGG; autocast still applies

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.vgg(self._normalise(images))

    def target_features(self, target: torch.Tensor) -> list[torch.Tensor]:
        """The 16 conv outputs of the real frames (detached), for reuse as ``target_feats``.

        They keep VGG's output precision (bf16 under a bf16 autocast, else float32):
        the loss compares them in float32 either way, so storing them wider would
        only double their memory.
        """
        if target.dim() != 4 or target.shape[1] != 3:
            raise ValueError(f"target frames must be B×3×H×W, got {tuple(target.shape)}")
        with torch.no_grad():
            return list(self._features(target))

    def forward(
        self,
        generated: torch.Tensor,
        target: torch.Tensor | None = None,
        target_feats: list[torch.Tensor] | None = None,
        *,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """Per-sample loss (B,) between ``generated`` and ``target`` (or its precomputed features).

        Give exactly one of ``target`` and ``target_feats``; a target batch of 1 is
        compared with every generated frame. ``checkpoint=True`` runs VGG stage by
        stage under activation checkpointing, each stage with its layers' feature
        differences, so that backward keeps one stage's activations at a time (the
        same result, one more VGG forward).
        """
        if (target is None) == (target_feats is None):
            raise TypeError("PerceptualLoss: give exactly one of target and target_feats")
        if target is not None:
            _check_pair(generated, target)
            target_feats = self.target_features(target)
        elif generated.dim() != 4 or generated.shape[1] != 3:
            raise ValueError(f"generated frames must be B×3×H×W, got {tuple(generated.shape)}")
        assert target_feats is not None
        if len(target_feats) != len(VGG19_CONV_INDICES):
            raise ValueError(f"target_feats has {len(target_feats)} layers, VGG-19 gives {len(VGG19_CONV_INDICES)}")
        if not checkpoint:
            return torch.stack(_layer_losses(self._features(generated), target_feats)).mean(dim=0)
        x = self._normalise(generated)
        per_layer: list[torch.Tensor] = []
        for start, stop in self.vgg.stages():
            convs = sum(1 for i in range(start, stop) if i in VGG19_CONV_INDICES)
            stage_targets = target_feats[len(per_layer):len(per_layer) + convs]
            x, *losses = torch.utils.checkpoint.checkpoint(self._stage, x, start, stop, *stage_targets,
                                                           use_reentrant=False, preserve_rng_state=False)
            per_layer += losses
        return torch.stack(per_layer).mean(dim=0)

    def _stage(self, x: torch.Tensor, start: int, stop: int, *target_feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, feats = self.vgg.run(x, start, stop)
        return (x, *_layer_losses(feats, target_feats))


def _layer_losses(feats, target_feats) -> list[torch.Tensor]:
    """Per-sample MSE (B,) of each generated conv output against the target's."""
    per_layer = []
    for g, t in zip(feats, target_feats):
        if t.shape[1:] != g.shape[1:] or t.shape[0] not in (1, g.shape[0]):
            raise ValueError(
                f"target features {tuple(t.shape)} do not fit generated features {tuple(g.shape)}: "
                "were they computed from frames of another size?"
            )
        per_layer.append(_per_sample_mse(g, t.to(g.device)))
    return per_layer


class LossTerms(NamedTuple):
    """The inversion loss of each frame and its unweighted parts, each of shape (B,)."""

    total: torch.Tensor
    mse: torch.Tensor
    perceptual: torch.Tensor
    reg: torch.Tensor


class InversionLoss(nn.Module):
    """``mse_weight·MSE + perceptual_weight·perceptual + reg_weight·mean|c|`` per frame.

    MSE is taken between frames in [-1, 1] (as the published code's ``MSELoss``);
    ``perceptual=None`` turns the perceptual term off (it is then 0).
    """

    def __init__(
        self,
        perceptual: PerceptualLoss | None,
        mse_weight: float = 0.8,
        perceptual_weight: float = 0.2,
        reg_weight: float = 0.1,
    ):
        super().__init__()
        weights = {"mse_weight": mse_weight, "perceptual_weight": perceptual_weight, "reg_weight": reg_weight}
        for name, w in weights.items():
            if not (np.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {w!r}")
        self.perceptual = perceptual
        self.mse_weight = float(mse_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.reg_weight = float(reg_weight)

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual is not None and self.perceptual_weight != 0

    def target_features(self, target: torch.Tensor) -> list[torch.Tensor] | None:
        """Features of the real frames to pass as ``target_feats``; None when the perceptual term is off."""
        return self.perceptual.target_features(target) if self.uses_perceptual else None

    def terms(
        self,
        generated: torch.Tensor,
        target: torch.Tensor,
        context: torch.Tensor,
        target_feats: list[torch.Tensor] | None = None,
        *,
        checkpoint: bool = False,
    ) -> LossTerms:
        """The weighted total and the three unweighted terms, each per frame (B,), in float32.

        ``checkpoint``: run the perceptual term under activation checkpointing
        (:meth:`PerceptualLoss.forward`).
        """
        _check_pair(generated, target)
        batch = generated.shape[0]
        if context.dim() < 2 or context.shape[0] not in (1, batch):
            raise ValueError(f"context must be B×77×1024 with B = {batch} (or 1), got {tuple(context.shape)}")
        generated = generated.float()
        mse = _per_sample_mse(generated, target)
        reg = context.float().abs().flatten(1).mean(dim=1).expand(batch)
        if self.uses_perceptual:
            assert self.perceptual is not None
            if target_feats is not None:
                perc = self.perceptual(generated, target_feats=target_feats, checkpoint=checkpoint)
            else:
                perc = self.perceptual(generated, target, checkpoint=checkpoint)
        else:  # off: skip VGG entirely
            perc = torch.zeros(batch, dtype=torch.float32, device=generated.device)
        total = self.mse_weight * mse + self.perceptual_weight * perc + self.reg_weight * reg
        return LossTerms(total=total, mse=mse, perceptual=perc, reg=reg)

    def forward(
        self,
        generated: torch.Tensor,
        target: torch.Tensor,
        context: torch.Tensor,
        target_feats: list[torch.Tensor] | None = None,
        *,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """Per-frame loss (B,); differentiable w.r.t. ``generated`` and ``context``."""
        return self.terms(generated, target, context, target_feats, checkpoint=checkpoint).total
