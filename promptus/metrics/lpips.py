"""LPIPS v0.1 (AlexNet backbone), computed as torchmetrics does, in plain torch (no torchvision).

The backbone's ImageNet weights come from a local file (``lpips_weights``, or
torch.hub's checkpoint folder); nothing is downloaded. The linear heads are the
LPIPS v0.1 weights that torchmetrics ships.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MetricUnavailable
from .frames import check_pair, to_unit

#: torchvision's file of AlexNet's ImageNet weights: LPIPS' backbone.
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_BACKBONE_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def _alexnet_features() -> torch.nn.Sequential:
    """torchvision's AlexNet ``features``: the layout its weight file's keys ``features.N.*`` refer to."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


class LPIPSNet(torch.nn.Module):
    """LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), as torchmetrics computes it.

    Inputs in [-1, 1]; each of the five ReLU outputs is unit-normalised over
    channels, the squared differences are weighted by a 1×1 linear head, averaged
    over space and summed over layers. Built from plain torch: no torchvision.
    """

    SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # ends of relu1..relu5 in ``features``
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _alexnet_features()
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for a, b in self.SLICES:
            for i in range(a, b):
                h = self.features[i](h)
            out.append(h / torch.sqrt(1e-8 + h.pow(2).sum(1, keepdim=True)))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for lin, fx, fy in zip(self.lins, self._feats(x), self._feats(y)):
            total = total + lin((fx - fy).pow(2)).mean((2, 3))
        return total.flatten()


class LPIPS:
    """LPIPS distance per frame (lower is more similar). Build it with :func:`load_lpips`."""

    def __init__(self, net: LPIPSNet, source: str, device: torch.device):
        self.net, self.source, self.device = net, source, device
        self.name = "alex"

    @torch.no_grad()
    def __call__(self, reference: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        check_pair(reference, decoded)
        a = to_unit(reference).to(self.device) * 2 - 1
        b = to_unit(decoded).to(self.device) * 2 - 1
        return self.net(a, b).double().cpu()

    def describe(self) -> str:
        return f"LPIPS (alex, backbone weights {self.source})"


def lpips_backbone_path(weights: str | os.PathLike | None = None) -> Path | None:
    """The backbone weights file: ``weights`` if given, else torch.hub's cached copy, else None."""
    if weights is not None:
        return Path(os.path.expanduser(os.fspath(weights)))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILE
    return cached if cached.is_file() else None


def _lpips_heads_path() -> Path:
    try:
        import torchmetrics
    except ImportError as e:
        raise MetricUnavailable("LPIPS", f"its linear heads ship with torchmetrics, which is not installed ({e}); "
                                         "pip install torchmetrics") from e
    path = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "alex.pth"
    if not path.is_file():
        raise MetricUnavailable("LPIPS", f"this torchmetrics has no LPIPS heads at {path}")
    return path


def load_lpips(weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS (AlexNet) with the backbone's ImageNet weights read from a local file.

    ``weights`` is torchvision's AlexNet state dict (``alexnet-owt-7be5be79.pth``;
    only its ``features.*`` entries are used); without it the file is looked up in
    torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``). Nothing is
    downloaded, and torchvision is not needed. The linear heads are the LPIPS v0.1
    weights that torchmetrics ships.

    Raises:
        MetricUnavailable: the weights are missing or unreadable, or torchmetrics is absent.
    """
    heads = _lpips_heads_path()
    path = lpips_backbone_path(weights)
    if path is None:
        raise MetricUnavailable(
            "LPIPS", f"no ImageNet weights for its AlexNet backbone here: pass --lpips-weights PATH (torchvision's "
                     f"{LPIPS_BACKBONE_FILE}, from {LPIPS_BACKBONE_URL}) or put that file in "
                     f"{Path(torch.hub.get_dir()) / 'checkpoints'}")
    if not path.is_file():
        raise MetricUnavailable("LPIPS", f"backbone weights {str(path)!r} do not exist")
    net = LPIPSNet()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        net.features.load_state_dict(feats)
        lin = torch.load(heads, map_location="cpu", weights_only=True)
        for k, conv in enumerate(net.lins):
            conv.weight.data.copy_(lin[f"lin{k}.model.1.weight"])
    except Exception as e:  # unreadable or wrong file: say so instead of a traceback
        raise MetricUnavailable("LPIPS", f"cannot load AlexNet weights from {str(path)!r}: "
                                         f"{type(e).__name__}: {e}") from e
    dev = torch.device(device)
    return LPIPS(net.to(dev).eval().requires_grad_(False), str(path), dev)
