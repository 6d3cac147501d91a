"""Write an Inception as a TorchScript file in the calling convention of clean-fid's network.

clean-fid (`cleanfid.inception_torchscript.InceptionV3W`) loads `inception-2015-12-05.pt`, a
TorchScript module with
  `layers(x)`                      x: float [N, 3, 299, 299] already in (x - 128) / 128 -> [N, 2048]
  `forward(x, return_features)`    x: float [N, 3, H, W] in 0..255; resizes inside (its
                                   `legacy_tensorflow` mode), normalises, -> [N, 2048]
NVIDIA's published file cannot be fetched here. `export_cleanfid_torchscript` writes the ditq port
(any weights: the FID weights, or random ones) in that convention, so clean-fid's own wrapper
and resizer can run on it: the clean-fid backend's tests and the feature benchmark use this.
The resize inside is TF 1.x bilinear (`tf_resize`), as the TF graph does.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ditq.metrics.inception import INPUT_SIZE, InceptionV3TF
from ditq.metrics.tf_resize import resize_bilinear_tf1

CLEANFID_FILENAME = "inception-2015-12-05.pt"


class _PoolOnly(nn.Module):
    def __init__(self, net: InceptionV3TF):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(x).pool


class _CleanFidConvention(nn.Module):
    def __init__(self, layers: torch.jit.ScriptModule):
        super().__init__()
        self.layers = layers
        self.size: int = INPUT_SIZE

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = resize_bilinear_tf1(x, (self.size, self.size))
        return self.layers((x - 128.0) / 128.0)


def export_cleanfid_torchscript(net: nn.Module, directory: str | Path) -> Path:
    """Save `net` as `<directory>/inception-2015-12-05.pt` for clean-fid; returns the file path.

    `net` is an `InceptionV3TF`, or any module mapping normalised [N, 3, 299, 299] input to
    [N, 2048] pool features (e.g. another implementation of the same graph, for benchmarks)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(net, InceptionV3TF):
        net = _PoolOnly(net.eval().fold_batch_norms())
    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        layers = torch.jit.trace(net.eval(), example, check_trace=False)
    scripted = torch.jit.script(_CleanFidConvention(layers))
    path = directory / CLEANFID_FILENAME
    scripted.save(str(path))
    return path
