"""A PyTorch port of the 2015 TensorFlow Inception graph (`classify_image_graph_def.pb`) that the
ADM evaluator (guided-diffusion `evaluations/evaluator.py`) runs.

One pass over uint8 images gives the three outputs the ADM suite uses:
  pool     `pool_3`, 2048-d                       -> FID, Precision/Recall
  spatial  `mixed_6/conv`[..., :7], 17x17x7=2023-d -> sFID
           (`mixed_6` is the 7th Inception block, pytorch-fid's `Mixed_6d`; `conv` its 1x1 branch,
           conv + batch norm + ReLU; flattened in TF's (H, W, C) order so that the `mu_s`/`sigma_s`
           of an ADM reference batch line up feature by feature)
  logits   `pool_3 @ softmax/weights`, 1008-d, without the bias -> Inception Score

Preprocessing is the graph's own: uint8 -> float, TF 1.x bilinear resize to 299x299 (no
antialias, see `tf_resize`), then (x - 128) / 128. Other resizes are available for the backends
that replicate other libraries ("bilinear": PyTorch's half-pixel bilinear, as pytorch-fid;
"bilinear-antialias": torchmetrics' default since 2025).

Weights: the architecture and parameter names are those of pytorch-fid's FID Inception, so its
published `pt_inception-2015-12-05-6726825d.pth` (same tensors as torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`) loads with strict key and shape matching.
Batch norms are applied folded into the convolutions (same function, one pass less).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.metrics import random_weights
from ditq.metrics.errors import MetricInputError
from ditq.metrics.tf_resize import resize_bilinear_tf1

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008
BN_EPS = 1e-3  # the graph's batch-norm epsilon (as torchvision's BasicConv2d)
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
RESIZE_MODES = ("tf1", "bilinear", "bilinear-antialias", "none")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class FrozenBatchNorm(nn.Module):
    """Inference-only batch norm: the four tensors of a trained BN layer as buffers."""

    def __init__(self, channels: int, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm -> ReLU, evaluated as one conv with the norm folded in.

    The folded weight and bias are non-persistent buffers (not in the state dict, moved by
    `.to()`), filled by `fold()` and cleared whenever a new state dict is loaded.
    """

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(cout)
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)
        self._register_load_state_dict_pre_hook(self._unfold)

    def _unfold(self, *args, **kwargs) -> None:
        self.folded_weight = None
        self.folded_bias = None

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.bn.scale_shift()
        return self.conv.weight * scale.view(-1, 1, 1, 1), shift

    def fold(self, channels_last: bool) -> None:
        w, b = self.folded()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.folded_weight = w.detach().contiguous(memory_format=fmt)
        self.folded_bias = b.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded_weight is None:
            w, b = self.folded()
        else:
            w, b = self.folded_weight, self.folded_bias
        return F.relu(F.conv2d(x, w, b, self.conv.stride, self.conv.padding), inplace=True)


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) pixels
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block (graph: mixed, mixed_1, mixed_2)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class MixedB(nn.Module):
    """35x35 -> 17x17 reduction (graph: mixed_3)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (graph: mixed_4 .. mixed_7)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward_with_1x1(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and its 1x1 branch (`mixed_N/conv` in the graph)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, bd, bp], 1), b1

    def forward(self, x):
        return self.forward_with_1x1(x)[0]


class MixedD(nn.Module):
    """17x17 -> 8x8 reduction (graph: mixed_8)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedE(nn.Module):
    """8x8 block with split 3x3 convolutions (graph: mixed_9 with average pooling, mixed_10 with
    max pooling in its pool branch: a quirk of the 2015 graph that pytorch-fid also reproduces)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class InceptionOutputs(NamedTuple):
    pool: torch.Tensor  # [N, 2048]
    spatial: torch.Tensor  # [N, 2023], (H, W, C) order
    logits: torch.Tensor  # [N, 1008], no bias


class InceptionV3TF(nn.Module):
    """The 2015 TF Inception graph. `forward(uint8 NCHW)` -> InceptionOutputs."""

    def __init__(self, resize: str = "tf1", channels_last: bool = True):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise MetricInputError(f"unknown Inception resize {resize!r}; choose one of {RESIZE_MODES}")
        self.resize = resize
        self.channels_last = channels_last
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, pool="avg")
        self.Mixed_7c = MixedE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (C=3) -> the float 299x299 input in the graph's range, (x - 128) / 128."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise MetricInputError(f"Inception takes uint8 [N, 3, H, W] images, "
                                   f"got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.fc.weight.device, torch.float32)
        size = (INPUT_SIZE, INPUT_SIZE)
        if self.resize == "tf1":
            x = resize_bilinear_tf1(x, size)
        elif self.resize == "bilinear":
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        elif self.resize == "bilinear-antialias":
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        elif tuple(x.shape[-2:]) != size:
            raise MetricInputError(f"resize='none' needs 299x299 images, got {tuple(x.shape[-2:])}")
        return (x - 128) / 128

    def fold_batch_norms(self) -> InceptionV3TF:
        """Precompute every conv's folded weights (done on first use; cleared by load_state_dict)."""
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.fold(self.channels_last)
        return self

    def trunk(self, x: torch.Tensor) -> InceptionOutputs:
        """Run the network on preprocessed float input [N, 3, 299, 299]."""
        if self.Conv2d_1a_3x3.folded_weight is None:
            self.fold_batch_norms()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        x, conv_1x1 = self.Mixed_6d.forward_with_1x1(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean(dim=(2, 3))
        spatial = conv_1x1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        logits = pool @ self.fc.weight.T
        return InceptionOutputs(pool.float(), spatial.float(), logits.float())

    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        with torch.inference_mode():
            return self.trunk(self.preprocess(images))


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def _describe_mismatch(missing, unexpected, wrong_shape) -> str:
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def check_state_dict(model: nn.Module, state: dict, what: str) -> None:
    """Raise MetricInputError unless `state` has exactly `model`'s keys and shapes."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                   for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        details = _describe_mismatch(missing, unexpected, wrong)
        raise MetricInputError(f"{what} does not match the architecture: {details}")


def read_state_dict(path: str | Path, what: str) -> dict:
    """Load a state dict file (plain, or nested under 'state_dict'), dropping BN step counters."""
    path = Path(path)
    if not path.is_file():
        raise MetricInputError(f"{what} weights not found at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a malformed file
        raise MetricInputError(f"{what} weights at {path} cannot be read as a torch state dict: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricInputError(f"{what} weights at {path} are not a state dict of tensors")
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def load_inception_state(model: InceptionV3TF, state: dict, what: str = "Inception") -> InceptionV3TF:
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True)
    return model


def load_inception(path: str | Path, resize: str = "tf1", device: str = "cpu",
                   channels_last: bool = True) -> InceptionV3TF:
    """The port with pytorch-fid's FID weights (`pt_inception-2015-12-05-6726825d.pth`) from `path`."""
    model = InceptionV3TF(resize=resize, channels_last=channels_last)
    load_inception_state(model, read_state_dict(path, "Inception"), f"Inception weights {path}")
    return model.to(device)


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights with the keys and shapes of pytorch-fid's FID Inception.

    Convs: He-normal; batch norms: gamma in [0.5, 1.5], beta ~ N(0, 0.1), mean ~ N(0, 0.1),
    var in [0.5, 1.5]; fc: N(0, 1/2048). Same tensors in any environment with this torch version.
    """
    out = {}
    for name, t in InceptionV3TF().state_dict().items():
        if name.endswith("conv.weight"):
            out[name] = random_weights.he_normal(name, seed, t.shape)
        elif name.endswith("bn.weight") or name.endswith("bn.running_var"):
            out[name] = random_weights.uniform(name, seed, t.shape, 0.5, 1.5)
        elif name.endswith("bn.bias") or name.endswith("bn.running_mean"):
            out[name] = random_weights.randn(name, seed, t.shape, std=0.1)
        elif name == "fc.weight":
            out[name] = random_weights.randn(name, seed, t.shape, std=POOL_DIM ** -0.5)
        elif name == "fc.bias":
            out[name] = random_weights.randn(name, seed, t.shape, std=0.01)
        else:  # pragma: no cover - the architecture has no other tensors
            raise AssertionError(f"no random init rule for {name}")
    return out
