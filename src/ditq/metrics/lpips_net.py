"""LPIPS (Zhang et al. 2018, v0.1) without the `lpips` package, which needs torchvision.

    d(x0, x1) = sum_l mean_hw( w_l . (n(f_l(x0)) - n(f_l(x1)))^2 )

f_l: the ReLU outputs of an ImageNet backbone (AlexNet: 5 layers; VGG16: 5 layers), on input
scaled by LPIPS' fixed `(x - shift) / scale`; n: unit-normalisation over channels (eps 1e-10);
w_l: the learned non-negative 1x1 "lin" layers. Inputs are in [-1, 1].

Weights are supplied by the user as ONE file: the state dict of the lpips package's module,
`torch.save(lpips.LPIPS(net="alex").state_dict(), "lpips_alex.pth")` (backbone `net.slice*`, heads
`lin*.model.1.weight`, and the `scaling_layer` buffers). The package's own `weights/v0.1/*.pth`
hold the heads only; the backbone comes from torchvision's ImageNet weights, so both are needed.
The backbone (alex / vgg) is recognised from the file.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from ditq.metrics import random_weights
from ditq.metrics.errors import MetricInputError
from ditq.metrics.inception import check_state_dict, read_state_dict

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NETS = ("alex", "vgg")

# torchvision `features` layer lists, as (index, module-spec); LPIPS slices them at the ReLUs.
_ALEX = [(0, ("conv", 3, 64, 11, 4, 2)), (1, ("relu",)), (2, ("pool",)),
         (3, ("conv", 64, 192, 5, 1, 2)), (4, ("relu",)), (5, ("pool",)),
         (6, ("conv", 192, 384, 3, 1, 1)), (7, ("relu",)),
         (8, ("conv", 384, 256, 3, 1, 1)), (9, ("relu",)),
         (10, ("conv", 256, 256, 3, 1, 1)), (11, ("relu",))]
_ALEX_CUTS = (2, 5, 8, 10, 12)
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_CUTS = (4, 9, 16, 23, 30)
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


def _vgg_layers():
    layers, cin, i = [], 3, 0
    for v in _VGG_CFG:
        if v == "M":
            layers.append((i, ("pool2",)))
            i += 1
        else:
            layers += [(i, ("conv", cin, v, 3, 1, 1)), (i + 1, ("relu",))]
            cin, i = v, i + 2
    return layers


def _make(spec) -> nn.Module:
    if spec[0] == "conv":
        _, cin, cout, k, s, p = spec
        return nn.Conv2d(cin, cout, k, stride=s, padding=p)
    if spec[0] == "relu":
        return nn.ReLU(inplace=False)
    if spec[0] == "pool":
        return nn.MaxPool2d(kernel_size=3, stride=2)
    return nn.MaxPool2d(kernel_size=2, stride=2)


class Backbone(nn.Module):
    """torchvision's AlexNet / VGG16 `features`, cut into LPIPS' five slices (same key names)."""

    def __init__(self, net: str):
        super().__init__()
        layers, cuts = (_ALEX, _ALEX_CUTS) if net == "alex" else (_vgg_layers(), _VGG_CUTS)
        start = 0
        for n, stop in enumerate(cuts, 1):
            mods = OrderedDict((str(i), _make(spec)) for i, spec in layers if start <= i < stop)
            setattr(self, f"slice{n}", nn.Sequential(mods))
            start = stop

    def forward(self, x) -> list[torch.Tensor]:
        outs = []
        for n in range(1, 6):
            x = getattr(self, f"slice{n}")(x)
            outs.append(x)
        return outs


class LinLayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.shift) / self.scale


def _unit_normalise(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """`forward(x0, x1)` with float inputs in [-1, 1] -> distance per pair [N]."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in NETS:
            raise MetricInputError(f"LPIPS backbone must be one of {NETS}, got {net!r}")
        self.net_name = net
        self.scaling_layer = ScalingLayer()
        self.net = Backbone(net)
        for i, c in enumerate(CHANNELS[net]):
            setattr(self, f"lin{i}", LinLayer(c))
        self.requires_grad_(False)
        self.eval()

    def min_side(self) -> int:
        """Smallest input side for which every slice has a non-empty output."""
        return 32 if self.net_name == "alex" else 16

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        f0 = self.net(self.scaling_layer(x0))
        f1 = self.net(self.scaling_layer(x1))
        total = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        for i, (a, b) in enumerate(zip(f0, f1)):
            diff = (_unit_normalise(a) - _unit_normalise(b)) ** 2
            total = total + getattr(self, f"lin{i}")(diff).mean(dim=(1, 2, 3))
        return total


def detect_net(state: dict) -> str:
    w = state.get("net.slice1.0.weight")
    if w is None:
        if any(k.startswith("lin") for k in state) and not any(k.startswith("net.") for k in state):
            raise MetricInputError("the LPIPS file holds only the linear heads (like lpips' weights/v0.1/*.pth); "
                                   "save the whole module instead: "
                                   "torch.save(lpips.LPIPS(net='alex').state_dict(), path)")
        raise MetricInputError("not an LPIPS state dict (no net.slice1.0.weight)")
    if tuple(w.shape) == (64, 3, 11, 11):
        return "alex"
    if tuple(w.shape) == (64, 3, 3, 3):
        return "vgg"
    raise MetricInputError(f"unrecognised LPIPS backbone: net.slice1.0.weight has shape {tuple(w.shape)}")


def merge_lin_aliases(state: dict) -> dict:
    """lpips' module lists each head twice (`lin0.*` and the ModuleList alias `lins.0.*`); keep one."""
    state = dict(state)
    for key in [k for k in state if k.startswith("lins.")]:
        index, rest = key[len("lins."):].split(".", 1)
        canonical = f"lin{index}.{rest}"
        value = state.pop(key)
        if canonical in state and not torch.equal(state[canonical], value):
            raise MetricInputError(f"LPIPS state dict: {key} and {canonical} should be the same tensor but differ")
        state.setdefault(canonical, value)
    return state


def load_lpips(path: str | Path, device: str = "cpu") -> LPIPS:
    state = merge_lin_aliases(read_state_dict(path, "LPIPS"))
    model = LPIPS(detect_net(state))
    check_state_dict(model, state, f"LPIPS weights {path}")
    model.load_state_dict(state, strict=True)
    return model.to(device)


def random_lpips_state_dict(net: str = "alex", seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights with LPIPS' keys (scaling constants kept); heads non-negative."""
    out = {}
    for name, t in LPIPS(net).state_dict().items():
        if name.startswith("scaling_layer"):
            out[name] = t.clone()
        elif name.startswith("lin"):
            out[name] = random_weights.uniform(name, seed, t.shape, 0.0, 0.2)
        elif name.endswith("weight"):
            out[name] = random_weights.he_normal(name, seed, t.shape)
        else:
            out[name] = random_weights.randn(name, seed, t.shape, std=0.01)
    return out
