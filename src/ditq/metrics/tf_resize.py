"""Bilinear resizing as TensorFlow 1.x `ResizeBilinear` does it (align_corners=False, no half-pixel
centres): the resize inside the 2015 Inception graph that the ADM evaluator runs.

Output pixel i samples the input at s = i * (in / out) (not (i + 0.5) * in/out - 0.5 as PyTorch's
`interpolate` does), with lo = floor(s), hi = min(lo + 1, in - 1), and the weights of TF's kernel:
  top = tl + (tr - tl) * dx;  bottom = bl + (br - bl) * dx;  out = top + (bottom - top) * dy
evaluated in float32 in that order. No antialiasing: downscaling skips pixels, as TF did.
"""
from typing import Tuple

import torch

# Written in the TorchScript subset (no `from __future__ import annotations`, typing.Tuple),
# so that `torch.jit.script` can embed it (see cleanfid_export).


def _axis(in_size: int, out_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = torch.tensor(float(in_size) / float(out_size), dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo.float()
    return lo.to(device), hi.to(device), frac.to(device)


def resize_bilinear_tf1(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize float NCHW `x` to `size` = (H, W) like TF 1.x bilinear; identity when sizes agree."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError("resize_bilinear_tf1 takes a float NCHW tensor")
    out_h, out_w = size[0], size[1]
    in_h, in_w = x.shape[2], x.shape[3]
    if in_h == out_h and in_w == out_w:
        return x
    y_lo, y_hi, dy = _axis(in_h, out_h, x.device)
    x_lo, x_hi, dx = _axis(in_w, out_w, x.device)
    dx = dx.to(x.dtype).view(1, 1, 1, out_w)
    dy = dy.to(x.dtype).view(1, 1, out_h, 1)
    rows_lo = x.index_select(2, y_lo)
    rows_hi = x.index_select(2, y_hi)
    tl, tr = rows_lo.index_select(3, x_lo), rows_lo.index_select(3, x_hi)
    bl, br = rows_hi.index_select(3, x_lo), rows_hi.index_select(3, x_hi)
    top = tl + (tr - tl) * dx
    bottom = bl + (br - bl) * dx
    return top + (bottom - top) * dy
